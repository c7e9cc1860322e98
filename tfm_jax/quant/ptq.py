"""Integer post-training quantization (PTQ) of weights: INT8 symmetric / asymmetric, packed INT4.

**Weight-only, per output channel.** Every projection kernel (the ``weight`` role of
:mod:`tfm_jax.core.roles`: each ``Linear``'s ``kernel``) gets one scale per output channel: the
kernel's input axes (the first ``in_axes`` axes after any stacked ``layers`` axis of
``scan_layers``) are reduced, every other axis is kept -- (d, H, Dh) q/k/v kernels get (1, H, Dh)
scales, the (H, Dh, d) output projection (1, 1, d), a scanned (L, d, F) FFN kernel (L, 1, F). The
token embedding and the LM head stay high precision by default (``keep=("lm_head",)``; the
embedding has its own role and is never touched), as is usual and as the issue asks.

=====================  ======================================================================
recipe                 storage per kernel (``q``, ``scale``, ``zero_point``)
=====================  ======================================================================
``int8_weight``        int8 codes in [-127, 127], ``scale = 127 / amax`` (symmetric)
``int8_weight_asym``   uint8 codes in [0, 255] and a uint8 zero point per channel
                       (PyTorch quint8 / ONNX convention): ``scale = 255 / (max - min)`` over
                       [min(x, 0), max(x, 0)], ``zp = round(-min * scale)``,
                       ``q = clip(round(x * scale) + zp, 0, 255)``; 0.0 is exact
``int4_weight``        int4 codes in [-7, 7], ``scale = 7 / amax``, two codes per uint8 byte
                       (:func:`pack_int4`: element 2i in the low nibble, 2i+1 in the high one,
                       along the last axis, two's complement; an odd length gets a zero pad)
=====================  ======================================================================

Scales are multiplicative (this package's convention, ``x ~= (q - zp) / scale``), float32. A
quantized kernel is a dict ``{"q", "scale"[, "zero_point"]}`` in place of the kernel array, so
the quantized params tree is an ordinary pytree that orbax saves as is.

**Loading dequantizes** (:func:`dequantize_params`) to the compute dtype: the model then runs
its usual dots. That is what a weight-only quantized dot does on CPU anyway (XLA:CPU has no
int8 x float GEMM: the weights are upcast before the matmul); the gain is the checkpoint /
memory size (4x / 8x smaller weights), not speed here.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tfm_jax.config.schema import WEIGHT_ONLY_RECIPES as RECIPES
from tfm_jax.core.roles import param_role, path_names
from tfm_jax.quant.qdq import dequantize, quantize

DEFAULT_KEEP = ("lm_head",)          # module names left in high precision (the untied LM head)
QKEYS = frozenset({"q", "scale", "zero_point"})

# (in_axes, n_out_axes) of each Linear, by module path, e.g. ("layers", "attn", "o_proj") -> (2, 1)
LinearInfo = Mapping[tuple[str, ...], tuple[int, int]]


def check_recipe(recipe: str) -> str:
    if recipe not in RECIPES:
        raise ValueError(f"unknown weight-only quantization recipe {recipe!r}; valid: "
                         f"{', '.join(RECIPES)}")
    return recipe


# --------------------------------------------------------------------------------------------
# int4 packing


def pack_int4(q: jax.Array) -> jax.Array:
    """int4 codes (any integer dtype, values in [-8, 7]) (..., n) -> uint8 (..., ceil(n / 2)):
    element 2i in the low nibble, 2i+1 in the high nibble, two's complement; odd n: zero pad."""
    q = jnp.asarray(q).astype(jnp.int8)
    if q.ndim == 0:
        raise ValueError("pack_int4 needs at least one axis (values are paired along the last)")
    if q.shape[-1] % 2:
        q = jnp.pad(q, [(0, 0)] * (q.ndim - 1) + [(0, 1)])
    nib = q.astype(jnp.uint8) & jnp.uint8(0x0F)                  # two's complement nibble
    return nib[..., 0::2] | (nib[..., 1::2] << jnp.uint8(4))


def unpack_int4(packed: jax.Array, n: int) -> jax.Array:
    """uint8 (..., ceil(n / 2)) from :func:`pack_int4` -> int8 codes (..., n), sign-extended."""
    p = jnp.asarray(packed).astype(jnp.uint8)
    if p.shape[-1] != (n + 1) // 2:
        raise ValueError(f"unpack_int4: {p.shape[-1]} bytes on the last axis cannot hold {n} "
                         f"int4 values (need {(n + 1) // 2})")
    both = jnp.stack([p & jnp.uint8(0x0F), p >> jnp.uint8(4)], axis=-1)     # (..., m, 2)
    both = both.reshape(*p.shape[:-1], 2 * p.shape[-1])[..., :n].astype(jnp.int8)
    return (both ^ jnp.int8(8)) - jnp.int8(8)                   # sign-extend 4 -> 8 bits


# --------------------------------------------------------------------------------------------
# one kernel


