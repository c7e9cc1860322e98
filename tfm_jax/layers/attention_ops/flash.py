"""Long-context causal attention cores: key-tiled online softmax (flash-style) in pure JAX, and
``jax.nn.dot_product_attention`` (XLA or cuDNN) behind the same contract.

Every core here has the contract of :func:`tfm_jax.layers.attention_ops.block.causal_attention`:
``fn(q (B, T, H, D), k (B, T, Hkv, D), v (B, T, Hkv, D), k_valid (B, T) or None, *, block_q)
-> (B, T, H, D)``, self-attention over positions 0..T-1 with optional key padding, grouped K/V
never repeated. ``backend.attention`` picks one (:func:`tfm_jax.platform.backends.resolve_ops`).

:func:`flash_attention` (FlashAttention-2, Dao 2023, written with ``lax`` loops):

* forward: for each query block (``lax.map``), a ``fori_loop`` over only the key blocks at or
  below the diagonal keeps a running row max ``m``, row sum ``l`` and output accumulator;
  one (G*bq, bk) score tile per (batch, kv head) is live at a time. It stores the output and
  the log-sum-exp ``lse = m + log l`` per row -- O(T) -- and nothing of size T x T;
* backward (custom VJP): for each key block (``lax.scan``), a ``fori_loop`` over the query
  blocks at or below the diagonal recomputes ``P = exp(S - lse)`` from the saved ``lse`` and
  accumulates ``dV += P^T dO``, ``dK += dS^T Q``, ``dQ += dS K`` (dQ carried whole, O(T D);
  score tiles kept keys-first, so the fp32 GEMMs never transpose one),
  with ``dS = P * (dP - rowsum(dO * O))``, ``dP = dO V^T``.

Loop trip counts depend on the block index, so the compiled program is the same for any T
(only shapes change) and the masked upper triangle is never computed. T is padded up to a
multiple of the blocks internally (the padded keys masked, the padded queries dropped).
Scores, softmax statistics and accumulators are float32 whatever the input dtype.

Rows with no valid key at all (``k_valid[b, 0] == 0``) get a finite average of the values they
visited, as in the other cores; only a row's valid output is meaningful.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from tfm_jax.layers.attention_ops.dense import zero_keyless_rows

NEG_INF = -1e30   # finite (as in tfm_jax.layers.attention): masked tiles never produce NaN

# CPU defaults (benchmarks/long_context.py, T = 2k..8k, B=1, H=8, Hkv=2, D=32): the key block
# sets the loop's trip count, the query block the tile height. The model passes its own block_q
# (model.attn_block_q).
DEFAULT_BLOCK_Q = 128
DEFAULT_BLOCK_K = 256


def flash_blocks(t: int, block_q: int, block_k: int) -> tuple[int, int, int]:
    """(block_q, block_k, padded T) for a sequence of ``t``: one block divides the other;
    a sequence no longer than both blocks is one block of ``t`` (no padding), otherwise T is
    padded up to a multiple of the larger block."""
    if block_q < 1 or block_k < 1:
        raise ValueError(f"flash attention: block_q={block_q} and block_k={block_k} must be "
                         ">= 1 (e.g. 128 and 256)")
    if max(block_q, block_k) % min(block_q, block_k):
        raise ValueError(f"flash attention: block_q={block_q} and block_k={block_k}: one must "
                         f"divide the other (e.g. 128 and 256)")
    if t <= min(block_q, block_k):
        return t, t, t
    if t <= max(block_q, block_k):          # one block of the larger size, several of the other
        big = -(-t // min(block_q, block_k)) * min(block_q, block_k)
        return min(block_q, big), min(block_k, big), big
    big = max(block_q, block_k)
    return block_q, block_k, -(-t // big) * big


def _tile_scores(q_blk, k_blk, valid_blk, q0, k0, scale, qseg_blk=None):
    """Masked float32 scores of one tile: q_blk (B, K, G, bq, D), k_blk (B, K, bk, D),
    valid_blk (B, bk) bool -- or, with ``qseg_blk`` (B, bq) int (the queries' segment ids), the
    keys' segment ids (-1: padding); the tile's first query/key positions q0/k0
    -> (B, K, G, bq, bk)."""
    bq, bk = q_blk.shape[3], k_blk.shape[2]
    s = jnp.einsum("bkgqd,bksd->bkgqs", q_blk, k_blk,
                   preferred_element_type=jnp.float32) * scale
    qpos = q0 + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    kpos = k0 + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    if qseg_blk is None:
        allowed = (kpos <= qpos)[None, None, None] & valid_blk[:, None, None, None, :]
    else:
        same = qseg_blk[:, :, None] == valid_blk[:, None, :]                   # (B, bq, bk)
        allowed = (kpos <= qpos)[None, None, None] & same[:, None, None]
    return jnp.where(allowed, s, NEG_INF)


def _tile_scores_t(q_blk, k_blk, valid_blk, q0, k0, scale, qseg_blk=None):
    """:func:`_tile_scores` transposed, keys first: (B, K, bk, G, bq)."""
    bq, bk = q_blk.shape[3], k_blk.shape[2]
    s = jnp.einsum("bksd,bkgqd->bksgq", k_blk, q_blk,
                   preferred_element_type=jnp.float32) * scale
    kpos = k0 + lax.broadcasted_iota(jnp.int32, (bk, bq), 0)
    qpos = q0 + lax.broadcasted_iota(jnp.int32, (bk, bq), 1)
    if qseg_blk is None:
        allowed = (kpos <= qpos)[None, None, :, None, :] & valid_blk[:, None, :, None, None]
    else:
        same = valid_blk[:, :, None] == qseg_blk[:, None, :]                   # (B, bk, bq)
        allowed = (kpos <= qpos)[None, None, :, None, :] & same[:, None, :, None, :]
    return jnp.where(allowed, s, NEG_INF)


def _dq_tile(ds_t, k_blk):
    """dQ of one tile, float32: dS (keys first, (B, K, bk, G, bq)) times K (B, K, bk, D) ->
    (B, K, G, bq, D). In float32 it is computed as (K^T dS)^T, which leaves the big tile
    untransposed (faster on XLA:CPU in an interleaved A/B at T=4k); other dtypes contract the tile
    directly, because XLA:CPU in jax 0.12 has no bf16 x bf16 -> f32 kernel for the first form."""
    if ds_t.dtype == jnp.float32 and k_blk.dtype == jnp.float32:
        dq_t = jnp.einsum("bksd,bksgq->bkdgq", k_blk, ds_t)                    # (B,K,D,G,bq)
        return jnp.moveaxis(dq_t, 2, -1)
    return jnp.einsum("bksgq,bksd->bkgqd", ds_t, k_blk, preferred_element_type=jnp.float32)


def _at(x, i):
    """Block ``i`` (traced) of a block-major array: a dynamic slice of the leading axis."""
    return lax.dynamic_index_in_dim(x, i, 0, keepdims=False)


def _to_q_blocks(x, nq, bq):
    """(B, Tp, K, G, ...) -> (nq, B, K, G, bq, ...): block-major, contiguous per block."""
    b, tp, kh, g = x.shape[:4]
    rest = x.shape[4:]
    x = x.reshape(b, nq, bq, kh, g, *rest)
    return jnp.moveaxis(x, (1, 2), (0, 4))


def _from_q_blocks(x):
    """Inverse of :func:`_to_q_blocks`: (nq, B, K, G, bq, ...) -> (B, Tp, K, G, ...)."""
    nq, b, kh, g, bq = x.shape[:5]
    x = jnp.moveaxis(x, (0, 4), (1, 2))
    return x.reshape(b, nq * bq, kh, g, *x.shape[5:])


def _to_k_blocks(x, nk, bk):
    """(B, Tp, K, D) -> (nk, B, K, bk, D); (B, Tp) -> (nk, B, bk)."""
    b, tp = x.shape[:2]
    x = x.reshape(b, nk, bk, *x.shape[2:])
    return jnp.moveaxis(x, (1, 2), (0, -2)) if x.ndim == 5 else jnp.moveaxis(x, 1, 0)


def _flash_fwd(q, k, v, valid, bq, bk, qseg=None):
    """q (B, Tp, K, G, D), k/v (B, Tp, K, D), valid (B, Tp) bool (or, with ``qseg`` (B, Tp) int,
    the keys' segment ids, -1 padding) -> o (B, Tp, K, G, D) in q's dtype, lse (B, Tp, K, G)
    float32."""
    b, tp, kh, g, d = q.shape
    nq, nk = tp // bq, tp // bk
    scale = np.float32(1.0 / np.sqrt(d))
    qb = _to_q_blocks(q, nq, bq)                         # (nq, B, K, G, bq, D)
    kb, vb = _to_k_blocks(k, nk, bk), _to_k_blocks(v, nk, bk)   # (nk, B, K, bk, D)
    validb = _to_k_blocks(valid, nk, bk)                 # (nk, B, bk)
    qsegb = None if qseg is None else _to_k_blocks(qseg, nq, bq)   # (nq, B, bq)

    def q_block(args):
        i, q_i = args
        q0 = i * bq
        qseg_i = None if qsegb is None else _at(qsegb, i)

        def body(j, carry):
            m, l, acc = carry                            # (B,K,G,bq), same, (B,K,G,bq,D)
            k_j, v_j, valid_j = (_at(x, j) for x in (kb, vb, validb))
            s = _tile_scores(q_i, k_j, valid_j, q0, j * bk, scale, qseg_i)
            m_new = jnp.maximum(m, s.max(-1))
            alpha = jnp.exp(m - m_new)
            p = jnp.exp(s - m_new[..., None])             # (B, K, G, bq, bk)
            l = alpha * l + p.sum(-1)
            pv = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(v.dtype), v_j,
                            preferred_element_type=jnp.float32)
            return m_new, l, alpha[..., None] * acc + pv

        shape = (b, kh, g, bq)
        init = (jnp.full(shape, NEG_INF, jnp.float32), jnp.zeros(shape, jnp.float32),
                jnp.zeros(shape + (d,), jnp.float32))
        n_keys = (q0 + bq + bk - 1) // bk                # key blocks at or below the diagonal
        m, l, acc = lax.fori_loop(0, n_keys, body, init)
        return (acc / l[..., None]).astype(q.dtype), m + jnp.log(l)

    ob, lseb = lax.map(q_block, (jnp.arange(nq, dtype=jnp.int32), qb))
    return _from_q_blocks(ob), _from_q_blocks(lseb)


def _flash_bwd(q, k, v, valid, o, lse, do, bq, bk, qseg=None):
    """Gradients wrt q (B, Tp, K, G, D), k and v (B, Tp, K, D), recomputing score tiles."""
    b, tp, kh, g, d = q.shape
    nq, nk = tp // bq, tp // bk
    scale = np.float32(1.0 / np.sqrt(d))
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), -1)  # (B, Tp, K, G)
    qb, dob = _to_q_blocks(q, nq, bq), _to_q_blocks(do, nq, bq)   # (nq, B, K, G, bq, D)
    lseb, deltab = _to_q_blocks(lse, nq, bq), _to_q_blocks(delta, nq, bq)   # (nq, B,K,G,bq)
    kb, vb = _to_k_blocks(k, nk, bk), _to_k_blocks(v, nk, bk)     # (nk, B, K, bk, D)
    validb = _to_k_blocks(valid, nk, bk)
    qsegb = None if qseg is None else _to_k_blocks(qseg, nq, bq)   # (nq, B, bq)

    def k_block(dq, args):
        j, k_j, v_j, valid_j = args
        k0 = j * bk

        def body(i, carry):
            # Tiles are kept transposed, (B, K, bk, G, bq): keys first, so that dV = P^T dO and
            # dK = dS^T Q are plain GEMMs and no (bk, G*bq) tile is transposed (see _dq_tile).
            dk, dv, dq = carry
            q_i, do_i, lse_i, delta_i = (_at(x, i) for x in (qb, dob, lseb, deltab))
            s_t = _tile_scores_t(q_i, k_j, valid_j, i * bq, k0, scale,
                                 None if qsegb is None else _at(qsegb, i))  # (B,K,bk,G,bq)
            p_t = jnp.exp(s_t - lse_i[:, :, None])      # P^T of the forward
            dv = dv + jnp.einsum("bksgq,bkgqd->bksd", p_t.astype(do.dtype), do_i,
                                 preferred_element_type=jnp.float32)
            dp_t = jnp.einsum("bksd,bkgqd->bksgq", v_j, do_i,
                              preferred_element_type=jnp.float32)
            ds_t = (p_t * (dp_t - delta_i[:, :, None]) * scale).astype(q.dtype)
            dk = dk + jnp.einsum("bksgq,bkgqd->bksd", ds_t, q_i,
                                 preferred_element_type=jnp.float32)
            dq_i = _dq_tile(ds_t, k_j)                                        # (B,K,G,bq,D)
            dq = lax.dynamic_update_index_in_dim(dq, _at(dq, i) + dq_i, i, 0)
            return dk, dv, dq

        zeros = jnp.zeros((b, kh, bk, d), jnp.float32)
        first_q = k0 // bq                               # query blocks at or below the diagonal
        dk, dv, dq = lax.fori_loop(first_q, nq, body, (zeros, zeros, dq))
        return dq, (dk.astype(k.dtype), dv.astype(v.dtype))

    dq0 = jnp.zeros((nq, b, kh, g, bq, d), jnp.float32)
    dqb, (dkb, dvb) = lax.scan(k_block, dq0, (jnp.arange(nk, dtype=jnp.int32), kb, vb, validb))
    dk = jnp.moveaxis(dkb, (0, 3), (1, 2)).reshape(b, tp, kh, d)
    dv = jnp.moveaxis(dvb, (0, 3), (1, 2)).reshape(b, tp, kh, d)
    return _from_q_blocks(dqb).astype(q.dtype), dk, dv


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash_core(q, k, v, valid, bq, bk, qseg=None):
    return _flash_fwd(q, k, v, valid, bq, bk, qseg)[0]


def _flash_core_fwd(q, k, v, valid, bq, bk, qseg=None):
    o, lse = _flash_fwd(q, k, v, valid, bq, bk, qseg)
    return o, (q, k, v, valid, qseg, o, lse)   # all O(T): inputs, output, one float per row


def _flash_core_bwd(bq, bk, res, do):
    q, k, v, valid, qseg, o, lse = res
    dq, dk, dv = _flash_bwd(q, k, v, valid, o, lse, do, bq, bk, qseg)
    return dq, dk, dv, None, None


_flash_core.defvjp(_flash_core_fwd, _flash_core_bwd)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                    k_valid: Optional[jax.Array] = None, *, block_q: int = DEFAULT_BLOCK_Q,
                    block_k: int = DEFAULT_BLOCK_K,
                    segment_ids: Optional[jax.Array] = None) -> jax.Array:
    """Causal self-attention for positions 0..T-1 (+ optional key padding), key-tiled online
    softmax with a FlashAttention-2 backward: memory O(T * block) both ways.

    q: (B, T, H, D); k, v: (B, T, Hkv, D); k_valid: (B, T) (nonzero = valid) or None.
    Returns (B, T, H, D). Same result as ``grouped_attention`` with
    ``make_attention_mask(arange, arange, k_valid, segment_ids, segment_ids)``; ``segment_ids``
    (B, T) int or None: packed documents, a query sees only keys of its own segment.
    ``block_q``/``block_k``: query/key tile (one must divide the other); any T works (padded
    internally).
    """
    b, t, h, d = q.shape
    if k.shape != v.shape or k.shape[:2] != (b, t) or k.shape[3] != d:
        raise ValueError(f"flash attention: k {k.shape} and v {v.shape} must both be "
                         f"(B, T, Hkv, D) = ({b}, {t}, Hkv, {d}) for q {q.shape}")
    hkv = k.shape[2]
    if h % hkv:
        raise ValueError(f"{h} query heads are not a multiple of {hkv} kv heads")
    if k_valid is not None and k_valid.shape != (b, t):
        raise ValueError(f"flash attention: k_valid {k_valid.shape} must be (B, T) = ({b}, {t})")
    bq, bk, tp = flash_blocks(t, block_q, block_k)
    valid = jnp.ones((b, t), bool) if k_valid is None else k_valid.astype(bool)
    qseg = None
    if segment_ids is not None:      # keys carry their segment id (-1: padding), queries theirs
        qseg = segment_ids.astype(jnp.int32)
        valid = jnp.where(valid, qseg, -1)
    qg = q.reshape(b, t, hkv, h // hkv, d)                                   # (B, T, K, G, D)
    if tp != t:
        pad = ((0, 0), (0, tp - t))
        qg = jnp.pad(qg, pad + ((0, 0),) * 3)
        k, v = (jnp.pad(x, pad + ((0, 0),) * 2) for x in (k, v))
        # padded keys invalid (False / segment -1), padded rows dropped
        valid = jnp.pad(valid, pad, constant_values=False if qseg is None else -1)
        qseg = None if qseg is None else jnp.pad(qseg, pad)
    o = _flash_core(qg, k, v, valid, bq, bk, qseg)                           # (B, Tp, K, G, D)
    return zero_keyless_rows(o[:, :t].reshape(b, t, h, d), k_valid, segment_ids)


# --------------------------------------------------------------------------------------------
# jax.nn.dot_product_attention behind the same contract.
#
# key padding maps onto it two ways (jax 0.10.2 and 0.12 alike, implementation="xla"):
# * ``mask`` (B, 1, 1, T) bool, combined with ``is_causal``: exact for any k_valid;
# * ``key_value_seq_lengths`` = number of valid keys per row: exact when every row's valid keys
#   are a prefix (right padding, what tfm_jax.data produces), wrong for holes.
# ``query_seq_lengths`` is never passed (it zeroes every padded query row; the cores zero only
# the rows without a valid key, :func:`zero_keyless_rows`). cuDNN turns a ``mask`` into a dense
# (T x T) bias, so it gets the lengths.


def xla_sdpa_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                       k_valid: Optional[jax.Array] = None, *, block_q: int = 0,
                       segment_ids: Optional[jax.Array] = None) -> jax.Array:
    """``jax.nn.dot_product_attention(..., is_causal=True, implementation="xla")`` with the
    key padding (and the segment ids of packed documents) as a boolean mask (exact for any
    ``k_valid``). Materialises the (T, T) scores; ``block_q`` is accepted and unused."""
    mask = None if k_valid is None else k_valid.astype(bool)[:, None, None, :]   # (B,1,1,T)
    if segment_ids is not None:
        same = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]      # (B,1,T,T)
        mask = same if mask is None else mask & same
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True,
                                       implementation="xla")
    return zero_keyless_rows(out, k_valid, segment_ids)


def sdpa_seq_lengths_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                               k_valid: Optional[jax.Array] = None, *, block_q: int = 0,
                               implementation: str = "cudnn",
                               segment_ids: Optional[jax.Array] = None) -> jax.Array:
    """``jax.nn.dot_product_attention(..., is_causal=True)`` with the key padding given as
    ``key_value_seq_lengths = k_valid.sum(-1)``: ``k_valid`` must be right-padded (each row's
    valid keys a prefix, as tfm_jax.data produces). cuDNN (GPU, bf16/fp16, head_dim a multiple
    of 8) by default; ``implementation="xla"`` runs the same call anywhere (tests)."""
    if segment_ids is not None:
        raise ValueError("the cuDNN attention core takes no segment ids (data.packing=segments); "
                         "use backend.attention=flash or xla_sdpa, or data.packing=concat")
    lengths = (None if k_valid is None
               else jnp.sum(k_valid.astype(bool), axis=-1, dtype=jnp.int32))         # (B,)
    out = jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                       key_value_seq_lengths=lengths,
                                       implementation=implementation)
    return zero_keyless_rows(out, k_valid)


cudnn_attention = partial(sdpa_seq_lengths_attention, implementation="cudnn")
cudnn_attention.__doc__ = ("cuDNN fused attention through ``jax.nn.dot_product_attention``; "
                           "see :func:`sdpa_seq_lengths_attention` (right-padded k_valid).")
