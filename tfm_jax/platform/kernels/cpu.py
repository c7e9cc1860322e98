"""Native fp32 CPU kernels (``cpu_kernels.cc``) as jax custom calls, each with its VJP: BLAS
GEMMs, causal GQA attention, the SwiGLU elementwise product and RMSNorm.

Why: on XLA:CPU (jax 0.10) the step of the benchmark model is bound by (a) GEMM kernels that run
at 75-85 % of an optimised BLAS's rate, worst for weight gradients (a transposed operand), and
(b) attention built from many small XLA ops that stall each other on the shared thread pool
(``benchmarks/README.md`` has the measurements). One custom call per GEMM and one per attention
forward/backward removes both; SwiGLU and RMSNorm were the largest elementwise costs left.

**Build.** The library is compiled on first use with the system C++ compiler (``-O3
-march=native``: the binary is specific to this host, so the cache key includes the CPU's model
and flags, the compile flags and the compiler's path and version) against XLA's FFI headers from
jaxlib, into ``$TFM_JAX_CACHE/kernels/<key>/`` (default ``~/.cache/tfm_jax``), written
atomically (temporary file + ``os.replace``), with a time limit (:data:`BUILD_TIMEOUT_S`). It
links **no BLAS**, so the key does not depend on one. A cached library is loaded only when the
cache folders and the file are owned by this user and not writable by group or others, and its
sha256 equals the one recorded beside it at build time; a cache that fails the first check is
reported (the kernels fall back to XLA with the reason), a mismatching hash is rebuilt.

**BLAS at run time.** :func:`load` opens a maintained BLAS with ``ctypes``, makes it
single-threaded inside a call and hands its ``cblas_sgemm`` to the library (``tfm_set_sgemm(fn,
ilp64)``); the project has no GEMM of its own. The choice is ``backend.cpu_blas`` / the ``blas``
argument / ``$TFM_JAX_CPU_BLAS`` (first given wins):

* ``openblas`` -- the ``scipy-openblas32`` wheel (a default dependency on Linux x86_64; ~26 MB
  installed). Its own library instance (symbols prefixed ``scipy_``), so setting it to one
  thread does not touch the OpenBLAS numpy bundles. The core OpenBLAS picked for this CPU
  (``openblas_get_corename``; forced by ``$OPENBLAS_CORETYPE`` where set) is part of
  :func:`available`'s detail.
* ``mkl`` -- ``libmkl_rt.so.<any version>`` from the optional ``mkl`` wheel
  (``pip install 'tfm-jax[mkl]'``, ~0.9 GB) or the interpreter's conda env, run with the
  sequential threading layer.

Libraries are located through the installed packages' metadata (:func:`find_blas`), never by
scanning ``sys.path`` or the current directory.
* ``auto`` -- the first of :data:`AUTO_ORDER` that is available and opens; the order depends
  on the CPU vendor (:func:`auto_order`: MKL first on Intel, OpenBLAS first elsewhere;
  ``benchmarks/README.md`` has the measurements behind it). A default install has OpenBLAS
  only; on Intel the ``kernels:`` line then says what the ``[mkl]`` extra would give
  (:func:`available`).

When any of that is missing :func:`available` says why and the model keeps the XLA path
(``backend.cpu_kernels: auto``); ``backend.cpu_kernels: native`` turns the reason into an error.

Caveat (MKL): ``libmkl_rt`` loads its MKL layers into the process's global symbol scope, so a
library with its own MKL that is loaded *later* (``import torch`` after the kernels loaded MKL)
can bind to them and run sequential MKL; import such libraries first, or use
``cpu_blas=openblas`` (prefixed symbols, no such effect).

Every BLAS runs single-threaded inside each call; the call splits its work over XLA's own
intra-op thread pool, so the process never has two thread pools competing for the cores.
``benchmarks/blas_compare.py`` measures the candidates side by side (it switches the BLAS of the
loaded library between steps with :func:`use_blas`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import glob
import hashlib
import importlib.metadata
import os
import re
import shutil
import site
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from tfm_jax.core.rundir import file_sha256

SOURCE = Path(__file__).with_name("cpu_kernels.cc")
TARGETS = ("tfm_gemm", "tfm_attn_fwd", "tfm_attn_bwd", "tfm_swiglu_fwd", "tfm_swiglu_bwd",
           "tfm_rms_fwd", "tfm_rms_bwd", "tfm_decode_attn")
BLAS_CHOICES = ("auto", "openblas", "mkl")
# What ``auto`` tries, in order, by CPU vendor (benchmarks/README.md, "Which BLAS", has the
# figures; `python -m benchmarks.blas_processes` measures a machine). On Intel (a Sapphire Rapids
# VM) MKL, when installed (the [mkl] extra), gave the fastest train step; on AMD (EPYC Zen 4 VMs)
# MKL was slower than scipy-openblas32, so it comes last there.
_AUTO_ORDERS = {"GenuineIntel": ("mkl", "openblas")}
_AUTO_ORDER_OTHER = ("openblas", "mkl")


def cpuinfo_field(name: str) -> str:
    """The first ``name`` field of /proc/cpuinfo ("vendor_id", "model name", ...), or ""."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_vendor() -> str:
    """The CPU's ``vendor_id`` ("GenuineIntel", "AuthenticAMD", ...), or ""."""
    return cpuinfo_field("vendor_id")


