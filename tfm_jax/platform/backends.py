"""Backend selection, PJRT plugins, and per-device peak FLOP/s for MFU.

``backend.platform`` (:func:`configure`, before the first jax computation): ``auto`` keeps jax's
default; ``cpu``/``gpu``/``tpu``/``hpu`` pin ``jax_platforms``. ``backend.emulate`` pins ``cpu``.

**PJRT plugins.** ``--pjrt-plugin PATH`` (a command-line flag, which sets
``$TFM_JAX_PJRT_PLUGIN``) or ``$TFM_JAX_PJRT_PLUGIN`` itself names a PJRT C-API plugin library
(a ``.so`` exporting ``GetPjrtApi``), resolved to an absolute path (a bare name would otherwise
go through the system library search). Never a config: a saved ``config.yaml``, ``--config`` or
an experiment file that sets ``backend.pjrt_plugin`` is refused (loading a library runs its
code, and configs and run directories are handed around as data). :func:`configure`
registers it with jax's own ``xla_bridge.register_plugin`` -- the call a ``jax_plugins``
package's ``initialize()`` makes, and what ``PJRT_NAMES_AND_LIBRARY_PATHS`` does at start-up --
under the platform's plugin name (:data:`PLUGIN_NAMES`: ``hpu``, ``cuda`` for gpu, ``tpu``), then
starts that backend and checks it has devices. Plugins installed as ``jax_plugins`` packages or
named in ``PJRT_NAMES_AND_LIBRARY_PATHS`` are discovered by jax itself and need no setting.
Each failure is a ConfigError with its fix: ``hpu`` with no plugin configured or installed; a
path that does not exist; a file that is not a PJRT plugin or fails to load (the loader's
message is kept); a plugin that loads but brings up no device. No public JAX PJRT plugin for
Intel Gaudi exists today (README "Backends").
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import platform
import tempfile
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from tfm_jax.config import BackendConfig, Config, ConfigError
from tfm_jax.config.schema import PLUGIN_ENV, PLUGIN_FIX
from tfm_jax.layers.ops import Ops
from tfm_jax.platform import xla_cpu

# Dense (no 2:4 sparsity) peak FLOP/s per device, NVIDIA's figures, by device_kind substring for
# MFU on accelerators; the first key found in the device kind wins, so card variants come before
# their family. jax's device kinds: "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe",
# "NVIDIA H100 NVL", "NVIDIA H200" (SXM), "NVIDIA H200 NVL". Tensor-core bf16; float32 is the
# CUDA-core (non-tensor) rate.
_PEAKS = {
    "H100 PCIe": {"bfloat16": 756e12, "float32": 51e12},
    "H100 NVL": {"bfloat16": 835e12, "float32": 60e12},
    "H200 NVL": {"bfloat16": 835e12, "float32": 60e12},
    "H200": {"bfloat16": 989e12, "float32": 67e12},
    "H100": {"bfloat16": 989e12, "float32": 67e12},      # SXM5
    "A100": {"bfloat16": 312e12, "float32": 19.5e12},
}


# backend.platform -> the name a PJRT plugin for it is registered under (jax's own names: its
# CUDA plugin registers "cuda", an alias of "gpu"; "hpu" is this project's name for Gaudi).
PLUGIN_NAMES = {"gpu": "cuda", "tpu": "tpu", "hpu": "hpu"}
_registered: dict[str, str] = {}          # plugin name -> library path, this process


def plugin_path(cfg: BackendConfig) -> tuple[Optional[str], str]:
    """(the PJRT plugin library to register as an absolute path, where the setting came from):
    ``$TFM_JAX_PJRT_PLUGIN`` (``--pjrt-plugin`` sets it) for a platform that takes a plugin
    (gpu/tpu/hpu), else None. Never the config (its ``backend.pjrt_plugin`` must be null)."""
    if cfg.pjrt_plugin is not None:        # the schema refuses it; a hand-built config too
        raise ConfigError(f"backend.pjrt_plugin={cfg.pjrt_plugin}: a library path is never "
                          f"read from a config; {PLUGIN_FIX}")
    env = os.environ.get(PLUGIN_ENV)
    if env and cfg.platform in PLUGIN_NAMES:
        return os.path.abspath(os.path.expanduser(env)), f"${PLUGIN_ENV}"
    return None, ""


def installed_plugins() -> list[str]:
    """The plugin modules jax will discover (``jax_plugins`` namespace packages and entry
    points), listed without importing them."""
    import importlib.metadata
    import pkgutil

    found = set()
    try:
        import jax_plugins  # type: ignore[import-not-found]
        found |= {m.name for m in pkgutil.iter_modules(jax_plugins.__path__)}
    except ImportError:
        pass
    try:
        found |= {ep.value.removeprefix("jax_plugins.")
                  for ep in importlib.metadata.entry_points(group="jax_plugins")}
    except Exception:                     # a broken distribution's metadata: nothing listed
        pass
    return sorted(found)


def env_plugin_names() -> list[str]:
    """The plugin names ``PJRT_NAMES_AND_LIBRARY_PATHS`` gives jax (``name:path,...``)."""
    raw = os.environ.get("PJRT_NAMES_AND_LIBRARY_PATHS", "")
    return [item.split(os.pathsep, 1)[0] for item in raw.split(",") if os.pathsep in item]


def register_pjrt_plugin(name: str, path: str, source: str = f"${PLUGIN_ENV}") -> None:
    """Register the PJRT plugin library ``path`` as jax platform ``name`` (before the backends
    start). ConfigError, with the fix, for a missing file, a library that is not a PJRT plugin
    or fails to load (the loader's message kept), or backends that already started."""
    from jax._src import xla_bridge

    if _registered.get(name) == path:
        return                            # configure() called again in this process
    p = pathlib.Path(os.path.abspath(os.path.expanduser(path)))    # never a library search
    if not p.is_file():
        raise ConfigError(f"{source}={path}: no such file. Give the path of the PJRT plugin "
                          f"library (a .so exporting GetPjrtApi) for backend.platform, or unset "
                          f"{source}")
    if xla_bridge.backends_are_initialized():
        raise ConfigError(f"{source}={path}: jax's backends already started in this process, "
                          "so a plugin can no longer be registered; configure the backend "
                          "(tfm_jax.platform.backends.configure) before the first jax computation")
    try:
        xla_bridge.register_plugin(name, library_path=str(p))
    except Exception as err:              # jaxlib's loader error (JaxRuntimeError/XlaRuntimeError)
        raise ConfigError(f"{source}={path}: the library did not load as a PJRT plugin: "
                          f"{err}. A PJRT plugin exports GetPjrtApi (PJRT C API); check the "
                          f"path, and that the plugin was built for jaxlib "
                          f"{_jaxlib_version()}") from None
    _registered[name] = path


def _jaxlib_version() -> str:
    try:
        import jaxlib
        return jaxlib.__version__
    except (ImportError, AttributeError):
        return "?"


def _check_devices(platform: str, name: str, what: str) -> None:
    """The backend ``name`` starts and has devices, else ConfigError saying what failed."""
    try:
        devices = jax.devices(name)
    except BaseException as err:          # jax raises RuntimeError, or asserts (no backend up)
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise
        msg = str(err) or (f"{type(err).__name__}: jax started no backend (it skips the CUDA "
                           "plugin when no NVIDIA GPU is visible)")
        raise ConfigError(f"backend.platform={platform}: {what}, but no device came up: {msg}. "
                          "Check that the hardware is visible on this machine and its driver "
                          "loaded, or run elsewhere with backend.platform=auto") from None
    if not devices:
        raise ConfigError(f"backend.platform={platform}: {what}, but it reports no devices")


def configure(cfg: BackendConfig) -> None:
    """Pin the platform (``jax_platforms``), registering a PJRT plugin first when one is
    configured (module doc). Must run before the first jax computation of the process."""
    if cfg.emulate != "none":
        jax.config.update("jax_platforms", "cpu")     # a profile's numerics, emulated on CPU
        return
    if cfg.platform == "auto":
        return
    if cfg.platform == "cpu":
        jax.config.update("jax_platforms", "cpu")
        return
    name = PLUGIN_NAMES[cfg.platform]
    path, source = plugin_path(cfg)
    if path is not None:
        register_pjrt_plugin(name, path, source)
        jax.config.update("jax_platforms", name)   # that plugin only ("gpu" would also try rocm)
        _check_devices(cfg.platform, name, f"the PJRT plugin {path} loaded")
        return
    if cfg.platform == "hpu":
        installed = installed_plugins() + [f"{n} (PJRT_NAMES_AND_LIBRARY_PATHS)"
                                           for n in env_plugin_names()]
        if not installed:
            raise ConfigError(
                "backend.platform=hpu needs a PJRT plugin for Intel Gaudi, and none is "
                f"configured or installed: pass --pjrt-plugin /path/to/plugin.so (or set "
                f"${PLUGIN_ENV}), or install a jax_plugins package that registers platform "
                "'hpu'. No public JAX PJRT plugin for Gaudi exists today (README 'Backends'); "
                "to run Gaudi2 numerics on CPU use backend.emulate=gaudi2")
        jax.config.update("jax_platforms", name)
        _check_devices(cfg.platform, name, f"no plugin path is set; the installed jax "
                       f"plugins ({', '.join(installed)}) were tried")
        return
    jax.config.update("jax_platforms", cfg.platform)


def resolve_ops(cfg: Config, devices: list) -> Ops:
    """The ops set (:mod:`tfm_jax.layers.ops`) a run uses on these devices, resolved once:
    :func:`_resolve_set`; an fp8 ``quant.recipe`` sets its quantized projection dot
    (:func:`tfm_jax.quant.fp8.dot_general_factory`, over the set's GEMM) and
    ``quant.fp8_weight_storage`` its FP8 kernels (:mod:`tfm_jax.quant.storage`); then
    ``backend.attention`` (unless ``auto``) replaces its causal core (``cudnn`` on a non-GPU
    platform raises ConfigError); ``auto`` on a GPU picks cuDNN fused attention where it is
    supported (:func:`cudnn_attention_unsupported` says why not otherwise).
    ``backend.paged_attention`` (``auto``: on a GPU) sets the set's paged decode kernel
    (:mod:`tfm_jax.layers.attention_ops.paged`; off a GPU it runs interpreted)."""
    ops = _resolve_set(cfg, devices)
    if cfg.quant.fp8:
        from tfm_jax.quant import fp8
        # the xla set (GPU/TPU): the FP8 dot's GEMMs are XLA dots on the FP8 bytes (what
        # XLA:GPU makes FP8 GEMMs of); a CPU set: its own GEMM on upcast bytes
        ops = ops.with_quant_dot(fp8.dot_general_factory(
            cfg.quant, None if ops.name == "xla" else ops.matmul))
    if cfg.quant.fp8_weight_storage:
        from tfm_jax.quant import storage
        ops = ops.with_weight_storage(storage.spec_from_config(cfg.quant))
    platform = devices[0].platform
    paged = cfg.backend.paged_attention
    if paged == "pallas" or (paged == "auto" and platform == "gpu"):
        from tfm_jax.layers.attention_ops import paged as paged_ops
        why = paged_ops.unavailable()
        if why is None:
            ops = dataclasses.replace(ops, paged_attention=paged_ops.kernel(platform != "gpu"))
        elif paged == "pallas":
            raise ConfigError(f"backend.paged_attention=pallas: {why}; use "
                              "backend.paged_attention=gather (or auto)")
        else:
            note = f"paged decode: gather ({why})"
            ops = dataclasses.replace(ops, detail=f"{ops.detail}; {note}" if ops.detail
                                      else note)
    choice = cfg.backend.attention
    if choice == "auto":
        return _gpu_attention(cfg, devices, ops) if platform == "gpu" else ops
    if choice == "cudnn" and platform != "gpu":
        raise ConfigError(f"backend.attention=cudnn needs a GPU (cuDNN), but the run's devices "
                          f"are {platform}; use backend.attention=flash (any platform) or auto")
    from tfm_jax.layers import ops as ops_lib
    return ops.with_attention(*ops_lib.attention_core(choice))


def cudnn_attention_unsupported(cfg: Config, devices: list) -> Optional[str]:
    """Why cuDNN's fused attention cannot be the causal core of this run on these GPU devices
    (None: it can). Checks the compute dtype (cuDNN fused attention takes bf16/fp16), then lets
    jax decide: a one-layer-sized ``implementation="cudnn"`` call with the run's head count,
    head_dim and dtype is lowered and compiled on the first device (jax raises, with its reason,
    for a GPU, cuDNN version or shape it does not support)."""
    m = cfg.model
    if m.dtype not in ("bfloat16", "float16"):
        return f"cuDNN fused attention takes bf16/fp16, model.dtype={m.dtype}"
    if cfg.data.packing == "segments":
        return "data.packing=segments: the cuDNN core takes no segment ids"
    if not isinstance(devices[0], jax.Device):   # a platform stand-in (lowering elsewhere)
        return "no GPU device to try cuDNN on"
    from tfm_jax.layers.attention_ops import flash
    dt = jnp.dtype(m.dtype)
    t = min(cfg.data.seq_len, 256)
    q = jax.ShapeDtypeStruct((1, t, m.n_heads, m.resolved_head_dim), dt)
    kv = jax.ShapeDtypeStruct((1, t, m.n_kv_heads, m.resolved_head_dim), dt)
    valid = jax.ShapeDtypeStruct((1, t), jnp.bool_)
    try:
        with jax.default_device(devices[0]):
            jax.jit(flash.cudnn_attention).lower(q, kv, kv, valid).compile()
    except Exception as e:   # noqa: BLE001 -- jax's own reason, reported in one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return f"{type(e).__name__}: {first[:160]}"
    return None


def _gpu_attention(cfg: Config, devices: list, ops: Ops) -> Ops:
    """``backend.attention=auto`` on a GPU: cuDNN fused (flash) attention where it is supported,
    else the set's dense XLA core with the reason in the ``kernels:`` line."""
    from tfm_jax.layers import ops as ops_lib

    why = cudnn_attention_unsupported(cfg, devices)
    if why is None:
        return ops.with_attention(*ops_lib.attention_core("cudnn"))
    note = f"attention: dense XLA, not cuDNN ({why})"
    return dataclasses.replace(ops, detail=f"{ops.detail}; {note}" if ops.detail else note)


def _resolve_set(cfg: Config, devices: list) -> Ops:
    """The ops set for these devices and ``backend.cpu_kernels``.

    * GPU/TPU (any non-CPU platform): ``xla``, plain XLA ops.
    * CPU: ``cpu-native`` when ``backend.cpu_kernels`` allows it and the run can use the native
      kernels -- one device (XLA cannot partition a custom call over a mesh) and fp32 -- and the
      library builds/loads with the BLAS ``backend.cpu_blas`` names; otherwise ``cpu-xla``.
      ``auto`` falls back with the reason in ``Ops.detail``; ``native``, or a BLAS asked for by
      name that is not installed, raises ConfigError with it.
    """
    from tfm_jax.layers import ops as ops_lib

    platform = devices[0].platform
    if platform != "cpu":
        return dataclasses.replace(ops_lib.xla_ops(), detail=f"{platform} devices")
    choice = cfg.backend.cpu_kernels
    if choice == "xla":
        return dataclasses.replace(xla_cpu.cpu_xla_ops(), detail="backend.cpu_kernels=xla")
    reason = None
    if len(devices) > 1:
        reason = (f"the run uses {len(devices)} devices (native kernels are single-device; XLA "
                  f"cannot partition a custom call)")
    elif cfg.model.dtype != "float32" or cfg.model.param_dtype != "float32":
        reason = f"model dtype {cfg.model.dtype}/{cfg.model.param_dtype} (native kernels: float32)"
    else:
        from tfm_jax.platform.kernels import cpu
        blas = cfg.backend.cpu_blas
        ok, detail = cpu.available(None if blas == "auto" else blas)   # auto: $TFM_JAX_CPU_BLAS
                                                                        # or the best installed
        if ok:
            return cpu.native_ops(detail)
        if blas != "auto":      # asked for by name: not a reason to fall back silently
            raise ConfigError(f"backend.cpu_blas={blas}: {detail}")
        reason = detail
    if choice == "native":
        raise ConfigError(f"backend.cpu_kernels=native: {reason}; use backend.cpu_kernels=auto "
                          f"or xla")
    return dataclasses.replace(xla_cpu.cpu_xla_ops(), detail=f"native kernels not used: {reason}")


@functools.lru_cache(maxsize=None)
def measured_matmul_peak(n: int = 1024, dtype: str = "float32", seconds: float = 0.5) -> float:
    """FLOP/s of a jitted n x n x n matmul on the default device: the best of the repeats
    (at least 5) run for ``seconds``. Best, not median: other load only ever slows a matmul
    down, so the fastest repeat is the closest to what the machine can do.

    On CPU this is the whole machine's practical matmul peak (XLA:CPU spreads one GEMM over all
    cores), the denominator the benchmarks use for MFU. Runs use :func:`cached_matmul_peak`.
    """
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    times, t_end = [], time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(times) < 5:
        t0 = time.perf_counter()
        f(a, a).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2.0 * n ** 3 / min(times)


PEAK_CACHE_FILE = "matmul_peak.json"
PEAK_PROBE_SECONDS = 0.1      # the start-up probe that may raise a cached peak


def peak_cache_path() -> pathlib.Path:
    """``$TFM_JAX_CACHE/matmul_peak.json`` (default ``~/.cache/tfm_jax``)."""
    root = os.environ.get("TFM_JAX_CACHE") or "~/.cache/tfm_jax"
    return pathlib.Path(root).expanduser() / PEAK_CACHE_FILE


def _cpu_model() -> str:
    from tfm_jax.platform.kernels.cpu import cpuinfo_field

    return cpuinfo_field("model name") or platform.processor() or platform.machine()


def peak_cache_key(dtype: str) -> str:
    """What the measured peak depends on: the machine, jax, the dtype and the device setup."""
    dev = jax.devices()[0]
    return (f"{_cpu_model()} | {os.cpu_count()} cpus | jax {jax.__version__} | {dev.platform} "
            f"{dev.device_kind} x{jax.device_count()} | {dtype}")


def _read_peak_cache(path: pathlib.Path) -> dict:
    """The cache's entries, or {} if the file is missing or unreadable (it is then rewritten)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_peak_cache(path: pathlib.Path, entries: dict) -> None:
    """Atomically (temp file + ``os.replace``); a failure only costs a re-measurement later."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(entries, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            pathlib.Path(tmp).unlink(missing_ok=True)
            raise
    except OSError:
        pass


def read_cached_peak(dtype: str = "float32") -> Optional[dict]:
    """The cached peak entry (``flops``, ``measured``, ``method``) for this machine and
    ``dtype`` as :func:`cached_matmul_peak` keeps it, or None; measures nothing."""
    entry = _read_peak_cache(peak_cache_path()).get(peak_cache_key(dtype))
    if isinstance(entry, dict):
        flops = entry.get("flops")
        if isinstance(flops, (int, float)) and math.isfinite(flops) and flops > 0:
            return entry
    return None


def cached_matmul_peak(dtype: str = "float32") -> tuple[float, str]:
    """(FLOP/s, where it came from): the machine's matmul peak, measured once per machine
    (:func:`peak_cache_key`) and kept in :func:`peak_cache_path`, so MFU does not swing with
    the load at each start. A missing, corrupt or unusable entry is measured again."""
    path = peak_cache_path()
    key = peak_cache_key(dtype)
    entries = _read_peak_cache(path)
    entry = entries.get(key)
    if isinstance(entry, dict):
        flops = entry.get("flops")
        if isinstance(flops, (int, float)) and math.isfinite(flops) and flops > 0:
            # A short probe at each start can only raise the cached peak: a first measurement
            # taken on a busy machine would otherwise overstate MFU for good.
            probe = measured_matmul_peak.__wrapped__(dtype=dtype, seconds=PEAK_PROBE_SECONDS)
            if probe <= flops * 1.02:
                return float(flops), (f"cached in {path}, best so far (measured "
                                      f"{entry.get('measured', '?')}; this start's probe "
                                      f"{probe / 1e9:,.1f} GFLOP/s)")
            entries[key] = {"flops": probe, "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
                            "method": "start-up probe, faster than the cached value"}
            _write_peak_cache(path, entries)
            return probe, (f"this start's probe, faster than the {flops / 1e9:,.1f} GFLOP/s "
                           f"cached in {path} (updated)")
    flops = measured_matmul_peak.__wrapped__(dtype=dtype)
    entries[key] = {"flops": flops, "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "method": "best of >= 5 jitted 1024^3 matmuls over 0.5 s"}
    _write_peak_cache(path, entries)
    return flops, f"measured now (best of >= 5 x 1024^3 matmul), cached in {path}"


def peak_flops_info(cfg: Config, n_devices: int) -> tuple[float, str]:
    """(peak FLOP/s of the devices a run uses -- the MFU denominator --, its source)."""
    dev = jax.devices()[0]
    per_device = dev.platform != "cpu"     # fake CPU devices share the same cores
    if cfg.train.peak_flops is not None:
        return (cfg.train.peak_flops * (n_devices if per_device else 1),
                "train.peak_flops" + (f" x {n_devices} devices" if per_device else ""))
    if not per_device:
        flops, source = cached_matmul_peak(cfg.model.dtype)
        return flops, f"CPU {cfg.model.dtype} matmul peak, {source}"
    dtype = "bfloat16" if cfg.model.dtype == "float16" else cfg.model.dtype
    for key, table in _PEAKS.items():
        if key in dev.device_kind:
            return (table.get(dtype, table["float32"]) * n_devices,
                    f"vendor figure for {key} {dtype} x {n_devices} devices")
    flops, source = cached_matmul_peak(cfg.model.dtype)
    return flops * n_devices, f"{dev.device_kind} {cfg.model.dtype} matmul peak x {n_devices}, {source}"


def peak_flops(cfg: Config, n_devices: int) -> float:
    """Peak FLOP/s of the devices a run uses (the MFU denominator); see :func:`peak_flops_info`."""
    return peak_flops_info(cfg, n_devices)[0]
