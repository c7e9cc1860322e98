"""A paged KV cache: fixed-size pages in one pool per layer, and a block table per sequence.

Per layer the pool holds keys and values ``(Hkv, num_pages, page_size, Dh)`` (after RoPE, as
:mod:`tfm_jax.layers.kv_cache`; head-major, the layout paged-attention kernels read) and,
quantized, their float32 scales ``(Hkv or 1, num_pages, page_size)``. Row ``b`` of a batch owns the pages ``block_table[b, :]``: its position ``p`` lives
at page ``block_table[b, p // page_size]``, slot ``p % page_size``. Pages of one sequence need
not be adjacent or ordered in the pool; a sequence's memory grows one page at a time, and pages
freed by a finished sequence go to the next one (the scheduler, :mod:`tfm_jax.serve.scheduler`,
owns the free list).

**Page 0 is the scratch page.** Block-table entries a row does not own point at page 0, and
writes to positions beyond the table go there too; nothing valid is ever stored in it, and the
attention never reads it as a valid key (a row's positions ``<= q_position`` all lie in pages it
owns). This lets a fixed-shape batch carry idle rows and right-padded chunks without branches.

The model sees a :class:`PagedLayerCache` where it would see a
:class:`~tfm_jax.layers.kv_cache.LayerCache` (``TransformerLM.__call__(..., cache=Cache(layers,
lengths))``, prefill and decode alike): writes scatter into the pool (:func:`write`), reads
gather the row's pages into a contiguous ``(B, pages_per_seq * page_size, Hkv, Dh)`` view
(:func:`gather`) that the ops set's ``cached_attention`` masks past each row's position -- the
gather-based path, exact on every backend. An ops set with a ``paged_attention`` kernel (the
GPU set: :func:`tfm_jax.layers.attention_ops.paged.pallas_paged_attention`) reads the pages in
place for one-token decode steps of unquantized pools instead. The block table is stored in every layer's cache
(with the leading layers axis when stacked for ``nn.scan``) so the layer sees it; it is a few
int32s per row.

Quantized pages (``int8`` / ``fp8``) use the package's multiplicative scale ``q = x * scale``,
``scale = qmax / amax`` per (token, head) or per token
(:func:`tfm_jax.layers.kv_cache.quantize_kv`).
"""

from __future__ import annotations

from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
from flax import struct

from tfm_jax.layers import kv_cache as kv

SCRATCH_PAGE = 0


@struct.dataclass
class PagedLayerCache:
    """One layer's page pool ``k``/``v`` (Hkv, N, page_size, Dh), the optional float32 scale
    pools (Hkv or 1, N, page_size), and ``block_table`` (B, pages_per_seq) int32 page ids --
    each with a leading layers axis when stacked for ``nn.scan``."""

    k: jax.Array
    v: jax.Array
    block_table: Optional[jax.Array]      # None: pools kept apart from any batch
    k_scale: Optional[jax.Array] = None
    v_scale: Optional[jax.Array] = None

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    @property
    def page_size(self) -> int:
        return self.k.shape[-2]


def init_pages(*, n_layers: int, num_pages: int, page_size: int, n_kv_heads: int,
               head_dim: int, dtype: Any = jnp.float32, kv_cache: str = "none",
               kv_scale: str = "per_token_head", stacked: bool = False,
               batch: int = 1, pages_per_seq: int = 1
               ) -> Union[PagedLayerCache, tuple[PagedLayerCache, ...]]:
    """Empty page pools (zeros, scales 1) for every layer, with a block table of ``batch``
    rows x ``pages_per_seq`` entries all pointing at the scratch page (replace it with
    :func:`with_block_table`). ``num_pages`` counts the scratch page."""
    if kv_cache not in kv.KV_FORMATS:
        raise ValueError(f"kv_cache={kv_cache!r}: choose one of {list(kv.KV_FORMATS)}")
    if kv_scale not in kv.KV_SCALES:
        raise ValueError(f"kv_scale={kv_scale!r}: choose one of {list(kv.KV_SCALES)}")
    if num_pages < 2 or page_size < 1:
        raise ValueError(f"a paged cache needs num_pages >= 2 (page 0 is scratch) and "
                         f"page_size >= 1, got {num_pages}, {page_size}")
    lead = (n_layers,) if stacked else ()
    shape = lead + (n_kv_heads, num_pages, page_size, head_dim)
    store = kv.QUANT_DTYPES.get(kv_cache, dtype)

    def layer():      # every array its own buffer: the pools are donated to the jitted steps
        k, v = jnp.zeros(shape, store), jnp.zeros(shape, store)
        table = jnp.full(lead + (batch, pages_per_seq), SCRATCH_PAGE, jnp.int32)
        if kv_cache == "none":
            return PagedLayerCache(k, v, table)
        s_shape = lead + (n_kv_heads if kv_scale == "per_token_head" else 1, num_pages, page_size)
        return PagedLayerCache(k, v, table, jnp.ones(s_shape, jnp.float32),
                               jnp.ones(s_shape, jnp.float32))

    return layer() if stacked else tuple(layer() for _ in range(n_layers))


