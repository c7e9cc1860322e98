"""FP8 weight storage: projection kernels kept as FP8 bytes plus a float32 scale in the params tree.

With ``quant.fp8_weight_storage: true`` every quantized projection (attention, FFN; not the
embedding or the LM head) stores its kernel as ``kernel`` in ``fmt`` (default e4m3fn, 1 byte per
value) with a sibling ``storage_scale`` (float32, multiplicative convention: ``w ~= kernel /
storage_scale``; shape ``()`` per tensor, or ``(1, ..., *features)`` per output channel; stacked to
``(L, ...)`` by ``nn.scan``). The checkpoint therefore holds the FP8 bytes and the scale -- no
hidden high-precision master copy exists anywhere in the persistent state.

One optimizer step (:func:`tfm_jax.train.make_train_step`):

1. :func:`dequantized_view`: each stored kernel -> float32 ``kernel / storage_scale`` (transient);
   with an FP8 recipe the model's FP8 dot casts ``view * storage_scale`` back -- exactly the
   stored bytes (no rounding step can move a value by half an FP8 step) -- and feeds them and
   the scale to its GEMM (:class:`tfm_jax.quant.fp8.Fp8DotGeneral`, ``kernel_scale``): no kernel
   scaling state, no second rounding; evaluation and generation feed the bytes directly;
2. gradients, clip and AdamW act on that view (the moments are float32 / bf16 / 8-bit arrays of
   the kernel's shape, :mod:`tfm_jax.quant.optim`);
3. :func:`requantize`: the updated float32 weight ``w`` gets the seed's EMA scale
   ``scale <- beta * scale + (1 - beta) * fmt_max / amax(w) / 2**margin``
   (:func:`tfm_jax.quant.scaling.ema_scale`, beta 0.999) and is cast back to ``fmt`` with
   round-to-nearest-even or, with ``quant.stochastic_rounding``, :func:`stochastic_round`
   (unbiased: ``E[SR(x)] = x``, so updates smaller than half a quantization step are kept in
   expectation instead of being rounded away).

The EMA scale lags the weights: a weight that grows faster than the scale follows saturates at
``fmt_max / scale``; the storage margin (default 1: 2x headroom) bounds that. Pure functions here;
:class:`~tfm_jax.layers.linear.Linear` holds the parameters.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from tfm_jax.quant.formats import fmt_dtype, fmt_max, is_float, saturating_cast
from tfm_jax.quant.scaling import compute_scale, ema_scale

STORAGE_SCALE = "storage_scale"        # the scale leaf's name, next to ``kernel``
GRANULARITIES = ("per_tensor", "per_channel")


class StorageSpec(NamedTuple):
    """Static description of the weight storage (hashable: a Flax module attribute via Ops)."""

    fmt: str = "float8_e4m3fn"
    granularity: str = "per_tensor"     # or per_channel: one scale per output feature
    beta: float = 0.999                 # EMA of the scale (the seed)
    margin: int = 1                     # scale = fmt_max / amax / 2**margin (headroom)
    stochastic_rounding: bool = False


def spec_from_config(quant_cfg: Any) -> StorageSpec:
    """The :class:`StorageSpec` of a ``quant`` section (:class:`tfm_jax.config.QuantConfig`)."""
    q = quant_cfg
    return StorageSpec(q.weight_storage_format, q.weight_storage_granularity,
                       float(q.weight_scale_beta), int(q.weight_storage_margin),
                       bool(q.stochastic_rounding))


def scale_shape(kernel_shape: tuple, n_in: int, granularity: str) -> tuple:
    """Shape of a kernel's storage scale: ``()`` per tensor; per channel the kernel's shape with
    the ``n_in`` contracted axes set to 1 (keepdims: broadcasts against the kernel)."""
    if granularity == "per_tensor":
        return ()
    if granularity == "per_channel":
        return (1,) * n_in + tuple(kernel_shape[n_in:])
    raise ValueError(f"weight storage granularity {granularity!r}; valid: "
                     f"{', '.join(GRANULARITIES)}")


def _bcast(scale: jax.Array, ndim: int) -> jax.Array:
    """A scale made broadcastable against a kernel of rank ``ndim``: trailing 1s are appended, so
    a per-tensor scale stacked by ``nn.scan`` (L,) pairs with a kernel (L, ...) and a per-channel
    one (keepdims, same rank) stays as it is."""
    scale = jnp.asarray(scale)
    return scale.reshape(scale.shape + (1,) * (ndim - scale.ndim))


def storage_amax(w: jax.Array, scale: jax.Array) -> jax.Array:
    """max |w| over the axes the scale does not keep (its size-1 axes), in the scale's shape."""
    sb = _bcast(scale, w.ndim)
    axes = tuple(i for i in range(w.ndim) if sb.shape[i] == 1)
    amax = jnp.max(jnp.abs(w.astype(jnp.float32)), axis=axes, keepdims=True)
    return amax.reshape(jnp.shape(scale))


