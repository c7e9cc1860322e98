"""Multi-head attention with grouped K/V heads (MHA / GQA / MQA) and rotary embeddings.

Split in two, as in MaxText:

* pure numerics -- :func:`rope` (:func:`rope_tables` + :func:`apply_rope`),
  :func:`make_attention_mask`, :func:`grouped_attention`, and two causal cores with one contract:
  :func:`dense_causal_attention` (the ``xla`` ops', GPU/TPU) and the block-causal
  :func:`causal_attention` (the ``cpu-xla`` ops');
* :class:`Attention` -- the projections (q: d -> H x Dh, k/v: d -> Hkv x Dh, o: H x Dh -> d)
  holding parameters with logical axes, calling the op the ops seam gives it
  (:mod:`tfm_jax.layers.ops`).

GQA never materialises repeated K/V heads: queries are viewed as (B, T, Hkv, G, Dh) with
G = H / Hkv query heads per K/V head, and the score einsum contracts each group against its one
K/V head. Query head ``h`` uses K/V head ``h // G`` (groups are contiguous).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from tfm_jax.layers import kv_cache
from tfm_jax.layers.linear import Linear
from tfm_jax.layers.ops import Ops, resolve as resolve_ops
from tfm_jax.parallel import axes

NEG_INF = -1e30  # finite, so fully-masked rows give a uniform (not NaN) softmax


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> jax.Array:
    """sin/cos tables for :func:`apply_rope`: positions (B, T) -> (2, B, T, 1, D/2) float32.

    ``inv_freq[i] = theta^(-2i/D)``, angle ``a = pos * inv_freq``. Computed once per forward and
    shared by every layer (and constant for the backward pass).
    """
    inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)  # (D/2,)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq                    # (B, T, D/2)
    return jnp.stack([jnp.sin(angles), jnp.cos(angles)])[:, :, :, None, :]


def _rotate(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


@jax.custom_vjp
def apply_rope(x: jax.Array, sincos: jax.Array) -> jax.Array:
    """Rotary embedding, "rotate-half" convention: x (B, T, H, D) split into halves (x1, x2),
    ``out = [x1 cos a - x2 sin a, x2 cos a + x1 sin a]``.

    The rotation is orthogonal, so its VJP is the inverse rotation (angle -a): one fused pass,
    written by hand. The tables are constants of the positions: no gradient flows to them.
    """
    return _rotate(x, sincos[0], sincos[1])


def _apply_rope_fwd(x, sincos):
    return _rotate(x, sincos[0], sincos[1]), sincos


def _apply_rope_bwd(sincos, dy):
    return _rotate(dy, -sincos[0], sincos[1]), jnp.zeros_like(sincos)


apply_rope.defvjp(_apply_rope_fwd, _apply_rope_bwd)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding of x (B, T, H, D) at positions (B, T)."""
    return apply_rope(x, rope_tables(positions, x.shape[-1], theta))


def make_attention_mask(q_positions: jax.Array, k_positions: jax.Array,
                        k_valid: Optional[jax.Array] = None) -> jax.Array:
    """Causal (+ key padding) mask. q_positions (B, T), k_positions (B, S), k_valid (B, S)
    -> bool (B, T, S): query t may attend key s iff pos_k[s] <= pos_q[t] and key s is valid."""
    mask = k_positions[:, None, :] <= q_positions[:, :, None]
    if k_valid is not None:
        mask = mask & k_valid[:, None, :].astype(bool)
    return mask


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
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k,
                        preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(d))
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

    Quantized cache (int8 / e4m3 values, float32 ``k_scale``/``v_scale`` (B, S, Hkv) or
    (B, S, 1)): dequantized on read without a dequantized copy -- a key's scale is constant over
    D, so ``q . (k_q s_k) = (q . k_q) s_k`` scales the scores, and ``sum_s p_s (v_q s_v)_s =
    sum_s (p_s s_v) v_q`` scales the probabilities. K/V are never repeated per query head
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
        scores = scores * k_scale.transpose(0, 2, 1)[:, :, None, None, :]       # (B, K|1,1,1,S)
    visible = jnp.arange(s_len, dtype=jnp.int32)[None, None, :] <= q_positions[:, :, None]
    scores = jnp.where(visible[:, None, None, :, :], scores, NEG_INF)           # (B, T, S) mask
    probs = jax.nn.softmax(scores, axis=-1)                                     # f32
    if quantized:
        probs = probs * v_scale.transpose(0, 2, 1)[:, :, None, None, :]
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v,
                     preferred_element_type=f32)                                # (B, T, K, G, D)
    return out.reshape(b, t, h, d).astype(q.dtype)


