"""Backend selection and per-device peak FLOP/s for MFU.

``backend.platform``: ``auto`` keeps jax's default; ``cpu``/``gpu``/``tpu`` pin ``jax_platforms``
(must happen before the first jax computation). ``hpu`` is reserved for the PJRT-plugin path.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from tfm_jax.config import BackendConfig, Config, ConfigError
from tfm_jax.layers.ops import Ops

# Dense peak FLOP/s per device (vendor figures) by device_kind substring, for MFU on accelerators.
_PEAKS = {
    "H200": {"bfloat16": 989e12, "float32": 67e12},
    "H100": {"bfloat16": 989e12, "float32": 67e12},
    "A100": {"bfloat16": 312e12, "float32": 19.5e12},
}


def configure(cfg: BackendConfig) -> None:
    if cfg.platform == "auto":
        return
    if cfg.platform == "hpu":
        raise ConfigError("backend.platform=hpu: the HPU PJRT plugin path is not available in "
                          "this version; use cpu, gpu, tpu or auto")
    jax.config.update("jax_platforms", cfg.platform)


def resolve_ops(cfg: Config, devices: list) -> Ops:
    """The ops set (:mod:`tfm_jax.layers.ops`) a run uses on these devices, resolved once.

    * GPU/TPU (any non-CPU platform): ``xla``, plain XLA ops.
    * CPU: ``cpu-native`` when ``backend.cpu_kernels`` allows it and the run can use the native
      kernels -- one device (XLA cannot partition a custom call over a mesh) and fp32 -- and the
      library builds/loads; otherwise ``cpu-xla``. ``auto`` falls back with the reason in
      ``Ops.detail``; ``native`` raises ConfigError with it.
    """
    from tfm_jax.layers import ops as ops_lib

    platform = devices[0].platform
    if platform != "cpu":
        return dataclasses.replace(ops_lib.xla_ops(), detail=f"{platform} devices")
    choice = cfg.backend.cpu_kernels
    if choice == "xla":
        return dataclasses.replace(ops_lib.cpu_xla_ops(), detail="backend.cpu_kernels=xla")
    reason = None
    if len(devices) > 1:
        reason = (f"the run uses {len(devices)} devices (native kernels are single-device; XLA "
                  f"cannot partition a custom call)")
    elif cfg.model.dtype != "float32" or cfg.model.param_dtype != "float32":
        reason = f"model dtype {cfg.model.dtype}/{cfg.model.param_dtype} (native kernels: float32)"
    else:
        from tfm_jax.kernels import cpu
        ok, detail = cpu.available()
        if ok:
            return ops_lib.native_cpu_ops(detail)
        reason = detail
    if choice == "native":
        raise ConfigError(f"backend.cpu_kernels=native: {reason}; use backend.cpu_kernels=auto "
                          f"or xla")
    return dataclasses.replace(ops_lib.cpu_xla_ops(), detail=f"native kernels not used: {reason}")


@functools.lru_cache(maxsize=None)
def measured_matmul_peak(n: int = 1024, dtype: str = "float32", seconds: float = 0.5) -> float:
    """FLOP/s of a jitted n x n x n matmul on the default device (median of repeats).

    On CPU this is the whole machine's practical matmul peak (XLA:CPU spreads one GEMM over all
    cores), the denominator the benchmarks use for MFU.
    """
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    times, t_end = [], time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < 3:
        t0 = time.perf_counter()
        f(a, a).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2.0 * n ** 3 / float(np.median(times))


def peak_flops(cfg: Config, n_devices: int) -> float:
    """Peak FLOP/s of the devices a run uses (the MFU denominator)."""
    dev = jax.devices()[0]
    per_device = dev.platform != "cpu"     # fake CPU devices share the same cores
    if cfg.train.peak_flops is not None:
        return cfg.train.peak_flops * (n_devices if per_device else 1)
    if not per_device:
        return measured_matmul_peak(dtype=cfg.model.dtype)
    dtype = "bfloat16" if cfg.model.dtype == "float16" else cfg.model.dtype
    for key, table in _PEAKS.items():
        if key in dev.device_kind:
            return table.get(dtype, table["float32"]) * n_devices
    return measured_matmul_peak(dtype=cfg.model.dtype) * n_devices