def initial_scale(w: jax.Array, spec: StorageSpec, n_in: int) -> jax.Array:
    """The dynamic scale of a freshly initialized kernel (the EMA recursion starts from it)."""
    shape = scale_shape(w.shape, n_in, spec.granularity)
    return compute_scale(storage_amax(w, jnp.ones(shape, jnp.float32)), spec.fmt,
                         margin=spec.margin)


def stochastic_round(x: jax.Array, fmt: str, key: jax.Array) -> jax.Array:
    """``x`` (float32) -> ``fmt``'s dtype with stochastic rounding, saturating at ``±fmt_max``.

    A value between two neighbouring representable values ``lo < x < hi`` becomes ``hi`` with
    probability ``(x - lo) / (hi - lo)`` and ``lo`` otherwise, so ``E[SR(x)] = x``. Computed on
    the magnitude: ``floor(|x| / ulp + u) * ulp`` with ``u ~ U[0, 1)`` and ``ulp`` the format's
    spacing at ``|x|`` (``2**(max(e, emin) - mantissa_bits)``, subnormals included), all exact
    in float32 for 8-bit formats; limits read from ``ml_dtypes.finfo``. Float formats only.
    """
    if not is_float(fmt):
        raise ValueError(f"stochastic_round: {fmt!r} is not a float format (FP8 formats only)")
    fi = ml_dtypes.finfo(fmt_dtype(fmt))
    m = fmt_max(fmt)
    xf = jnp.clip(jnp.asarray(x, jnp.float32), -m, m)
    a = jnp.abs(xf)
    _, e = jnp.frexp(a)                                  # a = f * 2**e, f in [0.5, 1)
    exp = jnp.maximum(e - 1, int(fi.minexp))             # floor(log2 a), clamped to subnormals
    ulp = jnp.ldexp(jnp.ones_like(a), exp - int(fi.nmant))
    u = jax.random.uniform(key, a.shape, jnp.float32)
    r = jnp.floor(a / ulp + u) * ulp
    r = jnp.minimum(r, m)                                # the step above max saturates
    return (jnp.sign(xf) * r).astype(fmt_dtype(fmt))


def quantize_weight(w: jax.Array, scale: jax.Array, spec: StorageSpec,
                    key: Optional[jax.Array] = None) -> jax.Array:
    """``cast(w * scale)`` to ``spec.fmt``: round to nearest even (saturating), or stochastic
    rounding when ``spec.stochastic_rounding`` (then ``key`` is required)."""
    xs = w.astype(jnp.float32) * _bcast(scale, w.ndim)
    if spec.stochastic_rounding:
        if key is None:
            raise ValueError("stochastic rounding needs a PRNG key")
        return stochastic_round(xs, spec.fmt, key)
    return saturating_cast(xs, spec.fmt)


def dequantize_weight(q: jax.Array, scale: jax.Array) -> jax.Array:
    """Stored FP8 kernel -> float32 weight ``q * (1 / scale)`` (the one formula training,
    evaluation and generation use; the reciprocal as in :func:`tfm_jax.quant.fp8.qdq`, which XLA
    computes the same way under any fusion)."""
    return q.astype(jnp.float32) * (1.0 / _bcast(scale, q.ndim).astype(jnp.float32))


