"""Low precision: formats (ml_dtypes limits, saturating casts), scale math, quantize/dequantize.

Convention: a *scale* is multiplicative, ``scale = fmt_max / amax`` (``q = cast(x * scale)``,
``x ~= q / scale``); ``scale_inv`` names the inverse Flax and Transformer Engine store.

The FP8 dot of the projections and its calibration files (:mod:`tfm_jax.quant.fp8`) are
exported here too; ``tfm_jax.tools.calibrate`` (``tfm-jax calibrate``, run level) is imported on
its own.
"""

from tfm_jax.quant.fp8 import (Fp8DotGeneral, fp8_dot_mode, fp8_native_in_hlo,
                               load_calibration, write_calibration)
from tfm_jax.quant.formats import (FORMATS, fmt_bits, fmt_dtype, fmt_max, fmt_tiny, format_name,
                                   is_float, saturating_cast)
from tfm_jax.quant.qdq import dequantize, quantize
from tfm_jax.quant.scaling import (AMAX_METHODS, DEFAULT_AMAX_HISTORY, GAUDI2_E4M3_SCALE_INVS,
                                   GAUDI2_E4M3_SCALES, amax_from_history, broadcast_scale,
                                   compute_amax, compute_scale, ema_scale, history_newest_first,
                                   init_amax_history, round_scale_pow2, round_scale_to_set,
                                   scale_from_scale_inv, scale_inv_from_scale, update_amax_history)

__all__ = [
    "FORMATS", "fmt_bits", "fmt_dtype", "fmt_max", "fmt_tiny", "format_name", "is_float",
    "saturating_cast", "quantize", "dequantize", "AMAX_METHODS", "DEFAULT_AMAX_HISTORY",
    "GAUDI2_E4M3_SCALE_INVS", "GAUDI2_E4M3_SCALES", "amax_from_history", "broadcast_scale",
    "compute_amax", "compute_scale", "ema_scale", "history_newest_first", "init_amax_history",
    "round_scale_pow2", "round_scale_to_set", "scale_from_scale_inv", "scale_inv_from_scale",
    "update_amax_history", "Fp8DotGeneral", "fp8_dot_mode", "fp8_native_in_hlo",
    "load_calibration", "write_calibration",
]
