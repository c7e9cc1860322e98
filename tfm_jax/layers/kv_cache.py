"""The KV cache of autoregressive decoding: containers, quantized storage, writes, logical axes.

Per layer the cache holds keys and values ``(B, max_len, Hkv, Dh)`` (after RoPE, never repeated
per query head) and, for a quantized cache, their scales; one ``lengths`` (B,) int32 vector says
how many positions of each row are valid (the same for every layer, so it is kept once).

**An explicit pytree, not a Flax ``cache`` collection.** The cache is a :class:`Cache` the caller
creates (:func:`init_cache`), passes to ``TransformerLM.__call__(..., cache=...)`` and gets back
updated. Why:

* its shape belongs to the decode job (batch, ``max_len``, storage format), not to the model: it
  is built from the config without an init trace, and its exact size is known up front
  (:func:`bytes_of_cache`, equal to the KV-memory formula);
* it is an ordinary jit argument: donated, sharded by the same logical rule table as the params
  (:func:`logical_axes`), returned -- no ``mutable=["cache"]`` plumbing, and it can never end up
  in the params tree or a checkpoint;
* the mode is explicit in the call (train: no cache; prefill: ``cache``; decode: ``cache`` and
  ``decode=True``) instead of being implied by which collections are mutable;
* through ``nn.scan`` it is a scanned input/output with the same leading ``layers`` axis as the
  stacked params; unscanned it is a tuple with one :class:`LayerCache` per layer.

**Quantized storage** (``quant.kv_cache``): ``int8`` or ``fp8`` (e4m3, ``float8_e4m3fn``),
symmetric, with the package's multiplicative scale ``scale = qmax / amax`` (``q = x * scale``,
``x ~= q / scale``, as :mod:`tfm_jax.quant`) per (token, head) -- or per token across heads
(``quant.kv_scale: per_token``) -- stored as float32 next to the values. Quantization saturates:
values are clipped to ``[-qmax, qmax]`` before the cast (casting beyond the e4m3 range gives NaN,
an integer cast would wrap), so a value at exactly +-amax maps to +-qmax. Rows whose amax is 0
(or not finite) get scale 1 and quantized zeros. Reads dequantize inside the attention op
(:func:`tfm_jax.layers.attention_ops.dense.cached_attention` folds the inverse scales into scores
and probabilities, so no dequantized copy of the cache is made).
"""

from __future__ import annotations

from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import ml_dtypes
from flax import linen as nn
from flax import struct
from jax.sharding import PartitionSpec as P

from tfm_jax.parallel import axes

# Storage formats: quant.kv_cache -> (storage dtype, qmax). "none" stores the compute dtype.
KV_FORMATS = ("none", "int8", "fp8")
KV_SCALES = ("per_token_head", "per_token")
QUANT_DTYPES = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}
QMAX = {"int8": 127.0, "fp8": float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)}   # 448.0


# --------------------------------------------------------------------------------------------
# Pure numerics: symmetric per-token(-head) quantization.


def kv_format_of(dtype: Any) -> str:
    """The storage format of a cache array's dtype: ``int8``, ``fp8`` or ``none``."""
    for fmt, dt in QUANT_DTYPES.items():
        if jnp.dtype(dtype) == jnp.dtype(dt):
            return fmt
    return "none"


def kv_scale(x: jax.Array, fmt: str, per_head: bool = True) -> jax.Array:
    """Symmetric multiplicative scale ``qmax / amax`` of x (..., Hkv, D) -> (..., Hkv) float32
    per (token, head), or (..., 1) per token across heads (``per_head=False``); 1 where amax is
    0 or the quotient is not finite."""
    a = jnp.abs(x.astype(jnp.float32))
    amax = a.max(axis=-1) if per_head else a.max(axis=(-2, -1))[..., None]
    scale = jnp.float32(QMAX[fmt]) / amax
    return jnp.where(jnp.isfinite(scale) & (amax > 0), scale, jnp.float32(1.0))