def dense_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                           k_valid: Optional[jax.Array] = None, *, block_q: int = 0) -> jax.Array:
    """Causal self-attention over positions 0..T-1 (+ key padding) as one masked softmax.

    Same contract as :func:`causal_attention` (``block_q`` is accepted and unused): q (B, T, H, D),
    k, v (B, T, Hkv, D), k_valid (B, T) or None -> (B, T, H, D). Materialises the (T, T) scores;
    on GPU/TPU XLA fuses mask, softmax and both einsums around it.
    """
    b, t = q.shape[:2]
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    return grouped_attention(q, k, v, make_attention_mask(positions, positions, k_valid))


# --------------------------------------------------------------------------------------------
# Training/prefill fast path: causal self-attention over positions 0..T-1, block-causal.
#
# The query axis is cut into blocks of ``block_q``; block i attends keys [0, end_i) only, so the
# upper-right blocks of the T x T score matrix (masked anyway) are never computed: ~(1 + 1/nb)/2
# of the full work. Each block is an exact softmax over its own key range (no online rescaling
# needed), and its score tile is small enough to stay in cache. The core has a hand-written VJP
# (FlashAttention's): dS = P * (dP - rowsum(dO * O)), which reads the probabilities once instead
# of the several passes autodiff of softmax makes.


def _block_core_fwd(qh, kh, vh, k_valid, q_start, group):
    """qh (B, K, G*bq, D) already scaled by 1/sqrt(D), rows ordered (g, t); kh, vh (B, K, S, D);
    k_valid (B, S) float 1/0. Query row t sits at absolute position q_start + t.

    Returns the output and the unnormalised probabilities ``e = exp(s - max)`` with their row
    sums ``l``: normalising the (rows, D) output instead of the (rows, S) tile saves a pass.
    """
    rows, keys = qh.shape[2], kh.shape[2]
    bq = rows // group
    t = q_start + jax.lax.broadcasted_iota(jnp.int32, (rows, keys), 0) % bq
    s_idx = jax.lax.broadcasted_iota(jnp.int32, (rows, keys), 1)
    allowed = (s_idx <= t)[None, None] & (k_valid[:, None, None, :] > 0)
    s = jnp.einsum("bkmd,bksd->bkms", qh, kh, preferred_element_type=jnp.float32)
    s = jnp.where(allowed, s, NEG_INF)
    e = jnp.exp(s - s.max(-1, keepdims=True))                                 # (B, K, M, S)
    l = e.sum(-1, keepdims=True)                                              # (B, K, M, 1)
    o = jnp.einsum("bkms,bksd->bkmd", e.astype(vh.dtype), vh,
                   preferred_element_type=jnp.float32) / l
    return o.astype(vh.dtype), e, l


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _block_core(qh, kh, vh, k_valid, q_start, group):
    return _block_core_fwd(qh, kh, vh, k_valid, q_start, group)[0]


def _block_core_vjp_fwd(qh, kh, vh, k_valid, q_start, group):
    o, e, l = _block_core_fwd(qh, kh, vh, k_valid, q_start, group)
    return o, (qh, kh, vh, k_valid, o, e, l)


def _block_core_vjp_bwd(q_start, group, res, do):
    # With P = E / l:  dV = P^T dO = E^T (dO / l);  dS = P * (dP - rowsum(dO * O)), dP = dO V^T.
    qh, kh, vh, k_valid, o, e, l = res
    f32 = jnp.float32
    inv_l = 1.0 / l
    do32 = do.astype(f32)
    dv = jnp.einsum("bkms,bkmd->bksd", e.astype(do.dtype), (do32 * inv_l).astype(do.dtype))
    dp = jnp.einsum("bkmd,bksd->bkms", do, vh, preferred_element_type=f32)
    delta = jnp.sum(do32 * o.astype(f32), -1, keepdims=True)
    ds = (e * inv_l * (dp - delta)).astype(qh.dtype)
    dq = jnp.einsum("bkms,bksd->bkmd", ds, kh)
    dk = jnp.einsum("bkms,bkmd->bksd", ds, qh)
    return dq, dk, dv, jnp.zeros_like(k_valid)