def auto_order(vendor: Optional[str] = None) -> tuple[str, ...]:
    """The BLAS order ``cpu_blas=auto`` tries on a CPU of ``vendor`` (default: this one's)."""
    return _AUTO_ORDERS.get(cpu_vendor() if vendor is None else vendor, _AUTO_ORDER_OTHER)


AUTO_ORDER = auto_order()
INSTALL_HINT = {
    "openblas": "pip install scipy-openblas32 (a default dependency of tfm-jax on Linux x86_64)",
    "mkl": "pip install 'tfm-jax[mkl]' (or pip install mkl)",
}
_lock = threading.RLock()      # re-entered: load() -> available() -> load()
_state: dict = {"blas": {}}


# --------------------------------------------------------------------------------------------
# Finding BLAS libraries (pure path logic; nothing is loaded here)

_MKL_RT = re.compile(r"^libmkl_rt\.so(?:\.(\d+(?:\.\d+)*))?$")
# Where each kind's library comes from: (distribution, pattern of the file it installs).
_BLAS_DISTS = {
    "openblas": (("scipy-openblas32", re.compile(r"(^|/)scipy_openblas32/lib/libscipy_openblas[^/]*\.so$")),),
    "numpy-openblas": (("numpy", re.compile(r"(^|/)numpy\.libs/libscipy_openblas64_[^/]*\.so$")),),
    "mkl": (("mkl", re.compile(r"(^|/)libmkl_rt\.so(\.\d+)*$")),),
}


def _trusted_install_dirs() -> list[Path]:
    """Where this interpreter installs packages: its purelib/platlib (and the user site when
    Python itself enables it) -- never the current directory or an arbitrary ``sys.path`` entry."""
    import sysconfig

    dirs = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    if site.ENABLE_USER_SITE:
        dirs.add(site.getusersitepackages())
    return [Path(os.path.realpath(d)) for d in dirs if d]


def _installed(name: str) -> list:
    """The installed distributions called ``name`` whose metadata sits in one of
    :func:`_trusted_install_dirs` (a ``*.dist-info`` planted in the working directory, which
    ``python -m`` puts on ``sys.path``, is not one)."""
    trusted = _trusted_install_dirs()
    out = []
    for dist in importlib.metadata.distributions(name=name):
        root = Path(os.path.realpath(str(dist.locate_file(""))))
        if any(root == t or t in root.parents for t in trusted):
            out.append(dist)
    return out


def _unique_files(paths: Iterable[Path]) -> list[Path]:
    out, seen = [], set()
    for p in paths:
        if not p.is_file():
            continue
        real = os.path.realpath(p)
        if real not in seen:
            seen.add(real)
            out.append(p)
    return out


def _mkl_version_key(p: Path) -> tuple:
    m = _MKL_RT.match(p.name)
    return tuple(int(x) for x in m.group(1).split(".")) if m and m.group(1) else ()


