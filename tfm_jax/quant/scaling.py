"""Scale math for quantization: amax at any granularity, scales, delayed/EMA strategies, rounding.

Pure ``jnp`` functions, jit-safe: no Python branching on array values (only on static arguments
such as ``fmt``, ``axis``, ``block``, ``method``).

**Convention.** A *scale* here is the seed's **multiplicative** scale::

    scale = fmt_max / amax           q = saturating_cast(x * scale)      x ~= q / scale

(``scale < 1`` compresses a large range into the format). Flax's ``fp8_ops`` and Transformer
Engine store the inverse, ``scale_inv = amax / fmt_max`` (``x ~= q * scale_inv``); convert with
:func:`scale_inv_from_scale` / :func:`scale_from_scale_inv`, and name variables after the one they
hold. Using ``amax / fmt_max`` *as a multiplier* is the reversed formula the seed warns about: it
pushes large values past ``fmt_max`` (NaN for a plain e4m3fn cast) and flushes small ones to zero.

**Granularity** (:func:`compute_amax`): per tensor (``axis=None``: a scalar), per channel (``axis``
int or tuple: those axes are kept, all others reduced, keepdims -- so the amax/scale broadcasts
against ``x``), per block (``block=B``: contiguous blocks of B along the last axis, every other axis
kept; shape ``(..., n // B)``, expanded against ``x`` by :func:`broadcast_scale`).

**Strategies**

* dynamic: ``compute_scale(compute_amax(x), fmt)`` on the current tensor;
* delayed: an amax history (Flax/TE default length 1024, :data:`DEFAULT_AMAX_HISTORY`) updated by
  :func:`update_amax_history` and reduced by :func:`amax_from_history` (``max | most_recent``);
  TE's ``margin``: ``scale = fmt_max / amax / 2**margin``;
* EMA: :func:`ema_scale`, ``beta * prev + (1 - beta) * fmt_max / amax`` (the seed, beta = 0.999);
* static: a scale from calibration is just a value passed to ``quantize(..., scale=s)``;
* rounding: :func:`round_scale_pow2` (down to a power of two, exact scaling in hardware that
  shifts exponents), :func:`round_scale_to_set` (down to a hardware set, e.g. Gaudi2's).

**Bad amax** (0, NaN, inf -- or an amax so small that ``fmt_max / amax`` overflows):
``on_bad_amax="keep"`` (default, as Flax and TE) returns ``prev_scale`` (1.0 when none is given);
``on_bad_amax="raise"`` fails naming the tensor: eagerly (concrete arrays) with a ValueError, under
``jit`` through ``jax.experimental.checkify`` -- wrap the jitted function in
``checkify.checkify`` and call ``err.throw()``; a plain ``jit`` cannot raise on a value, so without
checkify tracing stops with a message saying so.
"""

from __future__ import annotations

from typing import Literal, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from tfm_jax.quant.formats import Format, fmt_max

DEFAULT_AMAX_HISTORY = 1024          # Flax fp8_ops and Transformer Engine's default length
AMAX_METHODS = ("max", "most_recent")
BAD_AMAX_POLICIES = ("keep", "raise")

# Gaudi2's hardware-aligned FP8 (e4m3) scales. Intel Neural Compressor,
# neural_compressor/torch/algorithms/fp8_quant/_core/fp_utils.py: EXP_BIAS_SETS[(GAUDI2,
# float8_e4m3fn)] = [3, 7, 11, 15] (the exponent biases the hardware can switch to, default 7);
# get_fp8_hw_alligned_scales gives 2**(7 - bias) = {16, 1, 1/16, 1/256}. INC *divides* by its
# scale (x_q = x / s, the inverse convention), so in this module's multiplicative convention the
# set is the reciprocals. (Gaudi2's e4m3 range is also the fnuz one: max 240, see formats.py.)
GAUDI2_E4M3_SCALE_INVS = (2.0 ** -8, 2.0 ** -4, 1.0, 2.0 ** 4)    # INC's values (divisors)
GAUDI2_E4M3_SCALES = (2.0 ** -4, 1.0, 2.0 ** 4, 2.0 ** 8)         # multiplicative, as here


# --------------------------------------------------------------------------------------------
# amax at a granularity


def _norm_axes(axis: Union[int, Sequence[int]], ndim: int) -> tuple[int, ...]:
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    out = []
    for a in axes:
        if not -ndim <= int(a) < ndim:
            raise ValueError(f"axis {a} is out of range for an array of rank {ndim} "
                             f"(valid: {-ndim}..{ndim - 1})")
        out.append(int(a) % ndim)
    return tuple(sorted(set(out)))