_block_core.defvjp(_block_core_vjp_fwd, _block_core_vjp_bwd)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                     k_valid: Optional[jax.Array] = None, *, block_q: int = 64) -> jax.Array:
    """Causal self-attention for positions 0..T-1 (+ optional key padding), block-causal.

    q: (B, T, H, D); k, v: (B, T, Hkv, D); k_valid: (B, T) or None. Returns (B, T, H, D).
    Same result as ``grouped_attention`` with ``make_attention_mask(arange, arange, k_valid)``.
    """
    b, t, h, d = q.shape
    hkv = k.shape[2]
    g = h // hkv
    scale = jnp.asarray(1.0 / np.sqrt(d), q.dtype)
    qh = (q * scale).reshape(b, t, hkv, g, d).transpose(0, 2, 3, 1, 4)     # (B, K, G, T, D)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)              # (B, K, T, D)
    k_valid = (jnp.ones((b, t), jnp.float32) if k_valid is None
               else k_valid.astype(jnp.float32))
    outs = []
    for start in range(0, t, block_q):
        end = min(start + block_q, t)
        qb = qh[:, :, :, start:end].reshape(b, hkv, g * (end - start), d)   # rows (g, t)
        ob = _block_core(qb, kh[:, :, :end], vh[:, :, :end], k_valid[:, :end], start, g)
        outs.append(ob.reshape(b, hkv, g, end - start, d))
    o = jnp.concatenate(outs, axis=3) if len(outs) > 1 else outs[0]         # (B, K, G, T, D)
    return o.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


class Attention(nn.Module):
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    init_std: float = 0.02
    out_init_std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    block_q: int = 64
    ops: Optional[Ops] = None   # GEMM + causal core (tfm_jax.layers.ops); None: XLA defaults

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, mask: Optional[jax.Array],
                 k_valid: Optional[jax.Array] = None,
                 rope_sincos: Optional[jax.Array] = None,
                 cache: Optional[kv_cache.LayerCache] = None, *, decode: bool = False):
        """x (B, T, d), positions (B, T) -> (B, T, d). ``rope_sincos``: precomputed
        :func:`rope_tables` of ``positions`` (computed here when not given).

        ``mask`` bool (B, T, T): general masked attention. ``mask=None``: causal self-attention
        over positions 0..T-1 with optional key padding ``k_valid`` (B, T), block-causal path.

        With a KV ``cache`` (:class:`~tfm_jax.layers.kv_cache.LayerCache`, inference) it returns
        ``(out, new_cache)``. Prefill (``decode=False``): the attention above over the prompt,
        and the K/V of all T tokens written at positions [0, T). Decode (``decode=True``,
        ``mask`` unused): the K/V of the T new tokens written at ``positions[:, 0]`` of each
        row, then the queries attend to the cache through ``ops.cached_attention``.
        """
        d = x.shape[-1]
        ops = resolve_ops(self.ops)

        def proj(heads, head_axis, name):
            return Linear((heads, self.head_dim), (axes.EMBED, head_axis, axes.HEAD_DIM),
                          init_std=self.init_std, dtype=self.dtype,
                          param_dtype=self.param_dtype, ops=ops, name=name)(x)

        q = proj(self.n_heads, axes.HEADS, "q_proj")                   # (B, T, H, Dh)
        k = proj(self.n_kv_heads, axes.KV_HEADS, "k_proj")             # (B, T, Hkv, Dh)
        v = proj(self.n_kv_heads, axes.KV_HEADS, "v_proj")             # (B, T, Hkv, Dh)
        q = nn.with_logical_constraint(q, (axes.BATCH, axes.LENGTH, axes.HEADS, axes.HEAD_DIM))
        k = nn.with_logical_constraint(k, (axes.BATCH, axes.LENGTH, axes.KV_HEADS, axes.HEAD_DIM))
        if rope_sincos is None:
            rope_sincos = rope_tables(positions, self.head_dim, self.rope_theta)
        q = apply_rope(q, rope_sincos)
        k = apply_rope(k, rope_sincos)
        if cache is not None:
            # prefill writes at 0 (one slice for all rows); decode at each row's length
            cache = kv_cache.write(cache, k, v, positions[:, 0] if decode else None)
            cache = kv_cache.constrain(cache, kv_cache.layer_logical_axes(cache))
        if cache is not None and decode:
            out = ops.cached_attention(q, cache.k, cache.v, positions, cache.k_scale,
                                       cache.v_scale)                          # (B, T, H, Dh)
        elif mask is None:
            out = ops.causal_attention(q, k, v, k_valid, block_q=self.block_q)  # (B,T,H,Dh)
        else:
            out = grouped_attention(q, k, v, mask)                          # (B, T, H, Dh)
        out = nn.with_logical_constraint(out, (axes.BATCH, axes.LENGTH, axes.HEADS,
                                               axes.HEAD_DIM))
        out = Linear(d, (axes.HEADS, axes.HEAD_DIM, axes.EMBED), in_axes=2,
                     init_std=self.out_init_std, dtype=self.dtype, param_dtype=self.param_dtype,
                     ops=ops, name="o_proj")(out)
        return out if cache is None else (out, cache)
