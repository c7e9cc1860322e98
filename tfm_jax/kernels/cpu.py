"""Native fp32 CPU kernels (``cpu_kernels.cc``) as jax custom calls, each with its VJP: MKL GEMMs,
causal GQA attention, the SwiGLU elementwise product and RMSNorm.

Why: on XLA:CPU (jax 0.10) the step of the benchmark model is bound by (a) GEMM kernels that run
at 75-85 % of MKL's rate, worst for weight gradients (a transposed operand), and (b) attention
built from many small XLA ops that stall each other on the shared thread pool
(``benchmarks/README.md`` has the measurements). One custom call per GEMM and one per attention
forward/backward removes both; SwiGLU and RMSNorm were the largest elementwise costs left.

The library is compiled on first use with the system C++ compiler (``-O3 -march=native``: the
binary is specific to this host, so the cache key includes the CPU's model and flags) against
``libmkl_rt`` from the ``mkl`` wheel and XLA's FFI headers from jaxlib, into
``$TFM_JAX_CACHE/kernels/<key>/`` (default ``~/.cache/tfm_jax``), written atomically. When any of
that is missing :func:`available` says why and the model keeps the XLA path
(``backend.cpu_kernels: auto``); ``backend.cpu_kernels: native`` turns the reason into an error.

MKL runs sequentially inside each call; the call splits its work over XLA's own intra-op thread
pool, so the process never has two thread pools competing for the cores.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = Path(__file__).with_name("cpu_kernels.cc")
TARGETS = ("tfm_gemm", "tfm_attn_fwd", "tfm_attn_bwd", "tfm_swiglu_fwd", "tfm_swiglu_bwd",
           "tfm_rms_fwd", "tfm_rms_bwd")
_lock = threading.Lock()
_state: dict = {}


def _find_mkl() -> Optional[Path]:
    """libmkl_rt.so.2 of the ``mkl`` wheel (installed under the interpreter's prefix)."""
    roots = {sys.prefix, sys.base_prefix, os.path.dirname(os.path.dirname(sys.executable))}
    for root in roots:
        for name in ("libmkl_rt.so.2", "libmkl_rt.so"):
            hits = sorted(glob.glob(os.path.join(root, "lib", name)))
            if hits:
                return Path(hits[0])
    return None


def _cpu_id() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown-cpu"
    keep = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))][:2]
    return "\n".join(keep)


def _build(cache_root: Path) -> Path:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise RuntimeError("no C++ compiler (g++/c++) on PATH to build tfm_jax's CPU kernels")
    if sys.platform != "linux":
        raise RuntimeError(f"native CPU kernels are built for Linux only (this is {sys.platform})")
    mkl = _find_mkl()
    if mkl is None:
        raise RuntimeError("libmkl_rt not found: install the 'mkl' wheel (pip install mkl)")
    include = jax.ffi.include_dir()
    src = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([src, jax.__version__.encode(), str(mkl).encode(),
                                     cxx.encode(), _cpu_id().encode()])).hexdigest()[:16]
    out_dir = cache_root / "kernels" / key
    lib = out_dir / "libtfm_cpu_kernels.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".build.", suffix=".so")
    os.close(fd)
    cmd = [cxx, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w",
           f"-I{include}", str(SOURCE), "-o", tmp, str(mkl), f"-Wl,-rpath,{mkl.parent}"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"building {SOURCE.name} failed ({' '.join(cmd)}):\n"
                               f"{proc.stderr[-2000:]}")
        os.replace(tmp, lib)                       # atomic: never a half-written library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def _cache_root() -> Path:
    return Path(os.environ.get("TFM_JAX_CACHE") or "~/.cache/tfm_jax").expanduser()


def load() -> None:
    """Build (once per host and source version), load and register the kernels; raises
    RuntimeError naming what is missing."""
    with _lock:
        if _state.get("loaded"):
            return
        if "error" in _state:
            raise RuntimeError(_state["error"])
        try:
            path = _build(_cache_root())
            lib = ctypes.cdll.LoadLibrary(str(path))
            lib.tfm_mkl_sequential()
            for name in TARGETS:
                jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)),
                                            platform="cpu")
        except Exception as e:  # noqa: BLE001 -- reported by available()/resolve()
            _state["error"] = f"{type(e).__name__}: {e}"
            raise RuntimeError(_state["error"]) from e
        _state.update(loaded=True, lib=lib, path=path)


def available() -> tuple[bool, str]:
    """(True, library path) if the kernels load on this host, else (False, why not)."""
    try:
        load()
    except RuntimeError as e:
        return False, str(e)
    return True, str(_state["path"])


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
    """(N, K) @ (K, M) in fp32 on MKL. VJP: ``dx = dy W^T`` and ``dW = x^T dy`` with the
    transposes passed to MKL as flags (no copies)."""
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
    return matmul(x, w)


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


def _attn_fwd_call(q, k, v, k_valid, block):
    load()
    b, t, h, _ = q.shape
    return jax.ffi.ffi_call(
        "tfm_attn_fwd", (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                         jax.ShapeDtypeStruct((2, b, h, t), jnp.float32)))(
        q, k, v, k_valid, block=np.int64(block))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, k_valid, block):
    return _attn_fwd_call(q, k, v, k_valid, block)[0]


def _attention_fwd(q, k, v, k_valid, block):
    o, stats = _attn_fwd_call(q, k, v, k_valid, block)
    return o, (q, k, v, k_valid, o, stats)


def _attention_bwd(block, res, do):
    q, k, v, k_valid, o, stats = res
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
    dq, dk, dv = jax.ffi.ffi_call("tfm_attn_bwd", shapes)(
        q, k, v, k_valid, o, stats, do.astype(jnp.float32), block=np.int64(block))
    return dq, dk, dv, jnp.zeros_like(k_valid)


_attention.defvjp(_attention_fwd, _attention_bwd)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                     k_valid: Optional[jax.Array] = None, *, block_q: int = 64) -> jax.Array:
    """Drop-in for :func:`tfm_jax.layers.attention.causal_attention` (fp32): same blocks of
    ``block_q`` queries, same masking (incl. fully masked rows), one custom call each way."""
    if q.dtype != jnp.float32 or k.dtype != jnp.float32 or v.dtype != jnp.float32:
        raise ValueError(f"native attention is fp32 only, got {q.dtype}/{k.dtype}/{v.dtype}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} kv heads")
    kv = (jnp.ones(q.shape[:2], jnp.float32) if k_valid is None
          else k_valid.astype(jnp.float32))
    return _attention(q, k, v, kv, int(block_q))