def quantize_asym(x: jax.Array, *, axis=None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Asymmetric 8-bit: x -> (uint8 q, float32 scale, uint8 zero_point), per channel over all
    axes but ``axis`` (per tensor when None); see the module table. x ~= (q - zp) / scale."""
    xf = jnp.asarray(x).astype(jnp.float32)
    info = np.iinfo(np.uint8)
    qmin, qmax = float(info.min), float(info.max)
    if axis is None:
        reduce = None
    else:
        keep = {a % xf.ndim for a in ((axis,) if isinstance(axis, int) else axis)}
        reduce = tuple(a for a in range(xf.ndim) if a not in keep)
    lo = jnp.minimum(xf.min(axis=reduce, keepdims=axis is not None), 0.0)
    hi = jnp.maximum(xf.max(axis=reduce, keepdims=axis is not None), 0.0)
    scale = compute_scale_range(hi - lo, qmax - qmin)
    zp = jnp.clip(jnp.round(-lo * scale), qmin, qmax)
    q = jnp.clip(jnp.round(xf * scale) + zp, qmin, qmax)
    return q.astype(jnp.uint8), scale, zp.astype(jnp.uint8)


def compute_scale_range(value_range: jax.Array, levels: float) -> jax.Array:
    """``levels / value_range`` with the package's bad-amax rule (0 / inf / NaN -> 1.0)."""
    r = jnp.asarray(value_range, jnp.float32)
    s = jnp.float32(levels) / r
    return jnp.where((r > 0) & jnp.isfinite(r) & jnp.isfinite(s), s, jnp.float32(1.0))


def dequantize_asym(q: jax.Array, scale: jax.Array, zero_point: jax.Array) -> jax.Array:
    """(uint8 q, scale, uint8 zp) -> float32 ``(q - zp) * (1 / scale)``."""
    diff = jnp.asarray(q).astype(jnp.float32) - jnp.asarray(zero_point).astype(jnp.float32)
    return diff * (1.0 / jnp.asarray(scale, jnp.float32))


def quantize_weight(w: jax.Array, recipe: str, keep_axes: Sequence[int]) -> dict[str, jax.Array]:
    """One kernel -> ``{"q", "scale"[, "zero_point"]}`` with one scale per index of
    ``keep_axes`` (the output channels and stacked layer axes; the others are reduced)."""
    check_recipe(recipe)
    keep = tuple(keep_axes)
    if recipe == "int8_weight_asym":
        q, s, zp = quantize_asym(w, axis=keep)
        return {"q": q, "scale": s, "zero_point": zp}
    fmt = "int8" if recipe == "int8_weight" else "int4"
    q, s = quantize(w, fmt, axis=keep)
    if recipe == "int4_weight":
        q = pack_int4(q)
    return {"q": q, "scale": s}


def dequantize_weight(qw: Mapping[str, jax.Array], recipe: str, dtype: Any = jnp.float32
                      ) -> jax.Array:
    """``{"q", "scale"[, "zero_point"]}`` -> the kernel in ``dtype``."""
    check_recipe(recipe)
    if recipe == "int8_weight_asym":
        w = dequantize_asym(qw["q"], qw["scale"], qw["zero_point"])
    elif recipe == "int4_weight":
        w = dequantize(unpack_int4(qw["q"], qw["scale"].shape[-1]), qw["scale"])
    else:
        w = dequantize(qw["q"], qw["scale"])
    return w.astype(dtype)


# --------------------------------------------------------------------------------------------
# the params tree


def is_quantized_leaf(x: Any) -> bool:
    return isinstance(x, Mapping) and "q" in x and "scale" in x and set(x) <= QKEYS


def _keep_axes(names: tuple[str, ...], ndim: int, info: LinearInfo) -> tuple[int, ...]:
    module = names[:-1]
    if module not in info:
        raise ValueError(f"quantize: {'/'.join(names)} is a weight but no Linear was recorded "
                         f"at {'/'.join(module)}; per-channel PTQ knows a kernel's input axes "
                         f"only from its Linear (tfm_jax.tools.quantize.linear_info)")
    in_axes, n_out = info[module]
    n_stack = ndim - in_axes - n_out
    if n_stack < 0:
        raise ValueError(f"quantize: {'/'.join(names)} has rank {ndim}, less than its Linear's "
                         f"{in_axes} input + {n_out} output axes")
    return tuple(a for a in range(ndim) if not n_stack <= a < n_stack + in_axes)


def selects(names: tuple[str, ...], keep: Sequence[str] = DEFAULT_KEEP) -> bool:
    """Whether the leaf at ``names`` is quantized: a ``weight``-role leaf outside ``keep``."""
    return param_role(names) == "weight" and not any(n in keep for n in names)


def quantize_params(params: Any, recipe: str, info: LinearInfo, *,
                    keep: Sequence[str] = DEFAULT_KEEP) -> Any:
    """Every selected kernel (:func:`selects`) replaced by its quantized dict; other leaves
    unchanged. ``info``: (in_axes, n_out_axes) per Linear module path. jit/eval_shape-safe."""
    check_recipe(recipe)

    def conv(path, x):
        names = path_names(path)
        if not selects(names, keep):
            return x
        return quantize_weight(x, recipe, _keep_axes(names, x.ndim, info))

    return jax.tree_util.tree_map_with_path(conv, params)


def dequantize_params(qparams: Any, recipe: str, dtype: Any = jnp.float32) -> Any:
    """The params tree back: every quantized dict dequantized to ``dtype``; the other leaves
    (embedding, norms, LM head) unchanged. jit-safe."""
    return jax.tree.map(lambda x: dequantize_weight(x, recipe, dtype) if is_quantized_leaf(x)
                        else x, qparams, is_leaf=is_quantized_leaf)


def tree_bytes(tree: Any, select: Optional[Callable[[tuple[str, ...]], bool]] = None) -> int:
    """Bytes of the array leaves of ``tree`` (all, or those whose path names ``select`` takes).
    int4 codes count as packed (the storage here is uint8 with two codes per byte)."""
    total = 0
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if select is None or select(path_names(path)):
            total += int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
    return total
