"""Low-precision number formats: names, limits (read from ``ml_dtypes``, never typed in), saturating casts.

=====================  =========  ==========  ====================================================
name                   max        tiny        notes
=====================  =========  ==========  ====================================================
``float8_e4m3fn``      448        2^-6        OCP E4M3: no inf, one NaN pattern per sign (H100)
``float8_e5m2``        57344      2^-14       OCP E5M2: IEEE-like, has inf (gradients)
``float8_e4m3fnuz``    240        2^-7        no inf, no -0, single NaN (Gaudi2, MI300)
``float8_e5m2fnuz``    57344      2^-15       no inf, no -0, single NaN (MI300)
``int8``               127        1           symmetric range [-127, 127] (-128 never produced)
``int4``               7          1           ``ml_dtypes.int4``; symmetric [-7, 7]
=====================  =========  ==========  ====================================================

(The table is documentation; the code reads every limit from ``ml_dtypes.finfo`` / ``iinfo``.)

**Casts are not saturating by themselves.** Casting a float beyond a format's max to
``float8_e4m3fn`` gives NaN (it has no infinity), to ``float8_e5m2`` inf, and a float-to-int
cast wraps or is undefined. :func:`saturating_cast` clips to ``±fmt_max`` first, so finite input
never becomes NaN/inf. Float formats then round to nearest, ties to even -- exactly the cast of
``ml_dtypes`` and of XLA (checked bit for bit in ``tests/unit/quant/test_quant_formats.py``). Integer formats
round half to even (``jnp.round``), then clip to the *symmetric* range ``[-max, max]``, as
symmetric quantization needs (so int8 never produces -128 and int4 never -8).
"""

from __future__ import annotations

from typing import Any, Union

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

# name -> numpy dtype (the ml_dtypes scalar types; int8 is numpy's own).
FORMATS: dict[str, np.dtype] = {
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
    "float8_e4m3fnuz": np.dtype(ml_dtypes.float8_e4m3fnuz),
    "float8_e5m2fnuz": np.dtype(ml_dtypes.float8_e5m2fnuz),
    "int8": np.dtype(np.int8),
    "int4": np.dtype(ml_dtypes.int4),
}

Format = Union[str, Any]   # a name from FORMATS, or a dtype / scalar type of one of them


def format_name(fmt: Format) -> str:
    """The canonical name of ``fmt`` (a name from :data:`FORMATS` or a dtype of one)."""
    if isinstance(fmt, str):
        if fmt in FORMATS:
            return fmt
        raise ValueError(f"unknown quantization format {fmt!r}; valid formats: "
                         f"{', '.join(FORMATS)}")
    try:
        dt = np.dtype(fmt)
    except TypeError:
        dt = None
    for name, d in FORMATS.items():
        if dt == d:
            return name
    raise ValueError(f"unsupported quantization dtype {fmt!r}; valid formats: "
                     f"{', '.join(FORMATS)} (pass the name or its ml_dtypes dtype)")


def fmt_dtype(fmt: Format) -> np.dtype:
    """The numpy dtype of ``fmt`` (usable as a jnp dtype)."""
    return FORMATS[format_name(fmt)]


def is_float(fmt: Format) -> bool:
    """True for the float8 formats, False for int8/int4."""
    return format_name(fmt).startswith("float")


def fmt_max(fmt: Format) -> float:
    """The largest finite value of ``fmt`` (``finfo.max`` / ``iinfo.max``), e.g. 448.0 for e4m3fn."""
    dt = fmt_dtype(fmt)
    return float(ml_dtypes.finfo(dt).max) if is_float(fmt) else float(ml_dtypes.iinfo(dt).max)


def fmt_tiny(fmt: Format, *, subnormal: bool = False) -> float:
    """The smallest positive value of ``fmt``: the smallest *normal* (``finfo.smallest_normal``)
    by default, the smallest subnormal with ``subnormal=True`` (below it values flush to zero).
    Integer formats: 1.0 (the step; anything below 0.5 after scaling rounds to 0)."""
    if not is_float(fmt):
        return 1.0
    fi = ml_dtypes.finfo(fmt_dtype(fmt))
    return float(fi.smallest_subnormal if subnormal else fi.smallest_normal)


def fmt_bits(fmt: Format) -> int:
    """Storage bits per value: 8, or 4 for int4 (ml_dtypes keeps int4 in a byte; packed storage
    is :mod:`tfm_jax.quant.ptq`)."""
    dt = fmt_dtype(fmt)
    return 4 if dt == FORMATS["int4"] else 8 * dt.itemsize


def saturating_cast(x: jax.Array, fmt: Format) -> jax.Array:
    """``x`` (any float dtype) -> ``fmt``'s dtype, saturating at ``±fmt_max(fmt)``.

    Float formats: ``cast(clip(x, -max, max))``, round to nearest even; NaN stays NaN. Integer
    formats: ``cast(clip(round_half_even(x), -max, max))``; the result for NaN input is
    unspecified (check finiteness upstream). Computed in float32. jit-safe.
    """
    dt = fmt_dtype(fmt)
    m = fmt_max(fmt)
    xf = jnp.asarray(x).astype(jnp.float32)
    if is_float(fmt):
        return jnp.clip(xf, -m, m).astype(dt)
    return jnp.clip(jnp.round(xf), -m, m).astype(dt)
