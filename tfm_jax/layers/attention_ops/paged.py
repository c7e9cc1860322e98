"""Decode attention read from the page pools in place (no gathered copy of each row's pages).

:func:`pallas_paged_attention` is a Pallas kernel (Triton backend on NVIDIA GPUs) over the
head-major pools of :class:`~tfm_jax.layers.paged_cache.PagedLayerCache`: one program per (row,
KV head) takes the row's query heads of that KV head (grouped-query attention: the group padded
to 16 rows, the smallest Triton dot), walks the row's block table one page at a time up to its
length and keeps an online softmax (running max, sum and weighted values in float32), so a
step reads only the pages each row owns. The kernel takes no softmax scale: the queries are
scaled by ``1/sqrt(D)`` first. ``interpret=True`` runs the same kernel through Pallas'
interpreter on any backend -- how it is tested on CPU against the gather path
(``tests/unit/serve/test_paged_kernel.py``).

Quantized (int8 / fp8) pools stay on the gather path, and so do shapes Triton cannot tile
(:func:`unsupported`: head_dim and page_size powers of two of at least 16).
"""

from __future__ import annotations

import functools
import importlib
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

MIN_DOT = 16                 # Triton's smallest dot tile
_MASKED = -1e30              # a finite "minus infinity": exp() of it is 0, never NaN


def unavailable() -> Optional[str]:
    """Why this jax cannot build the kernel (None: it can)."""
    for name in ("jax.experimental.pallas", "jax.experimental.pallas.triton"):
        try:
            importlib.import_module(name)
        except ImportError as err:
            return f"jax {jax.__version__} has no {name} ({err})"
    return None


def _pow2_at_least_16(n: int) -> bool:
    return n >= MIN_DOT and n & (n - 1) == 0


def unsupported(head_dim: int, page_size: int) -> Optional[str]:
    """Why the compiled (Triton) kernel cannot take these shapes (None: it can): its tiles are
    (group, head_dim) x (page_size, head_dim), each side a power of two of at least 16."""
    if not _pow2_at_least_16(head_dim):
        return f"head_dim {head_dim} is not a power of two >= 16"
    if not _pow2_at_least_16(page_size):
        return f"page_size {page_size} is not a power of two >= 16 (raise the page size)"
    return None


def _kernel(q_ref, k_ref, v_ref, table_ref, length_ref, o_ref, *, page_size: int):
    """One (row, KV head): q (G, D) against the row's pages of that head, positions < length."""
    q = q_ref[...].astype(jnp.float32)                                   # (G, D)
    g, d = q.shape
    length = length_ref[0]

    def page_step(j, carry):
        acc, top, total = carry
        page = table_ref[j]
        k = k_ref[page].astype(jnp.float32)                             # (P, D)
        v = v_ref[page].astype(jnp.float32)
        scores = jnp.dot(q, k.T)                                          # (G, P)
        pos = j * page_size + lax.broadcasted_iota(jnp.int32, (g, page_size), 1)
        scores = jnp.where(pos < length, scores, _MASKED)
        new_top = jnp.maximum(top, jnp.max(scores, axis=1))
        keep = jnp.exp(top - new_top)                                     # rescale the past
        probs = jnp.exp(scores - new_top[:, None])
        return (acc * keep[:, None] + jnp.dot(probs, v), new_top,
                total * keep + jnp.sum(probs, axis=1))

    start = (jnp.zeros((g, d), jnp.float32), jnp.full((g,), _MASKED, jnp.float32),
             jnp.zeros((g,), jnp.float32))
    acc, _, total = lax.fori_loop(0, (length + page_size - 1) // page_size, page_step, start)
    o_ref[...] = (acc / total[:, None]).astype(o_ref.dtype)


def paged_decode(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, block_table: jax.Array,
                 lengths: jax.Array, *, interpret: bool = False) -> jax.Array:
    """q (B, H, D), already scaled; pools (Hkv, N, P, D); block_table (B, pages_per_seq) int32;
    lengths (B,) int32 >= 1 (row b sees positions < lengths[b]) -> (B, H, D) in q's dtype."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt

    b, h, d = q.shape
    hkv, num_pages, page_size, _ = k_pages.shape
    group = h // hkv
    rows = max(MIN_DOT, 1 << (group - 1).bit_length())                    # power of two >= 16
    qg = q.reshape(b, hkv, group, d)
    if rows != group:
        qg = jnp.pad(qg, ((0, 0), (0, 0), (0, rows - group), (0, 0)))
    pool = pl.BlockSpec((None, num_pages, page_size, d), lambda i, j: (j, 0, 0, 0))
    out = pl.pallas_call(
        functools.partial(_kernel, page_size=page_size),
        grid=(b, hkv),
        in_specs=[pl.BlockSpec((None, None, rows, d), lambda i, j: (i, j, 0, 0)), pool, pool,
                  pl.BlockSpec((None, block_table.shape[1]), lambda i, j: (i, 0)),
                  pl.BlockSpec((1,), lambda i, j: (i,))],
        out_specs=pl.BlockSpec((None, None, rows, d), lambda i, j: (i, j, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((b, hkv, rows, d), q.dtype),
        compiler_params=plt.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret, name="tfm_paged_decode",
    )(qg, k_pages, v_pages, block_table.astype(jnp.int32), lengths.astype(jnp.int32))
    return out[:, :, :group].reshape(b, h, d)


def pallas_paged_attention(q: jax.Array, layer, q_positions: jax.Array, *,
                           interpret: bool = False) -> Optional[jax.Array]:
    """q (B, 1, H, D) at ``q_positions`` (B, 1) against ``layer``'s pages (the step's K/V
    already written; unquantized pools (Hkv, N, page_size, D), block table (B, P)) ->
    (B, 1, H, D) in q's dtype. Row b sees positions ``<= q_positions[b, 0]``. None (compiled,
    not interpreted) for shapes the kernel does not take (:func:`unsupported`): the caller
    gathers the pages instead."""
    b, t, h, d = q.shape
    if t != 1:
        raise ValueError(f"pallas_paged_attention takes one query per row, got {t}")
    if layer.quantized:
        raise ValueError("pallas_paged_attention reads unquantized pools only")
    if not interpret and unsupported(d, layer.page_size):
        return None
    lengths = q_positions[:, 0].astype(jnp.int32) + 1
    qs = (q[:, 0].astype(jnp.float32) / math.sqrt(d)).astype(layer.k.dtype)      # (B, H, D)
    out = paged_decode(qs, layer.k, layer.v, layer.block_table, lengths, interpret=interpret)
    return out[:, None].astype(q.dtype)


@functools.lru_cache(maxsize=None)
def kernel(interpret: bool = False):
    """The ``Ops.paged_attention`` callable (hashable, cached: ops sets are module attributes)."""
    return functools.partial(pallas_paged_attention, interpret=interpret)