def find_blas(dists: Optional[dict[str, Iterable]] = None,
              prefixes: Optional[Iterable[Path]] = None) -> dict[str, list[Path]]:
    """Candidate BLAS libraries by kind, best first, without loading anything, located through
    the files the installed packages' metadata lists (``importlib.metadata``), never by scanning
    ``sys.path``, the current directory, ``$CONDA_PREFIX`` or ``~/.local``:

    * ``openblas``: ``scipy_openblas32/lib/libscipy_openblas*.so`` of ``scipy-openblas32``,
    * ``numpy-openblas``: ``numpy.libs/libscipy_openblas64_*.so`` of ``numpy`` (its own ILP64
      copy; measured by ``benchmarks/blas_compare.py`` only, see :func:`open_blas`),
    * ``mkl``: ``libmkl_rt.so[.N...]`` of the ``mkl`` wheel (highest soname version first), then
      the interpreter's own ``<sys.prefix>/lib/libmkl_rt.so*`` (a conda env's MKL package
      has no Python metadata).

    ``dists`` (distribution name -> distributions) and ``prefixes`` replace the installed ones
    and ``[sys.prefix]`` (tests: fake ``*.dist-info`` folders).
    """
    def of(name: str) -> list:
        return list(dists.get(name, ())) if dists is not None else _installed(name)

    found: dict[str, list[Path]] = {}
    for kind, sources in _BLAS_DISTS.items():
        paths = [Path(str(d.locate_file(f))) for name, pattern in sources for d in of(name)
                 for f in (d.files or ()) if pattern.search(str(f).replace(os.sep, "/"))]
        if kind == "mkl":
            pre = [Path(sys.prefix)] if prefixes is None else list(prefixes)
            paths += [Path(p) for r in pre for p in glob.glob(str(r / "lib" / "libmkl_rt.so*"))]
            paths = sorted((p for p in paths if _MKL_RT.match(p.name)), key=_mkl_version_key,
                           reverse=True)
        found[kind] = _unique_files(paths)
    return found


# --------------------------------------------------------------------------------------------
# Opening a BLAS: single-threaded inside a call, self-checked, described


@dataclasses.dataclass(frozen=True)
class Blas:
    """An opened BLAS library: what :func:`use_blas` hands to the kernels."""
    kind: str            # "openblas" | "numpy-openblas" | "mkl"
    path: Path
    version: str         # "OpenBLAS 0.3.34.481.3", "Intel MKL 2026.2.1"
    core: str            # OpenBLAS: the kernel set picked for this CPU; MKL: ""
    sgemm: int           # address of cblas_sgemm (LP64) / its ILP64 variant
    ilp64: bool
    source: str          # "scipy-openblas32", "numpy's bundled OpenBLAS", "(sequential)"

    def describe(self) -> str:
        """``OpenBLAS 0.3.34 scipy-openblas32, SkylakeX core; /path/libscipy_openblas.so``,
        ``Intel MKL 2026.2.1 (sequential); /path/libmkl_rt.so.3``"""
        core = f", {self.core} core" if self.core else ""
        forced = [f"{k}={os.environ[k]}" for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
                  if self.kind != "mkl" and os.environ.get(k)]
        forced_s = f" (forced by {', '.join(forced)})" if forced else ""
        return f"{self.version} {self.source}{core}{forced_s}; {self.path}"


_SGEMM_ARGS = {False: ctypes.c_int32, True: ctypes.c_int64}


def _self_check(addr: int, ilp64: bool, name: str) -> None:
    """C = A B on 2x3 @ 3x2 through the raw pointer (catches a wrong symbol or ABI at once)."""
    i = _SGEMM_ARGS[ilp64]
    fn = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_int, ctypes.c_int, i, i, i, ctypes.c_float,
                          ctypes.c_void_p, i, ctypes.c_void_p, i, ctypes.c_float, ctypes.c_void_p,
                          i)(addr)
    a = np.arange(1, 7, dtype=np.float32).reshape(2, 3)
    b = np.arange(1, 7, dtype=np.float32).reshape(3, 2)[::-1].copy()
    c = np.full((2, 2), np.nan, np.float32)
    fn(101, 111, 111, 2, 2, 3, 1.0, a.ctypes.data, 3, b.ctypes.data, 2, 0.0, c.ctypes.data, 2)
    if not np.allclose(c, a.astype(np.float64) @ b):
        raise RuntimeError(f"{name}: sgemm self-check failed ({c.tolist()})")


def _addr(lib: ctypes.CDLL, sym: str) -> int:
    return ctypes.cast(getattr(lib, sym), ctypes.c_void_p).value