def compute_amax(x: jax.Array, *, axis: Union[None, int, Sequence[int]] = None,
                 block: Optional[int] = None) -> jax.Array:
    """max |x| in float32: per tensor (shape ()), per channel (``axis`` kept, keepdims) or per
    block (``block`` contiguous values along the last axis: (..., n) -> (..., n // block))."""
    xa = jnp.abs(jnp.asarray(x).astype(jnp.float32))
    if block is not None:
        if axis is not None:
            raise ValueError("give axis= or block=, not both: per-block amax keeps every axis "
                             "but the last, which is split into blocks")
        n = xa.shape[-1] if xa.ndim else 0
        if block <= 0 or xa.ndim == 0 or n % block:
            raise ValueError(f"block={block} does not divide the last axis (length {n}) of an "
                             f"array of shape {tuple(xa.shape)}: pad the last axis to a multiple "
                             f"of {block} or choose a block size that divides {n}")
        return xa.reshape(*xa.shape[:-1], n // block, block).max(axis=-1)
    if axis is None:
        return xa.max()
    keep = _norm_axes(axis, xa.ndim)
    reduce = tuple(a for a in range(xa.ndim) if a not in keep)
    return xa.max(axis=reduce, keepdims=True) if reduce else xa


def broadcast_scale(scale: jax.Array, shape: Sequence[int]) -> jax.Array:
    """``scale`` made broadcastable against an array of ``shape``: a per-block scale
    (..., n // B) is repeated B times along the last axis; anything else is returned as is."""
    scale = jnp.asarray(scale)
    shape = tuple(shape)
    if (scale.ndim == len(shape) and scale.ndim and scale.shape[-1] not in (1, shape[-1])
            and shape[-1] % scale.shape[-1] == 0):
        return jnp.repeat(scale, shape[-1] // scale.shape[-1], axis=-1)
    return scale


# --------------------------------------------------------------------------------------------
# scales


def _bad_amax_check(bad: jax.Array, amax: jax.Array, name: str) -> None:
    """on_bad_amax="raise": fail naming the tensor (host-side when concrete, checkify in jit)."""
    msg = (f"amax of {name} is zero or non-finite (or fmt_max / amax overflows), so no scale "
           f"can be derived: check the tensor for inf/NaN, or use on_bad_amax='keep' to reuse "
           f"the previous scale")
    try:
        is_bad = bool(np.any(np.asarray(bad)))
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        from jax.experimental import checkify

        try:
            checkify.check(~jnp.any(bad), msg + " (amax: {amax})", amax=amax)
        except ValueError as e:
            raise ValueError(f"on_bad_amax='raise' for {name} under jit needs the jitted "
                             f"function wrapped in jax.experimental.checkify.checkify (then "
                             f"err.throw()); a plain jit cannot raise on a value. Or use "
                             f"on_bad_amax='keep'. ({e})") from None
        return
    if is_bad:
        raise ValueError(f"{msg} (amax: {np.asarray(amax)})")


def compute_scale(amax: jax.Array, fmt: Format, *, margin: float = 0,
                  prev_scale: Optional[jax.Array] = None,
                  on_bad_amax: Literal["keep", "raise"] = "keep",
                  name: str = "the tensor") -> jax.Array:
    """Multiplicative scale ``fmt_max / amax / 2**margin`` (float32, amax's shape).

    Where ``amax`` is 0 / NaN / inf (or the quotient overflows): ``prev_scale`` (1.0 when None)
    with ``on_bad_amax="keep"``; an error naming ``name`` with ``"raise"`` (see module doc).
    """
    if on_bad_amax not in BAD_AMAX_POLICIES:
        raise ValueError(f"on_bad_amax={on_bad_amax!r}; valid: {', '.join(BAD_AMAX_POLICIES)}")
    amax = jnp.asarray(amax, jnp.float32)
    scale = jnp.float32(fmt_max(fmt)) / amax / jnp.float32(2.0 ** float(margin))
    bad = ~(amax > 0) | ~jnp.isfinite(amax) | ~jnp.isfinite(scale)
    if on_bad_amax == "raise":
        _bad_amax_check(bad, amax, name)
    fallback = jnp.float32(1.0) if prev_scale is None else jnp.asarray(prev_scale, jnp.float32)
    return jnp.where(bad, fallback, scale)


def scale_inv_from_scale(scale: jax.Array) -> jax.Array:
    """Multiplicative scale (``fmt_max / amax``) -> inverse ``scale_inv`` (``amax / fmt_max``,
    what Flax fp8_ops and Transformer Engine store). Exact for powers of two."""
    return 1.0 / jnp.asarray(scale, jnp.float32)


def scale_from_scale_inv(scale_inv: jax.Array) -> jax.Array:
    """Inverse ``scale_inv`` (``amax / fmt_max``) -> multiplicative scale (``fmt_max / amax``)."""
    return 1.0 / jnp.asarray(scale_inv, jnp.float32)


# --------------------------------------------------------------------------------------------
# delayed scaling and EMA


def init_amax_history(length: int = DEFAULT_AMAX_HISTORY, shape: Sequence[int] = ()) -> jax.Array:
    """Zeros (length, *shape) float32: an empty history (its amax is 0 -> the scale is kept)."""
    if length < 1:
        raise ValueError(f"amax history length must be >= 1, got {length}")
    return jnp.zeros((length, *shape), jnp.float32)


def update_amax_history(history: jax.Array, amax: jax.Array) -> jax.Array:
    """Record this step's ``amax`` in ``history`` (L, ...), exactly as Flax's
    ``fp8_ops.compute_amax_history`` and TE: roll by -1 along axis 0, write index 0.

    Layout after the update: index 0 the newest, index -1 the step before, -2 the one before
    that, ..., index 1 the oldest (dropped next time); :func:`history_newest_first` reorders.
    """
    history = jnp.asarray(history)
    return jnp.roll(history, -1, axis=0).at[0].set(jnp.asarray(amax, history.dtype))


def history_newest_first(history: jax.Array) -> jax.Array:
    """The history reordered newest first (index 0, then -1, -2, ..., 1)."""
    history = jnp.asarray(history)
    return jnp.concatenate([history[:1], history[1:][::-1]], axis=0)


def amax_from_history(history: jax.Array,
                      method: Literal["max", "most_recent"] = "max") -> jax.Array:
    """The amax a delayed scale uses: ``max`` over the window, or the ``most_recent`` entry."""
    if method == "max":
        return jnp.max(history, axis=0)
    if method == "most_recent":
        return jnp.asarray(history)[0]
    raise ValueError(f"amax history method {method!r}; valid: {', '.join(AMAX_METHODS)}")


def ema_scale(prev_scale: jax.Array, amax: jax.Array, fmt: Format, beta: float = 0.999, *,
              margin: float = 0, on_bad_amax: Literal["keep", "raise"] = "keep",
              name: str = "the tensor") -> jax.Array:
    """EMA-smoothed scale (the seed): ``beta * prev_scale + (1 - beta) * fmt_max / amax``.

    A bad amax leaves the scale at ``prev_scale`` (``"keep"``) or raises (``"raise"``). Start the
    recursion from a dynamic scale (``compute_scale``), not from 0.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"EMA beta must be in [0, 1], got {beta}")
    prev_scale = jnp.asarray(prev_scale, jnp.float32)
    new = compute_scale(amax, fmt, margin=margin, prev_scale=prev_scale,
                        on_bad_amax=on_bad_amax, name=name)
    return jnp.float32(beta) * prev_scale + jnp.float32(1.0 - beta) * new


# --------------------------------------------------------------------------------------------
# rounding to hardware-friendly scales


def round_scale_pow2(scale: jax.Array) -> jax.Array:
    """The largest power of two <= ``scale`` (exact, via frexp). Rounding *down* a multiplicative
    scale never makes ``|x| * scale`` exceed ``fmt_max`` (it can only shrink), so nothing that fit
    starts to overflow; the cost is up to one binade of unused range. 0 / inf / NaN pass through."""
    scale = jnp.asarray(scale, jnp.float32)
    mant, exp = jnp.frexp(scale)                   # scale = mant * 2**exp, mant in [0.5, 1)
    del mant
    pow2 = jnp.ldexp(jnp.ones_like(scale), exp - 1)
    return jnp.where((scale > 0) & jnp.isfinite(scale), pow2, scale)


def round_scale_to_set(scale: jax.Array, allowed: Sequence[float]) -> jax.Array:
    """The largest value of ``allowed`` that is <= ``scale`` (round down: no new overflow).
    Below the smallest allowed value the smallest is used -- then large values saturate, as
    Intel Neural Compressor clamps to its set. E.g. ``allowed=GAUDI2_E4M3_SCALES``."""
    allowed_np = np.sort(np.asarray(allowed, np.float32).ravel())
    if allowed_np.size == 0 or not np.all(np.isfinite(allowed_np)) or allowed_np[0] <= 0:
        raise ValueError(f"allowed scales must be a non-empty set of positive finite values, "
                         f"got {list(allowed)}")
    scale = jnp.asarray(scale, jnp.float32)
    a = jnp.asarray(allowed_np)
    below = jnp.where(a <= scale[..., None], a, -jnp.inf).max(axis=-1)
    return jnp.where(jnp.isfinite(below), below, a[0])


SCALE_SETS = ("any", "pow2", "gaudi2")


def round_scale_for(scale: jax.Array, scale_set: str) -> jax.Array:
    """``scale`` rounded down to a hardware's scale set (``quant.scale_set``): ``any`` leaves it,
    ``pow2`` :func:`round_scale_pow2` (Gaudi3), ``gaudi2`` :func:`round_scale_to_set` with
    :data:`GAUDI2_E4M3_SCALES` (powers of 16). Idempotent."""
    if scale_set == "any":
        return jnp.asarray(scale, jnp.float32)
    if scale_set == "pow2":
        return round_scale_pow2(scale)
    if scale_set == "gaudi2":
        return round_scale_to_set(scale, GAUDI2_E4M3_SCALES)
    raise ValueError(f"scale set {scale_set!r}; valid: {', '.join(SCALE_SETS)}")