def quantize_kv(x: jax.Array, fmt: str, per_head: bool = True) -> tuple[jax.Array, jax.Array]:
    """x (..., Hkv, D) -> (values in the ``fmt`` dtype, scales (..., Hkv or 1) float32).

    ``q = cast(clip(x * scale, -qmax, qmax))`` with round-to-nearest(-even) for int8 and the
    cast's own round-to-nearest-even for e4m3. Clipping first makes it saturating: rounding of
    ``amax * (qmax / amax)`` can land just above qmax, which must not wrap (int8) or become NaN
    (e4m3 has no infinity). A zero row has scale 1 and quantizes to zeros.
    """
    if fmt not in QUANT_DTYPES:
        raise ValueError(f"KV-cache format {fmt!r}: quantized formats are {list(QUANT_DTYPES)}")
    scale = kv_scale(x, fmt, per_head)
    y = jnp.clip(x.astype(jnp.float32) * scale[..., None], -QMAX[fmt], QMAX[fmt])
    if fmt == "int8":
        y = jnp.round(y)
    return y.astype(QUANT_DTYPES[fmt]), scale


def dequantize_kv(q: jax.Array, scale: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """Inverse of :func:`quantize_kv`: q (..., Hkv, D) / scale (..., Hkv or 1) -> ``dtype``."""
    return (q.astype(jnp.float32) / scale[..., None]).astype(dtype)


# --------------------------------------------------------------------------------------------
# Containers.


@struct.dataclass
class LayerCache:
    """One layer's keys/values (B, S, Hkv, Dh) -- with a leading layers axis when stacked for
    ``nn.scan`` -- and, when quantized, their float32 scales (B, S, Hkv) or (B, S, 1)."""

    k: jax.Array
    v: jax.Array
    k_scale: Optional[jax.Array] = None
    v_scale: Optional[jax.Array] = None

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None


@struct.dataclass
class Cache:
    """The whole model's cache: ``layers`` (one stacked :class:`LayerCache` for scanned layers,
    else a tuple of them) and ``lengths`` (B,) int32, valid positions per row."""

    layers: Union[LayerCache, tuple[LayerCache, ...]]
    lengths: jax.Array


def init_cache(*, n_layers: int, batch: int, max_len: int, n_kv_heads: int, head_dim: int,
               dtype: Any = jnp.float32, kv_cache: str = "none",
               kv_scale: str = "per_token_head", stacked: bool = False) -> Cache:
    """An empty cache (zeros, scales 1, lengths 0). ``dtype``: storage of an unquantized cache (the
    model's compute dtype); ``kv_cache``/``kv_scale``: quantized storage (module docstring);
    ``stacked``: one LayerCache with a leading ``n_layers`` axis (``model.scan_layers``)."""
    if kv_cache not in KV_FORMATS:
        raise ValueError(f"kv_cache={kv_cache!r}: choose one of {list(KV_FORMATS)}")
    if kv_scale not in KV_SCALES:
        raise ValueError(f"kv_scale={kv_scale!r}: choose one of {list(KV_SCALES)}")
    if batch < 1 or max_len < 1:
        raise ValueError(f"KV cache needs batch >= 1 and max_len >= 1, got {batch}, {max_len}")
    lead = (n_layers,) if stacked else ()
    shape = lead + (batch, max_len, n_kv_heads, head_dim)
    store = QUANT_DTYPES.get(kv_cache, dtype)

    def layer():
        k, v = jnp.zeros(shape, store), jnp.zeros(shape, store)
        if kv_cache == "none":
            return LayerCache(k, v)
        s_shape = lead + (batch, max_len, n_kv_heads if kv_scale == "per_token_head" else 1)
        ones = jnp.ones(s_shape, jnp.float32)     # (multiplicative: empty slots divide by 1)
        return LayerCache(k, v, ones, ones)

    layers = layer() if stacked else tuple(layer() for _ in range(n_layers))
    return Cache(layers, jnp.zeros((batch,), jnp.int32))


def _write_rows(buf: jax.Array, new: jax.Array, start: Optional[jax.Array]) -> jax.Array:
    """buf (B, S, ...) with new (B, T, ...) written at positions [start_b, start_b + T) of each
    row; ``start`` None: at 0 for every row. The caller keeps start_b + T <= S (a write past
    the end would be clamped by ``dynamic_update_slice``, i.e. land at the wrong position)."""
    new = new.astype(buf.dtype)
    if start is None:
        return jax.lax.dynamic_update_slice_in_dim(buf, new, 0, axis=1)
    return jax.vmap(lambda b, n, s: jax.lax.dynamic_update_slice_in_dim(b, n, s, axis=0))(
        buf, new, start)


def write(layer: LayerCache, k: jax.Array, v: jax.Array,
          start: Optional[jax.Array] = None) -> LayerCache:
    """The layer's cache with k, v (B, T, Hkv, Dh) stored at positions [start_b, start_b + T)
    of each row (``start`` (B,) int32; None: at 0), quantized if the cache is."""
    if not layer.quantized:
        return layer.replace(k=_write_rows(layer.k, k, start), v=_write_rows(layer.v, v, start))
    fmt = kv_format_of(layer.k.dtype)
    per_head = _per_head(layer)
    kq, ks = quantize_kv(k, fmt, per_head)
    vq, vs = quantize_kv(v, fmt, per_head)
    return LayerCache(_write_rows(layer.k, kq, start), _write_rows(layer.v, vq, start),
                      _write_rows(layer.k_scale, ks, start), _write_rows(layer.v_scale, vs, start))


# --------------------------------------------------------------------------------------------
# Size and sharding.


def bytes_of_cache(cache: Cache) -> int:
    """Bytes allocated for keys, values and scales (the per-row ``lengths`` are not counted):
    ``2 * layers * B * max_len * Hkv * Dh * bytes`` plus, quantized,
    ``2 * layers * B * max_len * (Hkv or 1) * 4``."""
    layers = cache.layers if isinstance(cache.layers, tuple) else (cache.layers,)
    return int(sum(x.size * x.dtype.itemsize for layer in layers for x in jax.tree.leaves(layer)))


# The logical names the cache uses (each needs a rule in mesh.rules; defaults in
# tfm_jax.config.DEFAULT_RULES).
CACHE_KV = (axes.CACHE_BATCH, axes.CACHE_LENGTH, axes.KV_HEADS, axes.HEAD_DIM)
CACHE_NAMES = (axes.CACHE_BATCH, axes.CACHE_LENGTH, axes.KV_HEADS, axes.HEAD_DIM, axes.LAYERS)


def _per_head(layer: LayerCache) -> bool:
    return layer.k_scale.shape[-1] == layer.k.shape[-2] and layer.k.shape[-2] > 1


def layer_logical_axes(layer: LayerCache, lead: tuple = ()) -> LayerCache:
    """Logical PartitionSpecs of one layer's cache: K/V (cache_batch, cache_length, kv_heads,
    head_dim), scales (cache_batch, cache_length, kv_heads) -- the last unsharded for per-token
    scales --; ``lead`` is prepended (``("layers",)`` for the stacked cache)."""
    kv = P(*lead, *CACHE_KV)
    if not layer.quantized:
        return LayerCache(kv, kv)
    s = P(*lead, axes.CACHE_BATCH, axes.CACHE_LENGTH, axes.KV_HEADS if _per_head(layer) else None)
    return LayerCache(kv, kv, s, s)


def logical_axes(cache: Cache) -> Cache:
    """The cache's logical PartitionSpecs, a tree of the same structure: per layer as
    :func:`layer_logical_axes` (stacked layers with a leading ``layers``), lengths
    (cache_batch,)."""
    if isinstance(cache.layers, tuple):
        layers = tuple(layer_logical_axes(layer) for layer in cache.layers)
    else:
        layers = layer_logical_axes(cache.layers, (axes.LAYERS,))
    return Cache(layers, P(axes.CACHE_BATCH))


def constrain(tree: Any, specs: Any) -> Any:
    """``nn.with_logical_constraint`` leaf by leaf (a no-op outside a mesh + rules context)."""
    return jax.tree.map(lambda s, x: nn.with_logical_constraint(x, tuple(s)), specs, tree,
                        is_leaf=lambda s: isinstance(s, P))