def _open_openblas(path: Path, kind: str) -> Blas:
    # scipy-openblas32: scipy_cblas_sgemm (LP64); numpy's scipy-openblas64: ..._sgemm64_ (ILP64)
    suffix, ilp64 = ("64_", True) if kind == "numpy-openblas" else ("", False)
    lib = ctypes.CDLL(str(path), mode=os.RTLD_LOCAL)
    getattr(lib, f"scipy_openblas_set_num_threads{suffix}")(1)
    for f in ("get_config", "get_corename"):
        getattr(lib, f"scipy_openblas_{f}{suffix}").restype = ctypes.c_char_p
    config = getattr(lib, f"scipy_openblas_get_config{suffix}")().decode(errors="replace").split()
    core = getattr(lib, f"scipy_openblas_get_corename{suffix}")().decode(errors="replace")
    version = " ".join(config[:2]) if config else "OpenBLAS"
    addr = _addr(lib, f"scipy_cblas_sgemm{suffix}")
    _self_check(addr, ilp64, str(path))
    source = "numpy's bundled OpenBLAS" if kind == "numpy-openblas" else "scipy-openblas32"
    _state.setdefault("handles", []).append(lib)         # never unloaded
    return Blas(kind, path, version, core, addr, ilp64, source)


def _open_mkl(path: Path) -> Blas:
    lib = ctypes.CDLL(str(path), mode=os.RTLD_LOCAL)
    lib.MKL_Set_Interface_Layer(0)                       # LP64
    layer = lib.MKL_Set_Threading_Layer(1)               # 1 = MKL_THREADING_SEQUENTIAL
    if layer != 1:
        raise RuntimeError(f"{path}: MKL is already initialised in this process with threading "
                           f"layer {layer}, not sequential")
    buf = ctypes.create_string_buffer(256)
    lib.MKL_Get_Version_String(buf, len(buf))
    full = buf.value.decode(errors="replace")
    m = re.search(r"Version ([0-9][0-9.]*)", full)
    version = f"Intel MKL {m.group(1)}" if m else (full or "Intel MKL")
    addr = _addr(lib, "cblas_sgemm")
    _self_check(addr, False, str(path))
    _state.setdefault("handles", []).append(lib)
    return Blas("mkl", path, version, "", addr, False, "(sequential)")


def open_blas(kind: str, path: Path) -> Blas:
    """Opens one library found by :func:`find_blas` and sets it to one thread per call.

    ``numpy-openblas`` sets the thread count of the OpenBLAS instance numpy itself uses, so it
    is for ``benchmarks/blas_compare.py`` only (not a ``backend.cpu_blas`` choice): numpy's own
    matmuls in the process would then run on one core.
    """
    if sys.platform != "linux":
        raise RuntimeError(f"BLAS loading is implemented for Linux only (this is {sys.platform})")
    key = (kind, os.path.realpath(path))
    cache = _state.setdefault("opened", {})
    if key not in cache:
        try:
            cache[key] = _open_mkl(path) if kind == "mkl" else _open_openblas(path, kind)
        except (OSError, AttributeError, RuntimeError) as e:
            cache[key] = RuntimeError(f"{kind} at {path}: {type(e).__name__}: {e}")
    if isinstance(cache[key], Exception):
        raise cache[key]
    return cache[key]


def resolve_blas(choice: Optional[str] = None) -> Blas:
    """The BLAS for ``choice`` (``auto`` | ``openblas`` | ``mkl``; None: ``$TFM_JAX_CPU_BLAS``
    or ``auto``), opened; RuntimeError naming what was searched and how to install it."""
    choice = choice or os.environ.get("TFM_JAX_CPU_BLAS") or "auto"
    if choice not in BLAS_CHOICES:
        removed = (" (the hand-written 'builtin' sgemm was removed; use auto or openblas, "
                   "or mkl with pip install 'tfm-jax[mkl]')" if choice == "builtin" else "")
        raise RuntimeError(f"cpu_blas={choice!r}: must be one of {', '.join(BLAS_CHOICES)}"
                           f"{removed}")
    found = find_blas()
    errors = []
    for kind in (AUTO_ORDER if choice == "auto" else (choice,)):
        if not found[kind]:
            errors.append(f"{kind}: not installed ({INSTALL_HINT[kind]})")
            continue
        for path in found[kind]:
            try:
                return open_blas(kind, path)
            except RuntimeError as e:
                errors.append(str(e))
    raise RuntimeError(f"cpu_blas={choice}: no usable BLAS for the native CPU kernels; "
                       + "; ".join(errors))


# --------------------------------------------------------------------------------------------
# Building and loading the kernel library


def _cpu_id() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown-cpu"
    keep = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))][:2]
    return "\n".join(keep)


BUILD_TIMEOUT_S = 300          # a compiler that hangs must not hang the run
_LIB_NAME = "libtfm_cpu_kernels.so"


def _compiler_version(cxx: str) -> str:
    """The first line of ``cxx --version`` (part of the cache key)."""
    try:
        proc = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise RuntimeError(f"{cxx} --version failed: {e}") from None
    return (proc.stdout.splitlines() or ["?"])[0]