def with_block_table(layers, block_table: Optional[jax.Array]):
    """The pools ``layers`` (stacked or a tuple) carrying ``block_table`` (B, pages_per_seq)
    int32 (broadcast over the layers axis when stacked); None: no table."""
    if block_table is None:
        layers_t = layers if isinstance(layers, tuple) else (layers,)
        out = tuple(layer.replace(block_table=None) for layer in layers_t)
        return out if isinstance(layers, tuple) else out[0]
    block_table = jnp.asarray(block_table, jnp.int32)
    if isinstance(layers, tuple):
        return tuple(layer.replace(block_table=block_table) for layer in layers)
    n_layers = layers.k.shape[0]
    return layers.replace(block_table=jnp.broadcast_to(block_table,
                                                       (n_layers,) + block_table.shape))


def _slots(block_table: jax.Array, page_size: int, start: Optional[jax.Array],
           t: int) -> tuple[jax.Array, jax.Array]:
    """(page id, slot in page) (B, T) of positions [start_b, start_b + T) of each row (``start``
    None: from 0); positions past the block table go to the scratch page."""
    b, n_pages = block_table.shape
    s = jnp.zeros((b,), jnp.int32) if start is None else start.astype(jnp.int32)
    pos = s[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]                   # (B, T)
    idx = pos // page_size
    page = jnp.take_along_axis(block_table, jnp.minimum(idx, n_pages - 1), axis=1)
    page = jnp.where(idx < n_pages, page, SCRATCH_PAGE)
    return page, pos % page_size


def _scatter(pool: jax.Array, new: jax.Array, page: jax.Array, slot: jax.Array) -> jax.Array:
    """``new`` (B, T, X, ...) into the head-major ``pool`` (X, N, page_size, ...) at (page, slot)
    (B, T)."""
    return pool.at[:, page, slot].set(jnp.moveaxis(new, 2, 0).astype(pool.dtype))


def write(layer: PagedLayerCache, k: jax.Array, v: jax.Array,
          start: Optional[jax.Array] = None) -> PagedLayerCache:
    """The layer's pages with k, v (B, T, Hkv, Dh) stored at positions [start_b, start_b + T)
    of each row (``start`` (B,) int32; None: at 0) through its block table, quantized if the
    pool is."""
    page, slot = _slots(layer.block_table, layer.page_size, start, k.shape[1])
    if not layer.quantized:
        return layer.replace(k=_scatter(layer.k, k, page, slot), v=_scatter(layer.v, v, page, slot))
    fmt = kv.kv_format_of(layer.k.dtype)
    per_head = layer.k_scale.shape[-3] == layer.k.shape[-4] and layer.k.shape[-4] > 1
    kq, ks = kv.quantize_kv(k, fmt, per_head)
    vq, vs = kv.quantize_kv(v, fmt, per_head)
    return layer.replace(k=_scatter(layer.k, kq, page, slot), v=_scatter(layer.v, vq, page, slot),
                         k_scale=_scatter(layer.k_scale, ks, page, slot),
                         v_scale=_scatter(layer.v_scale, vs, page, slot))


def gather(layer: PagedLayerCache) -> kv.LayerCache:
    """The contiguous view of each row's pages: a :class:`~tfm_jax.layers.kv_cache.LayerCache`
    (B, pages_per_seq * page_size, Hkv, Dh) (scales (B, S, Hkv or 1)); positions past a row's
    length hold stale or scratch values, which ``cached_attention`` masks."""
    table = layer.block_table

    def view(pool):
        g = jnp.moveaxis(pool[:, table], 0, 3)                    # (B, P, page, X, ...)
        return g.reshape(g.shape[0], g.shape[1] * g.shape[2], *g.shape[3:])

    if not layer.quantized:
        return kv.LayerCache(view(layer.k), view(layer.v))
    return kv.LayerCache(view(layer.k), view(layer.v), view(layer.k_scale), view(layer.v_scale))


def bytes_of_pages(layers) -> int:
    """Bytes of the page pools (keys, values and scales; block tables not counted)."""
    layers = layers if isinstance(layers, tuple) else (layers,)
    return int(sum(x.size * x.dtype.itemsize for layer in layers
                   for x in (layer.k, layer.v, layer.k_scale, layer.v_scale) if x is not None))


def bytes_per_page(*, n_layers: int, page_size: int, n_kv_heads: int, head_dim: int,
                   itemsize: int, kv_cache: str = "none",
                   kv_scale: str = "per_token_head") -> int:
    """Bytes one page costs over all layers: ``2 * layers * page_size * Hkv * Dh * itemsize``
    (+ the float32 scales when quantized) -- what a KV memory budget is divided by."""
    per = 2 * n_layers * page_size * n_kv_heads * head_dim * itemsize
    if kv_cache != "none":
        per += 2 * n_layers * page_size * (n_kv_heads if kv_scale == "per_token_head" else 1) * 4
    return per
