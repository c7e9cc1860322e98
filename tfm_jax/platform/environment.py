"""``tfm-jax env``: what this machine and jax offer a run, and the scaling strategy to use.

:func:`report` gathers (after :func:`tfm_jax.platform.backends.configure` of the config's ``backend``):
versions (jax, jaxlib, flax, ml_dtypes, numpy, python), ``jax_platforms``, the started backends
and their devices, PJRT plugin status (the configured library, ``$TFM_JAX_PJRT_PLUGIN``,
``PJRT_NAMES_AND_LIBRARY_PATHS``, the ``jax_plugins`` jax will discover, and a configure error
if there was one), the native CPU kernels (:func:`tfm_jax.platform.kernels.cpu.available` and its BLAS),
native vs emulated FP8 (:func:`fp8_support`), the matmul peak (the cache
:func:`tfm_jax.platform.backends.cached_matmul_peak` keeps; measured only when nothing is cached, unless
``measure=False``), the numeric profile (the config's, else the one the devices match) and the
seed's Ch2.3 decision (:func:`tfm_jax.config.profiles.recommend_scaling`) for training and inference.

Light: imports jax (and the project's jax-free config/profiles); flax's version is read from
the package metadata, not by importing it.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform as py_platform
from typing import Any, Optional

from tfm_jax.config import profiles
from tfm_jax.config import BackendConfig, ConfigError

# device_kind substrings of NVIDIA GPUs with FP8 tensor cores (compute capability >= 8.9:
# Ada, Hopper, Blackwell), used when the device does not report its compute capability.
_FP8_GPU_KINDS = ("H100", "H200", "H800", "H20", "GH200", "B100", "B200", "GB200", "L4", "L40",
                  "RTX 40", "RTX 50", "RTX PRO 6000")


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def fp8_support(device: Any) -> tuple[str, str]:
    """(``native`` | ``emulated``, why) for FP8 GEMMs on ``device``: NVIDIA compute capability
    >= 8.9 (Ada/Hopper/Blackwell) or an HPU (Gaudi2/3 MME) is native; CPU, older GPUs and
    anything unknown emulate (quantize -> dequantize -> dot in the compute dtype: FP8 numerics,
    no speed-up; :func:`tfm_jax.quant.fp8.fp8_dot_mode` checks a compiled step)."""
    plat, kind = device.platform, str(getattr(device, "device_kind", ""))
    if plat == "cpu":
        return "emulated", "XLA:CPU has no FP8 GEMM (upcast dots)"
    if plat in ("gpu", "cuda"):
        cc = getattr(device, "compute_capability", None)
        if cc:
            try:
                major, minor = (int(x) for x in str(cc).split(".")[:2])
            except ValueError:
                major, minor = 0, 0
            if (major, minor) >= (8, 9):
                return "native", f"{kind}, compute capability {cc} (FP8 tensor cores)"
            return "emulated", f"{kind}, compute capability {cc} < 8.9 (no FP8 tensor cores)"
        if any(k in kind for k in _FP8_GPU_KINDS):
            return "native", f"{kind} (FP8 tensor cores)"
        return "emulated", f"{kind}: not known to have FP8 tensor cores"
    if plat == "hpu":
        return "native", f"{kind} (Gaudi MME FP8)"
    return "emulated", f"{plat} {kind}: FP8 GEMMs not known here"


def matching_profile(device: Any) -> Optional[str]:
    """The numeric profile the hardware is (``nvidia-hopper`` for H100/H200/GH200/H800/H20,
    ``gaudi2``/``gaudi3`` for HPUs naming them), or None."""
    kind = str(getattr(device, "device_kind", "")).lower()
    if device.platform in ("gpu", "cuda") and any(k in kind for k in ("h100", "h200", "h800",
                                                                      "h20", "gh200")):
        return "nvidia-hopper"
    if device.platform == "hpu":
        if "gaudi3" in kind:
            return "gaudi3"
        if "gaudi2" in kind or "gaudi" in kind:
            return "gaudi2"
    return None


def report(backend: Optional[BackendConfig] = None, *, measure: bool = True,
           dtype: str = "float32") -> dict[str, Any]:
    """The environment as a JSON-able dict (module doc). ``backend``: the config section to
    apply first (None: jax's defaults); a configure failure is reported under
    ``plugins.error`` and jax falls back to its default platforms for the rest."""
    import jax

    from tfm_jax.platform import backends

    backend = backend or BackendConfig()
    error = None
    before = jax.config.jax_platforms
    try:
        backends.configure(backend)
    except ConfigError as err:
        error = str(err)
        jax.config.update("jax_platforms", before)

    rep: dict[str, Any] = {
        "versions": {"python": py_platform.python_version(), "jax": jax.__version__,
                     "jaxlib": _version("jaxlib"), "flax": _version("flax"),
                     "ml_dtypes": _version("ml_dtypes"), "numpy": _version("numpy")},
        "jax_platforms": jax.config.jax_platforms or "(jax's default)",
    }
    path, source = backends.plugin_path(backend)
    rep["plugins"] = {
        "configured": ({"path": path, "from": source,
                        "registered_as": backends.PLUGIN_NAMES.get(backend.platform)}
                       if path else None),
        "TFM_JAX_PJRT_PLUGIN": os.environ.get(backends.PLUGIN_ENV),
        "PJRT_NAMES_AND_LIBRARY_PATHS": os.environ.get("PJRT_NAMES_AND_LIBRARY_PATHS"),
        "installed_jax_plugins": backends.installed_plugins(),
        "error": error,
    }
    devices = jax.devices()
    dev = devices[0]
    rep["backend"] = {"default": jax.default_backend(), "platform": dev.platform,
                      "device_kind": dev.device_kind, "device_count": len(devices),
                      "local_device_count": jax.local_device_count(),
                      "process_count": jax.process_count(),
                      "devices": [str(d) for d in devices[:8]]
                      + ([f"... {len(devices) - 8} more"] if len(devices) > 8 else [])}

    if dev.platform == "cpu":
        from tfm_jax.platform.kernels import cpu
        ok, detail = cpu.available()
        rep["cpu_kernels"] = {"available": ok, "detail": detail,
                              "single_device": len(devices) == 1,
                              "note": None if len(devices) == 1 else
                              "runs use them only on one device (backend.cpu_kernels)"}
    else:
        rep["cpu_kernels"] = {"available": False, "detail": f"not used on {dev.platform}"}

    mode, why = fp8_support(dev)
    rep["fp8"] = {"mode": mode, "reason": why}

    entry = backends.read_cached_peak(dtype)
    if entry is not None:
        rep["matmul_peak"] = {"flops": entry["flops"], "dtype": dtype,
                              "source": f"cached in {backends.peak_cache_path()} (measured "
                                        f"{entry.get('measured', '?')})"}
    elif measure:
        flops, src = backends.cached_matmul_peak(dtype)
        rep["matmul_peak"] = {"flops": flops, "dtype": dtype, "source": src}
    else:
        rep["matmul_peak"] = {"flops": None, "dtype": dtype,
                              "source": "not cached; not measured (--no-measure)"}

    configured = profiles.active_name(backend)
    hw = matching_profile(dev)
    name = configured if configured != "none" else hw
    rep["profile"] = {"configured": configured, "hardware_matches": hw, "used": name or "none",
                      "emulated": backend.emulate != "none"}
    native = mode == "native" and backend.emulate == "none"
    rec = {}
    for workload in ("training", "inference"):
        r = profiles.recommend_scaling(name, workload=workload, fp8_native=native)
        rec[workload] = {"scaling": r.scaling, "recipe": r.recipe, "reason": r.reason}
    rep["recommended_scaling"] = rec
    return rep


def format_report(rep: dict[str, Any]) -> str:
    """The text ``tfm-jax env`` prints."""
    v, b, p = rep["versions"], rep["backend"], rep["plugins"]
    lines = [f"versions   jax {v['jax']}, jaxlib {v['jaxlib']}, flax {v['flax']}, ml_dtypes "
             f"{v['ml_dtypes']}, numpy {v['numpy']}, python {v['python']}",
             f"platform   {b['platform']} (default backend {b['default']}; jax_platforms "
             f"{rep['jax_platforms']})",
             f"devices    {b['device_count']} x {b['device_kind']} ({b['process_count']} "
             f"process{'es' if b['process_count'] != 1 else ''}): {', '.join(b['devices'])}"]
    conf = p["configured"]
    plug = (f"{conf['path']} (from {conf['from']}, registered as '{conf['registered_as']}')"
            if conf else "none configured")
    lines.append(f"plugins    {plug}; installed jax_plugins: "
                 f"{', '.join(p['installed_jax_plugins']) or 'none'}"
                 + (f"; PJRT_NAMES_AND_LIBRARY_PATHS={p['PJRT_NAMES_AND_LIBRARY_PATHS']}"
                    if p["PJRT_NAMES_AND_LIBRARY_PATHS"] else ""))
    if p["error"]:
        lines.append(f"  ERROR    {p['error']}")
    k = rep["cpu_kernels"]
    lines.append(f"kernels    {'available' if k['available'] else 'not available'}: "
                 f"{k['detail']}" + (f" ({k['note']})" if k.get("note") else ""))
    lines.append(f"fp8        {rep['fp8']['mode']}: {rep['fp8']['reason']}")
    m = rep["matmul_peak"]
    lines.append(f"peak       " + (f"{m['flops'] / 1e9:,.1f} GFLOP/s {m['dtype']} matmul, "
                                   if m["flops"] else "") + m["source"])
    pr = rep["profile"]
    lines.append(f"profile    {pr['used']}" + (" (emulated on CPU)" if pr["emulated"] else "")
                 + (f"; the hardware matches {pr['hardware_matches']}"
                    if pr["hardware_matches"] else "; the hardware matches no profile"))
    for workload, r in rep["recommended_scaling"].items():
        lines.append(f"scaling    {workload}: {r['scaling']} (quant.recipe={r['recipe']}) -- "
                     f"{r['reason']}")
    return "\n".join(lines)


PROVENANCE_PACKAGES = ("tfm-jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy",
                       "ml_dtypes", "pydantic", "scipy-openblas32", "mkl", "tensorboardX")


def git_commit(path: Optional[str] = None) -> Optional[dict[str, Any]]:
    """``{"commit": sha, "dirty": bool}`` of the git checkout holding ``path`` (default: this
    package), or None when it is not a checkout or git is missing (an installed wheel)."""
    import pathlib
    import shutil
    import subprocess

    git = shutil.which("git")
    root = pathlib.Path(path or __file__).resolve().parent
    if git is None:
        return None
    try:
        sha = subprocess.run([git, "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        if sha.returncode != 0:
            return None
        status = subprocess.run([git, "-C", str(root), "status", "--porcelain",
                                 "--untracked-files=no"], capture_output=True, text=True,
                                timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return {"commit": sha.stdout.strip(), "dirty": bool(status.stdout.strip())}


def provenance(kernels: str, devices: Optional[list] = None) -> dict[str, Any]:
    """What a run ran with, for its ``environment.json``: package versions (None: not
    installed), Python, the platform and devices, the kernels line (ops set and BLAS) and the
    git commit of the checkout the package runs from (None for an installed wheel)."""
    import sys

    import jax

    devs = devices if devices is not None else jax.devices()
    return {
        "packages": {d: _version(d) for d in PROVENANCE_PACKAGES},
        "python": sys.version.split()[0],
        "platform": {"system": py_platform.system(), "release": py_platform.release(),
                     "machine": py_platform.machine(), "processor": py_platform.processor(),
                     "cpu_count": os.cpu_count()},
        "devices": {"platform": devs[0].platform, "kind": str(devs[0].device_kind),
                    "count": len(devs), "processes": jax.process_count()},
        "kernels": kernels,
        "git": git_commit(),
    }
