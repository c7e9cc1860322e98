"""Grouped-query attention as one masked softmax (MHA / GQA / MQA).

GQA never materialises repeated K/V heads: queries are viewed as (B, T, Hkv, G, Dh) with
G = H / Hkv query heads per K/V head, and the score einsum contracts each group against its one
K/V head. Query head ``h`` uses K/V head ``h // G`` (groups are contiguous).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite, so fully-masked rows give a uniform (not NaN) softmax


def make_attention_mask(q_positions: jax.Array, k_positions: jax.Array,
                        k_valid: Optional[jax.Array] = None,
                        q_segments: Optional[jax.Array] = None,
                        k_segments: Optional[jax.Array] = None) -> jax.Array:
    """Causal (+ key padding, + same document) mask. q_positions (B, T), k_positions (B, S),
    k_valid (B, S), segment ids q_segments (B, T) / k_segments (B, S) -> bool (B, T, S): query t
    may attend key s iff pos_k[s] <= pos_q[t], key s is valid and (with segment ids) both lie in
    the same segment (document)."""
    mask = k_positions[:, None, :] <= q_positions[:, :, None]
    if k_valid is not None:
        mask = mask & k_valid[:, None, :].astype(bool)
    if q_segments is not None:
        mask = mask & (q_segments[:, :, None] == k_segments[:, None, :])
    return mask


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def scores_einsum(eq: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """``einsum(eq, a, b)`` with a float32 result (the attention scores). Its backward casts the
    cotangent (dS) to the operands' dtype first, so dQ and dK are GEMMs in that dtype (bf16
    tensor cores), not float32 x float32 dots as the plain ``preferred_element_type`` einsum's
    transpose gives -- the cast of dS that the flash and block cores make too."""
    return jnp.einsum(eq, a, b, preferred_element_type=jnp.float32)


def _scores_fwd(eq, a, b):
    return scores_einsum(eq, a, b), (a, b)


def _scores_bwd(eq, res, g):
    a, b = res
    _, vjp = jax.vjp(lambda x, y: jnp.einsum(eq, x, y), a, b)
    return vjp(g.astype(jnp.result_type(a, b)))


scores_einsum.defvjp(_scores_fwd, _scores_bwd)


def grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax attention with grouped K/V heads.

    q: (B, T, H, D); k, v: (B, S, Hkv, D); mask: bool (B, T, S). Returns (B, T, H, D).
    Scores and softmax are computed in float32.
    """
    b, t, h, d = q.shape
    hkv = k.shape[2]
    if h % hkv:
        raise ValueError(f"{h} query heads are not a multiple of {hkv} kv heads")
    qg = q.reshape(b, t, hkv, h // hkv, d)                                      # (B, T, K, G, D)
    scores = scores_einsum("btkgd,bskd->bkgts", qg, k) / jnp.sqrt(jnp.float32(d))
    scores = jnp.where(mask[:, None, None, :, :], scores, NEG_INF)              # (B, K, G, T, S)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)                             # (B, T, K, G, D)
    return out.reshape(b, t, h, d)


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array,
                     k_scale: Optional[jax.Array] = None,
                     v_scale: Optional[jax.Array] = None) -> jax.Array:
    """Decode attention: a few new queries against a KV cache (the ``cached_attention`` of every
    ops set; XLA ops only).

    q (B, T, H, D) at absolute positions ``q_positions`` (B, T) int32; k, v (B, S, Hkv, D): the
    cache, the new tokens' K/V already written. Query t of row b sees cache slots
    ``s <= q_positions[b, t]`` (slots beyond a row's length hold stale values and stay masked).
    Returns (B, T, H, D) in q's dtype.

    Quantized cache (int8 / e4m3 values, float32 multiplicative ``k_scale``/``v_scale``
    (B, S, Hkv) or (B, S, 1), :mod:`tfm_jax.layers.kv_cache`): dequantized on read without a
    dequantized copy -- a key's scale is constant over D, so ``q . (k_q / s_k) = (q . k_q) / s_k``
    scales the scores, and ``sum_s p_s (v_q / s_v)_s = sum_s (p_s / s_v) v_q`` the
    probabilities. K/V are never repeated per query head
    (the grouped (B, T, Hkv, G, D) view of :func:`grouped_attention`).
    """
    b, t, h, d = q.shape
    s_len, hkv = k.shape[1], k.shape[2]
    if h % hkv:
        raise ValueError(f"{h} query heads are not a multiple of {hkv} kv heads")
    f32 = jnp.float32
    quantized = k_scale is not None
    qg = q.reshape(b, t, hkv, h // hkv, d)                                      # (B, T, K, G, D)
    if quantized:                    # int8 / e4m3 storage: the dots run on float32 values
        qg, k, v = qg.astype(f32), k.astype(f32), v.astype(f32)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k,
                        preferred_element_type=f32) / jnp.sqrt(f32(d))          # (B, K, G, T, S)
    if quantized:
        scores = scores / k_scale.transpose(0, 2, 1)[:, :, None, None, :]       # (B, K|1,1,1,S)
    visible = jnp.arange(s_len, dtype=jnp.int32)[None, None, :] <= q_positions[:, :, None]
    scores = jnp.where(visible[:, None, None, :, :], scores, NEG_INF)           # (B, T, S) mask
    probs = jax.nn.softmax(scores, axis=-1)                                     # f32
    if quantized:
        probs = probs / v_scale.transpose(0, 2, 1)[:, :, None, None, :]
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v,
                     preferred_element_type=f32)                                # (B, T, K, G, D)
    return out.reshape(b, t, h, d).astype(q.dtype)


