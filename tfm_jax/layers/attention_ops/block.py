"""Block-causal self-attention (the XLA:CPU core of the ``cpu-xla`` ops): the query axis is cut
into blocks and block i reads keys [0, end_i) only, so the masked half of the score matrix is
never computed."""

from __future__ import annotations

from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from tfm_jax.layers.attention_ops.dense import NEG_INF, zero_keyless_rows

# --------------------------------------------------------------------------------------------
# Training/prefill fast path: causal self-attention over positions 0..T-1, block-causal.
#
# The query axis is cut into blocks of ``block_q``; block i attends keys [0, end_i) only, so the
# upper-right blocks of the T x T score matrix (masked anyway) are never computed: ~(1 + 1/nb)/2
# of the full work. Each block is an exact softmax over its own key range (no online rescaling
# needed), and its score tile is small enough to stay in cache. The core has a hand-written VJP
# (FlashAttention's): dS = P * (dP - rowsum(dO * O)), which reads the probabilities once instead
# of the several passes autodiff of softmax makes.


def _block_core_fwd(qh, kh, vh, k_valid, q_start, group, q_seg=None):
    """qh (B, K, G*bq, D) already scaled by 1/sqrt(D), rows ordered (g, t); kh, vh (B, K, S, D);
    k_valid (B, S) float 1/0 -- or, with ``q_seg`` (B, bq) float segment ids of the block's
    queries, the keys' segment ids (-1: padding): a query sees keys of its own segment only.
    Query row t sits at absolute position q_start + t.

    Returns the output and the unnormalised probabilities ``e = exp(s - max)`` with their row
    sums ``l``: normalising the (rows, D) output instead of the (rows, S) tile saves a pass.
    """
    rows, keys = qh.shape[2], kh.shape[2]
    bq = rows // group
    t = q_start + jax.lax.broadcasted_iota(jnp.int32, (rows, keys), 0) % bq
    s_idx = jax.lax.broadcasted_iota(jnp.int32, (rows, keys), 1)
    if q_seg is None:
        allowed = (s_idx <= t)[None, None] & (k_valid[:, None, None, :] > 0)
    else:
        rows_seg = jnp.tile(q_seg, (1, group))                                # (B, G*bq)
        allowed = (s_idx <= t)[None, None] & (
            rows_seg[:, None, :, None] == k_valid[:, None, None, :])
    s = jnp.einsum("bkmd,bksd->bkms", qh, kh, preferred_element_type=jnp.float32)
    s = jnp.where(allowed, s, NEG_INF)
    e = jnp.exp(s - s.max(-1, keepdims=True))                                 # (B, K, M, S)
    l = e.sum(-1, keepdims=True)                                              # (B, K, M, 1)
    o = jnp.einsum("bkms,bksd->bkmd", e.astype(vh.dtype), vh,
                   preferred_element_type=jnp.float32) / l
    return o.astype(vh.dtype), e, l


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _block_core(qh, kh, vh, k_valid, q_start, group, q_seg=None):
    return _block_core_fwd(qh, kh, vh, k_valid, q_start, group, q_seg)[0]


def _block_core_vjp_fwd(qh, kh, vh, k_valid, q_start, group, q_seg=None):
    o, e, l = _block_core_fwd(qh, kh, vh, k_valid, q_start, group, q_seg)
    return o, (qh, kh, vh, k_valid, q_seg, o, e, l)


def _block_core_vjp_bwd(q_start, group, res, do):
    # With P = E / l:  dV = P^T dO = E^T (dO / l);  dS = P * (dP - rowsum(dO * O)), dP = dO V^T.
    qh, kh, vh, k_valid, q_seg, o, e, l = res
    f32 = jnp.float32
    inv_l = 1.0 / l
    do32 = do.astype(f32)
    dv = jnp.einsum("bkms,bkmd->bksd", e.astype(do.dtype), (do32 * inv_l).astype(do.dtype))
    dp = jnp.einsum("bkmd,bksd->bkms", do, vh, preferred_element_type=f32)
    delta = jnp.sum(do32 * o.astype(f32), -1, keepdims=True)
    ds = (e * inv_l * (dp - delta)).astype(qh.dtype)
    dq = jnp.einsum("bkms,bksd->bkmd", ds, kh)
    dk = jnp.einsum("bkms,bkmd->bksd", ds, qh)
    return (dq, dk, dv, jnp.zeros_like(k_valid),
            None if q_seg is None else jnp.zeros_like(q_seg))


_block_core.defvjp(_block_core_vjp_fwd, _block_core_vjp_bwd)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                     k_valid: Optional[jax.Array] = None, *, block_q: int = 64,
                     segment_ids: Optional[jax.Array] = None) -> jax.Array:
    """Causal self-attention for positions 0..T-1 (+ optional key padding), block-causal.

    q: (B, T, H, D); k, v: (B, T, Hkv, D); k_valid: (B, T) or None; segment_ids: (B, T) int or
    None (packed documents: a query sees only keys of its own segment). Returns (B, T, H, D).
    Same result as ``grouped_attention`` with ``make_attention_mask(arange, arange, k_valid,
    segment_ids, segment_ids)``.
    """
    b, t, h, d = q.shape
    given_valid = k_valid
    hkv = k.shape[2]
    g = h // hkv
    scale = jnp.asarray(1.0 / np.sqrt(d), q.dtype)
    qh = (q * scale).reshape(b, t, hkv, g, d).transpose(0, 2, 3, 1, 4)     # (B, K, G, T, D)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)              # (B, K, T, D)
    k_valid = (jnp.ones((b, t), jnp.float32) if k_valid is None
               else k_valid.astype(jnp.float32))
    q_seg = None
    if segment_ids is not None:      # keys carry their segment id (-1: padding), queries theirs
        q_seg = segment_ids.astype(jnp.float32)
        k_valid = jnp.where(k_valid > 0, q_seg, -1.0)
    outs = []
    for start in range(0, t, block_q):
        end = min(start + block_q, t)
        qb = qh[:, :, :, start:end].reshape(b, hkv, g * (end - start), d)   # rows (g, t)
        ob = _block_core(qb, kh[:, :, :end], vh[:, :, :end], k_valid[:, :end], start, g,
                         None if q_seg is None else q_seg[:, start:end])
        outs.append(ob.reshape(b, hkv, g, end - start, d))
    o = jnp.concatenate(outs, axis=3) if len(outs) > 1 else outs[0]         # (B, K, G, T, D)
    return zero_keyless_rows(o.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d), given_valid,
                             segment_ids)