def trusted_dir(path: Path) -> None:
    """RuntimeError unless ``path`` is a folder owned by this user and not writable by group or
    others (a cache others can write could hand this process a library to load); a folder
    that is not is never created, fixed or used, only reported."""
    st = os.lstat(path)
    import stat as stat_lib

    if stat_lib.S_ISLNK(st.st_mode):
        st = os.stat(path)
    problems = []
    if not stat_lib.S_ISDIR(st.st_mode):
        problems.append("not a folder")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        problems.append(f"owned by uid {st.st_uid}, not by you (uid {os.getuid()})")
    if st.st_mode & 0o022:
        problems.append(f"writable by group or others (mode {st.st_mode & 0o777:o})")
    if problems:
        raise RuntimeError(f"kernel cache {path}: {'; '.join(problems)}; nothing is loaded from "
                           f"it. Use a cache of your own ($TFM_JAX_CACHE) or chmod go-w it")


def _trusted_file(path: Path) -> None:
    st = os.lstat(path)
    import stat as stat_lib

    if not stat_lib.S_ISREG(st.st_mode) or (hasattr(os, "getuid") and st.st_uid != os.getuid()) \
            or st.st_mode & 0o022:
        raise RuntimeError(f"kernel cache file {path}: not a regular file of yours that only you "
                           f"can write; nothing is loaded from it (remove it to rebuild)")


def _makedirs_private(path: Path, root: Path) -> None:
    """Create ``path`` (under ``root``) with mode 0700 where missing; check every level."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    for p in [path, *path.relative_to(root).parents]:
        trusted_dir(root / p if p != path else p)


def _build_plan(cache_root: Path) -> tuple[str, list[str], Path]:
    """(compiler, flags, the cache folder of this build): the key is the source, jax (FFI
    headers), the compiler's path and version, the flags and the CPU (the library links no
    BLAS)."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise RuntimeError("no C++ compiler (g++/c++) on PATH to build tfm_jax's CPU kernels")
    flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w",
             "-Wl,--no-undefined", f"-I{jax.ffi.include_dir()}"]
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), jax.__version__.encode(),
                                     cxx.encode(), _compiler_version(cxx).encode(),
                                     " ".join(flags).encode(), _cpu_id().encode()])
                         ).hexdigest()[:16]
    return cxx, flags, cache_root / "kernels" / key


def _build(cache_root: Path) -> Path:
    """The kernel library for this host, built into the cache or taken from it only when the
    cache folders and file are this user's, not writable by others, and the library's sha256
    equals the one recorded at build time (``<lib>.sha256``); otherwise rebuilt."""
    if sys.platform != "linux":
        raise RuntimeError(f"native CPU kernels are built for Linux only (this is {sys.platform})")
    cxx, flags, out_dir = _build_plan(cache_root)
    cache_root.mkdir(mode=0o700, parents=True, exist_ok=True)
    _makedirs_private(out_dir, cache_root)
    trusted_dir(cache_root)
    lib, digest = out_dir / _LIB_NAME, out_dir / (_LIB_NAME + ".sha256")
    if lib.exists() or lib.is_symlink():
        _trusted_file(lib)
        if digest.is_file() and not digest.is_symlink():
            _trusted_file(digest)
            if digest.read_text().strip() == file_sha256(lib):
                return lib
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".build.", suffix=".so")
    os.close(fd)
    cmd = [cxx, *flags, str(SOURCE), "-o", tmp]
    try:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"building {SOURCE.name} took more than {BUILD_TIMEOUT_S} s "
                               f"({' '.join(cmd)}); stopped") from None
        if proc.returncode != 0:
            raise RuntimeError(f"building {SOURCE.name} failed ({' '.join(cmd)}):\n"
                               f"{proc.stderr[-2000:]}")
        os.chmod(tmp, 0o700)
        sha = file_sha256(Path(tmp))
        fd, tmp_digest = tempfile.mkstemp(dir=out_dir, prefix=".build.", suffix=".sha256")
        with os.fdopen(fd, "w") as f:
            f.write(sha + "\n")
        os.replace(tmp, lib)                       # atomic: never a half-written library
        os.replace(tmp_digest, digest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def _cache_root() -> Path:
    return Path(os.environ.get("TFM_JAX_CACHE") or "~/.cache/tfm_jax").expanduser()


def _verify(lib: Path) -> None:
    """RuntimeError unless ``lib`` is still this user's file with the recorded sha256."""
    _trusted_file(lib)
    digest = lib.with_name(lib.name + ".sha256")
    if digest.is_symlink() or not digest.is_file() or digest.read_text().strip() != file_sha256(lib):
        raise RuntimeError(f"{lib}: its sha256 does not match the one recorded when it was "
                           f"built; not loaded")


def _load_library() -> None:
    if _state.get("lib") is not None:
        return
    if "error" in _state:
        raise RuntimeError(_state["error"])
    try:
        path = _build(_cache_root())
        _verify(path)                              # checked again just before the load
        lib = ctypes.CDLL(str(path))
        lib.tfm_set_sgemm.argtypes = (ctypes.c_void_p, ctypes.c_int)
        for name in TARGETS:
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)),
                                        platform="cpu")
    except Exception as e:  # noqa: BLE001 -- reported by available()/resolve()
        _state["error"] = f"{type(e).__name__}: {e}"
        raise RuntimeError(_state["error"]) from e
    _state.update(lib=lib, path=path)