def rows_with_keys(k_valid: jax.Array, segment_ids: Optional[jax.Array] = None) -> jax.Array:
    """(B, T) bool: causal query t has at least one valid key (``k_valid`` (B, T)) -- in its
    own segment when ``segment_ids`` (B, T) are given (packed documents: contiguous runs of one
    id). False for e.g. the leading rows of a left-padded sequence."""
    valid = k_valid.astype(bool)
    count = jnp.cumsum(valid.astype(jnp.int32), axis=-1)          # valid keys at or before t
    if segment_ids is None:
        return count > 0
    start = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], dtype=bool),
                             segment_ids[:, 1:] != segment_ids[:, :-1]], axis=-1)
    before = jnp.where(start, count - valid.astype(jnp.int32), 0)  # count before each run
    return count - jax.lax.cummax(before, axis=1) > 0


def zero_keyless_rows(out: jax.Array, k_valid: Optional[jax.Array],
                      segment_ids: Optional[jax.Array] = None) -> jax.Array:
    """The one rule of every causal core for a query with no valid key: output 0, and (the
    cotangent of that row being 0 inside the core) no gradient from it. Without it each core
    would return its own arbitrary value -- the mean of V (masked softmax), or a row the flash
    backward differentiates as if every key had probability 1."""
    if k_valid is None:
        return out
    keep = rows_with_keys(k_valid, segment_ids)[:, :, None, None]
    return jnp.where(keep, out, jnp.zeros((), out.dtype))


def dense_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                           k_valid: Optional[jax.Array] = None, *, block_q: int = 0,
                           segment_ids: Optional[jax.Array] = None) -> jax.Array:
    """Causal self-attention over positions 0..T-1 (+ key padding) as one masked softmax.

    Same contract as :func:`causal_attention` (``block_q`` is accepted and unused): q (B, T, H, D),
    k, v (B, T, Hkv, D), k_valid (B, T) or None, segment_ids (B, T) int or None (packed
    documents: a query sees only keys of its own segment) -> (B, T, H, D). Materialises the
    (T, T) scores; on GPU/TPU XLA fuses mask, softmax and both einsums around it.
    """
    b, t = q.shape[:2]
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    out = grouped_attention(q, k, v, make_attention_mask(positions, positions, k_valid,
                                                         segment_ids, segment_ids))
    return zero_keyless_rows(out, k_valid, segment_ids)