def update_scale(scale: jax.Array, w: jax.Array, spec: StorageSpec) -> jax.Array:
    """The seed's EMA: ``beta * scale + (1 - beta) * fmt_max / amax(w) / 2**margin``; a zero or
    non-finite amax keeps the scale."""
    return ema_scale(scale, storage_amax(w, scale), spec.fmt, spec.beta, margin=spec.margin)


def requantize(w: jax.Array, scale: jax.Array, spec: StorageSpec,
               key: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
    """After an optimizer update of the float32 weight ``w``: (new FP8 kernel, new scale)."""
    new_scale = update_scale(scale, w, spec)
    return quantize_weight(w, new_scale, spec, key), new_scale


# --------------------------------------------------------------------------------------------
# Trees: which leaves are stored kernels (static, from paths and dtypes).


def _is_fp8(x: Any) -> bool:
    dt = getattr(x, "dtype", None)
    return dt is not None and np.dtype(dt) in {fmt_dtype(f) for f in (
        "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")}


def _pairs(params: Any) -> dict[tuple, tuple]:
    """{parent path: (kernel path, scale path)} for every stored kernel (a ``kernel`` leaf of an
    FP8 dtype with a ``storage_scale`` sibling)."""
    from tfm_jax.core.roles import path_names

    leaves = {path_names(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    out = {}
    for names, x in leaves.items():
        if names and names[-1] == "kernel" and _is_fp8(x):
            parent = names[:-1]
            if parent + (STORAGE_SCALE,) not in leaves:
                raise ValueError(f"{'/'.join(names)} is stored in {np.dtype(x.dtype)} but has no "
                                 f"{STORAGE_SCALE} next to it: the params tree is not one of "
                                 "fp8 weight storage (was the checkpoint written by this "
                                 "version?)")
            out[parent] = (names, parent + (STORAGE_SCALE,))
    return out


def has_storage(params: Any) -> bool:
    """Whether ``params`` holds FP8-stored kernels."""
    return bool(_pairs(params))


def _scales_by_parent(params: Any) -> dict[tuple, Any]:
    from tfm_jax.core.roles import path_names

    return {path_names(p)[:-1]: x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
            if path_names(p)[-1:] == (STORAGE_SCALE,)}


def dequantized_view(params: Any) -> Any:
    """``params`` with every stored FP8 kernel replaced by its float32 dequantized value (the
    scales stay; :class:`~tfm_jax.layers.linear.Linear` uses a float kernel as it is)."""
    from tfm_jax.core.roles import path_names

    scales = _scales_by_parent(params)

    def f(path, x):
        names = path_names(path)
        if names[-1:] == ("kernel",) and _is_fp8(x):
            return dequantize_weight(x, scales[names[:-1]])
        return x
    return jax.tree_util.tree_map_with_path(f, params)


def requantize_tree(view: Any, params: Any, spec: StorageSpec,
                    key: Optional[jax.Array] = None) -> Any:
    """The params after an optimizer step: every kernel that ``params`` stores in FP8 is taken
    from the updated float ``view``, its scale EMA-updated and the kernel re-quantized; every
    other leaf is the view's. ``key``: stochastic rounding (one fold per stored kernel)."""
    from tfm_jax.core.roles import path_names

    pairs = _pairs(params)
    old_scales = _scales_by_parent(params)
    view_leaves = {path_names(p): x for p, x in jax.tree_util.tree_flatten_with_path(view)[0]}
    new = {}
    for i, (parent, (kpath, spath)) in enumerate(sorted(pairs.items())):
        k = None if key is None else jax.random.fold_in(key, i)
        q, s = requantize(view_leaves[kpath], old_scales[parent], spec, k)
        new[kpath], new[spath] = q, s

    def f(path, x):
        return new.get(path_names(path), x)
    return jax.tree_util.tree_map_with_path(f, view)


def storage_mask(params: Any) -> Any:
    """Tree of Python bools: True for the ``storage_scale`` leaves (excluded from the optimizer,
    updated by :func:`requantize_tree`)."""
    from tfm_jax.core.roles import path_names

    return jax.tree_util.tree_map_with_path(
        lambda p, _: path_names(p)[-1:] == (STORAGE_SCALE,), params)