def use_blas(blas: Blas) -> Optional[Blas]:
    """Points the loaded kernels at ``blas`` (returns the previous one). Process-wide: call it
    between computations, never while one runs (``block_until_ready`` first)."""
    with _lock:
        _load_library()
        prev = _state.get("active")
        _state["lib"].tfm_set_sgemm(blas.sgemm, int(blas.ilp64))
        _state["active"] = blas
        return prev


def load(blas: Optional[str] = None) -> None:
    """Build (once per host and source version), load and register the kernels and give them the
    BLAS ``blas`` (``auto`` | ``openblas`` | ``mkl``; None: ``$TFM_JAX_CPU_BLAS``,
    else the one already in use, else ``auto``); raises RuntimeError naming what is missing."""
    choice = blas or os.environ.get("TFM_JAX_CPU_BLAS") or None
    with _lock:
        if choice is None and _state.get("active") is not None:
            return                                 # the hot path: every kernel call lands here
        _load_library()
        choice = choice or "auto"
        cached = _state["blas"].get(choice)
        if cached is None:
            try:
                cached = resolve_blas(choice)
            except RuntimeError as e:
                cached = e
            _state["blas"][choice] = cached
        if isinstance(cached, Exception):
            raise RuntimeError(str(cached))
        if _state.get("active") is not cached:
            _state["lib"].tfm_set_sgemm(cached.sgemm, int(cached.ilp64))
            _state["active"] = cached


# What the [mkl] extra gives a default install (OpenBLAS), by CPU vendor: said in the
# ``kernels:`` line where MKL is not installed (benchmarks/README.md, "Which BLAS", has the
# figures: on an Intel Xeon VM MKL's train step was ~1.3x OpenBLAS's, fresh processes). On AMD
# (EPYC Zen 4 VMs) the two were within noise of each other, so nothing is suggested there.
EXTRA_HINTS = {
    "GenuineIntel": "pip install 'tfm-jax[mkl]' for MKL, ~1.3x OpenBLAS's train step on Intel "
                    "(benchmarks/README.md)",
}


def extra_hint(blas: Blas, vendor: Optional[str] = None,
               mkl_installed: Optional[bool] = None) -> str:
    """What installing the ``[mkl]`` extra would give a run on ``blas`` on a CPU of ``vendor``
    (default: this one), or "" -- nothing where MKL already runs, is installed (then not using
    it was a choice), or was not measured faster on this vendor's CPUs."""
    hint = EXTRA_HINTS.get(cpu_vendor() if vendor is None else vendor, "")
    if not hint or blas.kind == "mkl":
        return ""
    if mkl_installed is None:
        mkl_installed = bool(find_blas()["mkl"])
    return "" if mkl_installed else hint


def available(blas: Optional[str] = None) -> tuple[bool, str]:
    """(True, one line: which BLAS -- name, version, core and library path -- and, where it
    applies, what the ``[mkl]`` extra would give, :func:`extra_hint`) if the kernels load on
    this host with ``blas`` (see :func:`load`), else (False, why not)."""
    try:
        load(blas)
    except RuntimeError as e:
        return False, str(e)
    active = _state["active"]
    hints = _state.setdefault("hints", {})
    if id(active) not in hints:
        hints[id(active)] = extra_hint(active)
    hint = hints[id(active)]
    return True, active.describe() + (f"; {hint}" if hint else "")


def active_blas() -> Optional[Blas]:
    """The BLAS the kernels call now (None before :func:`load`)."""
    return _state.get("active")


