"""Decode attention read from the page pools in place (no gathered copy of each row's pages).

:func:`pallas_paged_attention` runs jax's Pallas paged-attention kernel
(``jax.experimental.pallas.ops.gpu.paged_attention``: Triton on NVIDIA GPUs) on the head-major
pools of :class:`~tfm_jax.layers.paged_cache.PagedLayerCache`: one query per row (a decode step),
grouped-query heads, a row's keys at positions ``< length``, the key pages split over
``k_splits`` partitions combined by their softmax statistics (flash-decoding). The kernel takes
no softmax scale, so the queries are scaled by ``1/sqrt(D)`` first. ``interpret=True`` runs the
same kernel through Pallas' interpreter on any backend -- how it is tested on CPU against the
gather path (``tests/unit/serve/test_paged_kernel.py``). Quantized (int8 / fp8) pools stay on
the gather path: the kernel's scales are per-token dequantization factors of another layout.

jax 0.12 removed its Triton example kernels, this one included: :func:`unavailable` says so, and
``backend.paged_attention=auto`` then gathers (with the reason in the ``kernels:`` line).
"""

from __future__ import annotations

import functools
import importlib
import math
from typing import Optional

import jax
import jax.numpy as jnp

BLOCK_H = 16                 # query heads per kernel block (the kernel pads a group to it)
MAX_K_SPLITS = 16            # partitions of a row's pages (flash-decoding)
MAX_PAGES_PER_BLOCK = 8      # pages per inner compute block


def unavailable() -> Optional[str]:
    """Why this jax has no Pallas GPU paged-attention kernel (None: it has one)."""
    try:
        importlib.import_module("jax.experimental.pallas.ops.gpu.paged_attention")
    except ImportError:
        return (f"jax {jax.__version__} does not ship jax.experimental.pallas.ops.gpu."
                "paged_attention (jax 0.12 removed its Triton example kernels)")
    return None


def _divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def split_plan(pages_per_seq: int) -> tuple[int, int]:
    """(k_splits, pages_per_compute_block) for a block table of ``pages_per_seq`` entries: the
    kernel needs ``pages_per_seq % k_splits == 0`` and the partition a multiple of the block."""
    k_splits = _divisor_at_most(pages_per_seq, MAX_K_SPLITS)
    return k_splits, _divisor_at_most(pages_per_seq // k_splits, MAX_PAGES_PER_BLOCK)


def unsupported(head_dim: int, page_size: int, pages_per_seq: int) -> Optional[str]:
    """Why the compiled (Triton) kernel cannot take these shapes (None: it can): its dots need
    at least 16 keys per compute block and a head_dim that is a multiple of 16."""
    per_block = split_plan(pages_per_seq)[1]
    if head_dim % 16:
        return f"head_dim {head_dim} is not a multiple of 16"
    if page_size * per_block < 16:
        return (f"{page_size} x {per_block} pages = {page_size * per_block} keys per compute "
                "block, fewer than 16 (raise the page size)")
    return None


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
    if not interpret and unsupported(d, layer.page_size, layer.block_table.shape[-1]):
        return None
    from jax.experimental.pallas.ops.gpu import paged_attention as pa

    k_splits, per_block = split_plan(layer.block_table.shape[-1])
    lengths = q_positions[:, 0].astype(jnp.int32) + 1
    qs = (q[:, 0].astype(jnp.float32) / math.sqrt(d)).astype(layer.k.dtype)      # (B, H, D)
    out = pa.paged_attention(qs, layer.k, layer.v, layer.block_table.astype(jnp.int32),
                             lengths, block_h=BLOCK_H, pages_per_compute_block=per_block,
                             k_splits=k_splits, interpret=interpret)
    return out[:, None].astype(q.dtype)


@functools.lru_cache(maxsize=None)
def kernel(interpret: bool = False):
    """The ``Ops.paged_attention`` callable (hashable, cached: ops sets are module attributes)."""
    return functools.partial(pallas_paged_attention, interpret=interpret)
