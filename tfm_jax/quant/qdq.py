"""``quantize`` / ``dequantize``: the interface other tools rely on (keep these signatures).

    q, scale = quantize(x, fmt, *, axis=None, scale=None, block=None)
    x_hat = dequantize(q, scale)                  # float32, x_hat = q * (1 / scale)

Symmetric, multiplicative scale (:mod:`tfm_jax.quant.scaling`): ``q = saturating_cast(x * scale,
fmt)``. With no ``scale``, a dynamic exact scale ``fmt_max / amax`` (not rounded to a power of
two) over all axes but ``axis`` (per tensor when ``axis`` is None), or per block of ``block``
values along the last axis. A zero / non-finite amax gives scale 1.0 (an all-zero tensor
quantizes to zeros). Finite input never gives NaN: values at or beyond ``±amax`` saturate at
``±fmt_max``. Arithmetic is float32, one IEEE operation per step (``x * scale``; the cast;
``1 / scale`` then ``q * scale_inv``), so numpy float32 + ml_dtypes reproduce it bit for bit.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp

from tfm_jax.quant.formats import Format, saturating_cast
from tfm_jax.quant.scaling import broadcast_scale, compute_amax, compute_scale


def quantize(x: jax.Array, fmt: Format, *, axis: Union[None, int, Sequence[int]] = None,
             scale: Optional[jax.Array] = None,
             block: Optional[int] = None) -> tuple[jax.Array, jax.Array]:
    """x -> (q in ``fmt``'s dtype, float32 multiplicative scale).

    The scale's shape: () per tensor; keepdims over the reduced axes per channel (``axis``);
    (..., n // block) per block. A given ``scale`` (static/calibrated or delayed) is used as is
    (it must broadcast against ``x``, or be a per-block scale) and returned as float32.
    """
    x = jnp.asarray(x)
    if scale is None:
        scale = compute_scale(compute_amax(x, axis=axis, block=block), fmt)
    else:
        scale = jnp.asarray(scale, jnp.float32)
    q = saturating_cast(x.astype(jnp.float32) * broadcast_scale(scale, x.shape), fmt)
    return q, scale


def dequantize(q: jax.Array, scale: jax.Array) -> jax.Array:
    """(q, multiplicative scale) -> float32 ``q * (1 / scale)``; per-block scales are expanded.

    One reciprocal per scale, then a multiply per element -- what XLA makes of a division by a
    broadcast scale anyway, written out so the result is reproducible (within 1 ulp of
    ``q / scale``; exact for power-of-two scales)."""
    q = jnp.asarray(q)
    scale_inv = 1.0 / jnp.asarray(scale, jnp.float32)
    return q.astype(jnp.float32) * broadcast_scale(scale_inv, q.shape)