def library_path() -> Optional[Path]:
    """The built kernel library (None before :func:`load`)."""
    return _state.get("path")


# --------------------------------------------------------------------------------------------
# GEMM


def _gemm(a: jax.Array, b: jax.Array, ta: bool = False, tb: bool = False) -> jax.Array:
    load()                                        # registers the custom calls (once)
    m = a.shape[1] if ta else a.shape[0]
    n = b.shape[0] if tb else b.shape[1]
    return jax.ffi.ffi_call("tfm_gemm", jax.ShapeDtypeStruct((m, n), jnp.float32))(
        a, b, ta=ta, tb=tb)


@jax.custom_vjp
def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """(N, K) @ (K, M) in fp32 on the loaded BLAS. VJP: ``dx = dy W^T`` and ``dW = x^T dy`` with
    the transposes passed to ``sgemm`` as flags (no copies)."""
    return _gemm(x, w)


def _matmul_fwd(x, w):
    return _gemm(x, w), (x, w)


def _matmul_bwd(res, dy):
    x, w = res
    return _gemm(dy, w, tb=True), _gemm(x, dy, ta=True)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dot_general(x, w, dimension_numbers, precision=None, preferred_element_type=None):
    """``Linear``'s dot_general contract (2-D, contracting x's last with w's first axis)."""
    if dimension_numbers != (((1,), (0,)), ((), ())):
        raise ValueError(f"native matmul takes (N, K) @ (K, M) only, got {dimension_numbers}")
    if x.dtype != jnp.float32 or w.dtype != jnp.float32:
        raise ValueError(f"native matmul is fp32 only, got {x.dtype} @ {w.dtype}")
    if XLA_ROWS[0] <= x.shape[0] < XLA_ROWS[1]:
        return jax.lax.dot_general(x, w, dimension_numbers)
    return matmul(x, w)


# Rows for which XLA's own dot beats tfm_gemm: KV-cache decode of a few sequences per step.
# Measured at the decode benchmark's reference shape (2-core AMD EPYC, OpenBLAS; median ms per
# decode step over 16 interleaved rounds): 1 row native 0.77 vs XLA 0.90; 4 rows XLA 2.20 vs
# native 2.44; 16 rows XLA 5.78 vs native 6.75. Training steps have thousands of rows.
XLA_ROWS = (2, 32)


# --------------------------------------------------------------------------------------------
# SwiGLU elementwise


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """Drop-in for :func:`tfm_jax.layers.ffn.swiglu` (fp32): ``silu(gate) * up`` in one pass over
    the pool; the VJP recomputes the sigmoid in its one pass (nothing extra saved)."""
    return _swiglu_fwd(gate, up)[0]


def _swiglu_fwd(gate, up):
    load()
    if gate.dtype != jnp.float32 or up.dtype != jnp.float32:
        raise ValueError(f"native swiglu is fp32 only, got {gate.dtype}/{up.dtype}")
    h = jax.ffi.ffi_call("tfm_swiglu_fwd", jax.ShapeDtypeStruct(gate.shape, jnp.float32))(
        gate, up)
    return h, (gate, up)


def _swiglu_bwd(res, dh):
    gate, up = res
    shapes = (jax.ShapeDtypeStruct(gate.shape, jnp.float32),) * 2
    return tuple(jax.ffi.ffi_call("tfm_swiglu_bwd", shapes)(gate, up, dh.astype(jnp.float32)))


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


