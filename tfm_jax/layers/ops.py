"""The one seam for backend-specific ops: which GEMM, attention core, norm and SwiGLU the layers
run.

Layers never decide an implementation themselves: they receive an :class:`Ops` (resolved once per
run by :func:`tfm_jax.platform.backends.resolve_ops` from the devices and ``backend.cpu_kernels``) and call
its members. Every implementation computes the same function with the same parameters; they
differ only in how fast they are on a given backend:

==============  =====================================  ======================================
set             for                                    what it runs
==============  =====================================  ======================================
``xla``         GPU / TPU (and any backend)            ``lax.dot_general``; dense masked
                                                       causal attention (one fused softmax)
``cpu-xla``     XLA:CPU, sharded or non-fp32 runs      CPU tricks: a matmul whose weight
                                                       gradient stays on the fast GEMM path;
                                                       block-causal attention (unrolled over
                                                       query blocks, skips the masked half)
``cpu-native``  one fp32 CPU device                    the native custom calls of
                                                       :mod:`tfm_jax.platform.kernels.cpu` (BLAS GEMM,
                                                       attention, RMSNorm, SwiGLU)
==============  =====================================  ======================================

A quantization recipe replaces the projections' dot with its own Linen module
(:meth:`Ops.with_quant_dot`: every projection but the LM head, which keeps the set's GEMM;
:meth:`Ops.with_dot_general` replaces every Linear's dot); ``backend.attention`` replaces the causal core with one of
:data:`ATTENTION_CORES` (:meth:`Ops.with_attention`: flash, cuDNN, ...). The seam then names the
replacement, so a run's log never claims a GEMM or an attention it does not use. Later ops (MoE
dispatch) are added here as new members, written once for every layer; KV-cache decode attention
(``cached_attention``) is one already: XLA in the ``xla``/``cpu-xla`` sets, a native kernel that
reads only each row's filled cache slots in ``cpu-native`` (float32 caches; a quantized cache
runs the XLA version there too).

The ``xla`` set is built from :mod:`tfm_jax.layers.functional` and the attention cores, which
import no layer; the CPU sets live in :mod:`tfm_jax.platform` (``cpu-xla``:
:mod:`tfm_jax.platform.xla_cpu`; ``cpu-native``: :mod:`tfm_jax.platform.kernels.cpu`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

from tfm_jax.layers import functional
from tfm_jax.layers.attention_ops import dense


@dataclasses.dataclass(frozen=True)
class Ops:
    """Backend-specific implementations the layers call (hashable: a Flax module attribute).

    * ``matmul(x, w, dimension_numbers, precision=None, preferred_element_type=None)``: the 2-D
      ``(tokens, in) @ (in, out)`` dot of every :class:`~tfm_jax.layers.linear.Linear`.
    * ``causal_attention(q, k, v, k_valid=None, *, block_q)``: self-attention over positions
      0..T-1 (+ key padding); q (B, T, H, D), k/v (B, T, Hkv, D) -> (B, T, H, D).
    * ``rms_norm(x, scale, eps)``, ``swiglu(gate, up)``: elementwise cores.
    * ``cached_attention(q, k, v, q_positions, k_scale=None, v_scale=None)``: decode attention
      of new queries q (B, T, H, D) at ``q_positions`` (B, T) against a KV cache k/v
      (B, S, Hkv, D), quantized when scales are given (B, S, Hkv | 1) -> (B, T, H, D). XLA sets:
      :func:`tfm_jax.layers.attention.cached_attention`; ``cpu-native``:
      :func:`tfm_jax.platform.kernels.cpu.cached_attention`.
    * ``paged_attention(q, layer, q_positions)``: optional decode attention of one query per row
      (B, 1, H, D) read from a :class:`~tfm_jax.layers.paged_cache.PagedLayerCache`'s pools in
      place (:func:`tfm_jax.layers.attention_ops.paged.pallas_paged_attention`; it returns
      None for shapes it does not take); None: the pages are gathered and ``cached_attention``
      reads the copy.
    * ``dot_general_cls``: a factory of a Linen module called like ``lax.dot_general``; when
      set it replaces ``matmul`` in every :class:`~tfm_jax.layers.linear.Linear`.
    * ``quant_dot_cls``: the same for a quantization recipe (e.g. the FP8 dot of
      :mod:`tfm_jax.quant.fp8`, state in the params tree): used by the Linears that accept a
      quantized dot (``Linear.quantized``, True for the attention and FFN projections, False for
      the LM head, which stays high precision on the set's own GEMM).
    """

    name: str
    matmul: Callable
    causal_attention: Callable
    rms_norm: Callable
    swiglu: Callable
    cached_attention: Callable
    dot_general_cls: Optional[Callable] = None
    quant_dot_cls: Optional[Callable] = None
    weight_storage: Optional[Any] = None   # tfm_jax.quant.storage.StorageSpec: FP8 kernels
    detail: str = ""
    attention_name: str = ""     # set when ``causal_attention`` is not the set's own core
    paged_attention: Optional[Callable] = None

    def with_dot_general(self, dot_general_cls: Optional[Callable]) -> "Ops":
        """The same ops with the projections' dot replaced by ``dot_general_cls``."""
        return dataclasses.replace(self, dot_general_cls=dot_general_cls)

    def with_quant_dot(self, quant_dot_cls: Optional[Callable]) -> "Ops":
        """The same ops with the quantizable projections' dot replaced by ``quant_dot_cls``."""
        return dataclasses.replace(self, quant_dot_cls=quant_dot_cls)

    def with_weight_storage(self, spec: Optional[Any]) -> "Ops":
        """The same ops with the quantizable projections' kernels stored in FP8 (``spec``: a
        :class:`tfm_jax.quant.storage.StorageSpec`; None: the param dtype)."""
        return dataclasses.replace(self, weight_storage=spec)

    def with_attention(self, fn: Callable, name: str) -> "Ops":
        """The same ops with the causal core replaced by ``fn`` (same contract as
        ``causal_attention``), named ``name`` in :meth:`describe`."""
        return dataclasses.replace(self, causal_attention=fn, attention_name=name)

    def describe(self) -> str:
        """One line for the run log (``kernels: ...``): the set, why, and what replaces its GEMM
        if anything does, e.g. ``native CPU kernels [cpu-native] (OpenBLAS ...)``."""
        text = f"{_TITLES.get(self.name, self.name)} [{self.name}]"
        if self.detail:
            text += f" ({self.detail})"
        if self.dot_general_cls is not None:
            name = getattr(self.dot_general_cls, "__name__", repr(self.dot_general_cls))
            text += f"; projections use {name} instead of this set's GEMM"
        if self.quant_dot_cls is not None:
            name = getattr(self.quant_dot_cls, "__name__", repr(self.quant_dot_cls))
            text += f"; attention/FFN projections: {name} (LM head: this set's GEMM)"
        if self.weight_storage is not None:
            w = self.weight_storage
            text += (f"; attention/FFN kernels stored in {w.fmt} ({w.granularity} EMA scale, "
                     f"{'stochastic' if w.stochastic_rounding else 'nearest-even'} rounding)")
        if self.attention_name:
            text += f"; attention: {self.attention_name}"
        if self.paged_attention is not None:
            interpreted = getattr(self.paged_attention, "keywords", {}).get("interpret")
            text += "; paged decode: Pallas kernel" + (" (interpreted)" if interpreted else "")
        return text


_TITLES = {"xla": "XLA ops", "cpu-xla": "XLA ops tuned for CPU",
           "cpu-native": "native CPU kernels"}


@functools.lru_cache(maxsize=None)
def xla_ops() -> Ops:
    """Plain XLA ops for any backend (the GPU/TPU default, and what a layer given no ops uses)."""
    return Ops("xla", functional.plain_dot_general, dense.dense_causal_attention,
               functional.rms_norm, functional.swiglu, dense.cached_attention)


# ``backend.attention`` choices other than ``auto``: (module, function, log name), imported when
# chosen. Every core has the contract of ``Ops.causal_attention``.
ATTENTION_CORES = {
    "block": ("tfm_jax.layers.attention_ops.block", "causal_attention",
              "block-causal (XLA, unrolled over query blocks)"),
    "dense": ("tfm_jax.layers.attention_ops.dense", "dense_causal_attention",
              "dense masked softmax (XLA, T x T scores)"),
    "flash": ("tfm_jax.layers.attention_ops.flash", "flash_attention",
              "flash (key-tiled online softmax, lax loops, O(T) memory)"),
    "xla_sdpa": ("tfm_jax.layers.attention_ops.flash", "xla_sdpa_attention",
                 "jax.nn.dot_product_attention (implementation=xla)"),
    "cudnn": ("tfm_jax.layers.attention_ops.flash", "cudnn_attention",
              "jax.nn.dot_product_attention (implementation=cudnn)"),
}


def attention_core(choice: str) -> tuple[Callable, str]:
    """(core, log name) of a ``backend.attention`` choice other than ``auto``."""
    import importlib
    if choice not in ATTENTION_CORES:
        raise ValueError(f"unknown attention core {choice!r}; choose one of "
                         f"{', '.join(ATTENTION_CORES)}")
    module, fn, name = ATTENTION_CORES[choice]
    return getattr(importlib.import_module(module), fn), name


def resolve(ops: Optional[Ops]) -> Ops:
    """``ops``, or the portable :func:`xla_ops` for a layer used on its own. A run's set (CPU
    tricks, native kernels, quantized dots) is chosen once by
    :func:`tfm_jax.platform.backends.resolve_ops` and passed down from the model."""
    return xla_ops() if ops is None else ops