# --------------------------------------------------------------------------------------------
# RMSNorm


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """Drop-in for :func:`tfm_jax.layers.norms.rms_norm` (fp32): normalises the last axis."""
    if x.dtype != jnp.float32 or scale.dtype != jnp.float32:
        raise ValueError(f"native rms_norm is fp32 only, got {x.dtype}/{scale.dtype}")
    d = x.shape[-1]
    return _rms(x.reshape(-1, d), scale, float(eps)).reshape(x.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _rms(x, scale, eps):
    return _rms_fwd(x, scale, eps)[0]


def _rms_fwd(x, scale, eps):
    load()
    y = jax.ffi.ffi_call("tfm_rms_fwd", jax.ShapeDtypeStruct(x.shape, jnp.float32))(
        x, scale, eps=np.float32(eps))
    return y, (x, scale)


def _rms_bwd(eps, res, dy):
    x, scale = res
    parts = max(1, min(x.shape[0] // 64, 64))       # rows per dscale partial sum
    dx, dscale_parts = jax.ffi.ffi_call(
        "tfm_rms_bwd", (jax.ShapeDtypeStruct(x.shape, jnp.float32),
                        jax.ShapeDtypeStruct((parts, x.shape[1]), jnp.float32)))(
        x, scale, dy.astype(jnp.float32), eps=np.float32(eps))
    return dx, dscale_parts.sum(0)


_rms.defvjp(_rms_fwd, _rms_bwd)


# --------------------------------------------------------------------------------------------
# Causal attention


def _attn_fwd_call(q, k, v, k_seg, q_seg, block):
    load()
    b, t, h, _ = q.shape
    return jax.ffi.ffi_call(
        "tfm_attn_fwd", (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                         jax.ShapeDtypeStruct((2, b, h, t), jnp.float32)))(
        q, k, v, k_seg, q_seg, block=np.int64(block))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention(q, k, v, k_seg, q_seg, block):
    return _attn_fwd_call(q, k, v, k_seg, q_seg, block)[0]


def _attention_fwd(q, k, v, k_seg, q_seg, block):
    o, stats = _attn_fwd_call(q, k, v, k_seg, q_seg, block)
    return o, (q, k, v, k_seg, q_seg, o, stats)


def _attention_bwd(block, res, do):
    q, k, v, k_seg, q_seg, o, stats = res
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
    dq, dk, dv = jax.ffi.ffi_call("tfm_attn_bwd", shapes)(
        q, k, v, k_seg, q_seg, o, stats, do.astype(jnp.float32), block=np.int64(block))
    return dq, dk, dv, jnp.zeros_like(k_seg), jnp.zeros_like(q_seg)


_attention.defvjp(_attention_fwd, _attention_bwd)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                     k_valid: Optional[jax.Array] = None, *, block_q: int = 64,
                     segment_ids: Optional[jax.Array] = None) -> jax.Array:
    """Drop-in for :func:`tfm_jax.layers.attention_ops.block.causal_attention` (fp32): same blocks of
    ``block_q`` queries, same masking (incl. fully masked rows and the segment ids of packed
    documents), one custom call each way. The kernel compares each key's segment (-1: padding)
    with its query's; without ``segment_ids`` every position is segment 1."""
    if q.dtype != jnp.float32 or k.dtype != jnp.float32 or v.dtype != jnp.float32:
        raise ValueError(f"native attention is fp32 only, got {q.dtype}/{k.dtype}/{v.dtype}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} kv heads")
    q_seg = (jnp.ones(q.shape[:2], jnp.float32) if segment_ids is None
             else segment_ids.astype(jnp.float32))                                   # (B, T)
    k_seg = q_seg if k_valid is None else jnp.where(k_valid > 0, q_seg, -1.0)
    from tfm_jax.layers.attention_ops.dense import zero_keyless_rows
    return zero_keyless_rows(_attention(q, k, v, k_seg, q_seg, int(block_q)), k_valid,
                             segment_ids)


# --------------------------------------------------------------------------------------------
# KV-cache decode attention


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array,
                     k_scale: Optional[jax.Array] = None,
                     v_scale: Optional[jax.Array] = None) -> jax.Array:
    """Drop-in for :func:`tfm_jax.layers.attention_ops.dense.cached_attention` (the ``cached_attention``
    of the native set): one custom call that reads each row's cache only up to its query
    positions (the XLA version reads and masks all ``S`` slots). Inference only (no VJP).

    Native for float32 caches; a quantized cache (``k_scale`` given: int8 / e4m3 storage) runs
    the XLA version, which :meth:`~tfm_jax.layers.ops.Ops.describe` states."""
    if k_scale is not None or q.dtype != jnp.float32 or k.dtype != jnp.float32:
        from tfm_jax.layers.attention_ops import dense
        return dense.cached_attention(q, k, v, q_positions, k_scale, v_scale)
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} kv heads")
    load()
    return jax.ffi.ffi_call("tfm_decode_attn", jax.ShapeDtypeStruct(q.shape, jnp.float32))(
        q, k, v, q_positions.astype(jnp.int32))


@functools.lru_cache(maxsize=None)
def native_ops(detail: str = ""):
    """The ``cpu-native`` :class:`~tfm_jax.layers.ops.Ops` set: these custom calls; builds/loads
    the library (raises RuntimeError with the reason when it cannot)."""
    from tfm_jax.layers.ops import Ops
    load()
    return Ops("cpu-native", dot_general, causal_attention, rms_norm, swiglu, cached_attention,
               detail=detail)
