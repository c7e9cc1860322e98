"""FP8 dot for the projections: e4m3 operands, e5m2 output gradients, scales in the params tree.

:class:`Fp8DotGeneral` is a ``dot_general_cls`` for :class:`~tfm_jax.layers.linear.Linear`
(2-D ``(tokens, in) @ (in, out)``). The input and the kernel are quantized to ``fwd_format``
(saturating, each with its own multiplicative scale ``fmt_max / amax``,
:mod:`tfm_jax.quant.scaling`), the output gradient to ``bwd_format``; quantization is
straight-through for gradients (as in Flax and Transformer Engine).

**The direct form** (:func:`fp8_dot`, all three tensors quantized -- the default): every GEMM
takes the FP8 bytes -- forward ``q_x @ q_k``, input gradient ``q_g @ q_k^T``, kernel gradient
``q_x^T @ q_g`` -- accumulated in the compute dtype, and the product of the two scales'
reciprocals multiplies the output. The custom VJP saves the FP8 bytes (half the residual memory
of bf16). This is the HLO form XLA:GPU's GEMM rewriter turns into cuBLASLt FP8 GEMMs in every
configuration (scanned layers, remat, gradient accumulation, f32 or bf16;
:mod:`tfm_jax.quant.hlo_check` checks it); on the ``xla`` op set the GEMM is ``lax.dot_general``
on the FP8 operands. A CPU set's GEMM wants float operands: there the saved bytes are
dequantized (``q * (1/s)``, compute dtype) and the set's GEMM multiplies them -- the same
quantized values, the numerics of quantize -> dequantize -> GEMM bit for bit (*emulated*, no
speed-up; the GPU's sums differ only by float rounding). In bf16 the scale factor is applied in bf16 (as
XLA fuses it into the GEMM), so it is rounded to 8 significant bits: the output of a projection
is off by the same factor (at most 2^-9) everywhere, on top of the GEMM's own bf16 rounding.
Per-channel kernel scales (``kernel_granularity=per_channel`` or per-channel weight storage) are
column scales of the forward output and do not touch the kernel gradient, but in the input
gradient they run along the contracted axis: that GEMM takes the dequantized kernel and gradient
in the compute dtype (XLA's rewriter wants scalar scales), so 2 of the 3 GEMMs are FP8.

With a subset of the tensors quantized (``quant.fp8_operands``, a numerics study), each one is
quantized and dequantized in the compute dtype and the run's GEMM multiplies them (no FP8 GEMM).
:func:`fp8_dot_mode` counts what a compiled step runs per projection.

Recipes (``quant.recipe``):

* ``fp8_dynamic``: scale from the current amax of each tensor; no state.
* ``fp8_delayed``: state per role r in (input, kernel, output_grad): ``r_amax_history`` (L,)
  (newest at index 0, :func:`~tfm_jax.quant.scaling.update_amax_history`) and ``r_scale``. The
  step-t forward uses ``scale_t = fmt_max / amax_from_history(history) / 2**margin`` -- the
  amaxes of steps < t -- falling back to the stored scale when that amax is 0 or non-finite
  (the first step uses 1.0). The op's custom VJP returns the **new** state as the cotangent of
  the state: the history with this step's amax recorded, and ``scale_t``. The train step writes
  it (role ``quant``, :mod:`tfm_jax.core.roles`), taking the max over accumulation micro-batches:
  every micro-batch sees the same old state, so its ``scale_t`` is the same and the max of the
  histories is the history of the whole batch -- accumulation gives exactly the whole batch's
  state (the stored scale is the one used, which no micro-batch changes).
* ``fp8_static``: ``input_scale`` and ``kernel_scale`` fixed from a calibration file
  (:func:`load_calibration`, written into the params at init); output gradients are scaled
  dynamically (they cannot be calibrated before training).

State lives under the projection, ``<proj>/fp8/...``, replicated (no sharded axes; stacked by
``nn.scan`` like every layer parameter) and checkpointed with the params. Under jit with a
sharded batch the amax is a global reduction, so every device holds the same state.

Telemetry (``quant.telemetry``, :mod:`tfm_jax.core.telemetry`): per projection ``input_amax``,
``kernel_amax`` (max over micro-batches), ``input_scale``, ``kernel_scale``,
``input_saturated`` / ``input_flushed`` (fraction of values beyond ``fmt_max`` after scaling / of
non-zeros that quantize to 0), the same for the kernel, and ``*_staleness`` = current amax /
the amax the scale assumes (``fmt_max / scale / 2**margin``; > 1 means saturation). For output
gradients (computed in backward, where nothing can be sown) the forward of the next step sows
the previous step's ``output_grad_saturated`` / ``output_grad_flushed`` (every recipe: the
backward pass writes them into the overwritten state leaf ``output_grad_stats``, present only
with telemetry on; under gradient accumulation the max over micro-batches, as for every quant
leaf) and, under fp8_delayed, ``output_grad_amax`` and ``output_grad_staleness`` from the
state.
"""

from __future__ import annotations

import functools
import json
import pathlib
import re
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from tfm_jax.quant.formats import fmt_dtype, fmt_max, saturating_cast
from tfm_jax.quant.scaling import (amax_from_history, compute_amax, compute_scale,
                                   round_scale_for, update_amax_history)

ROLES = ("input", "kernel", "output_grad")
CALIBRATION_FORMAT = "tfm-jax-fp8-calibration"
CALIBRATION_VERSION = 1


class QSpec(NamedTuple):
    """Static description of one tensor's quantization (hashable: a custom-VJP static arg).
    ``mode``: dynamic | delayed | static | stored (FP8 weight storage: its bytes and scale) | off
    (not quantized); ``axis``: None (per tensor) or the kept axes;
    ``scale_set``: the hardware scales the scale is rounded down to (``quant.scale_set``)."""

    mode: str
    fmt: str
    method: str = "max"
    margin: int = 0
    axis: Optional[tuple] = None
    scale_set: str = "any"


def _scale(x: jax.Array, state: dict, spec: QSpec) -> jax.Array:
    """The multiplicative scale used for ``x`` this step (float32, amax's shape), rounded down
    to ``spec.scale_set`` (:func:`~tfm_jax.quant.scaling.round_scale_for`; a static scale from
    calibration is normally in the set already: rounding is idempotent)."""
    if spec.mode == "stored":          # FP8 weight storage: the bytes' own scale, as it is
        return jnp.asarray(state["scale"], jnp.float32)
    if spec.mode == "dynamic":
        s = compute_scale(compute_amax(x, axis=spec.axis), spec.fmt, margin=spec.margin)
    elif spec.mode == "static":
        s = state["scale"]
    else:
        s = compute_scale(amax_from_history(state["amax_history"], spec.method), spec.fmt,
                          margin=spec.margin, prev_scale=state["scale"])
    return round_scale_for(s, spec.scale_set)


def _new_state(x: jax.Array, state: dict, scale: jax.Array, spec: QSpec) -> dict:
    """The state after this step: delayed records amax(x); static keeps its scale; a storage
    scale gets a zero cotangent (the optimizer step updates it, :mod:`tfm_jax.quant.storage`)."""
    if spec.mode == "stored":
        return jax.tree.map(jnp.zeros_like, state)
    if spec.mode == "delayed":
        return {"amax_history": update_amax_history(state["amax_history"],
                                                    compute_amax(x, axis=spec.axis)),
                "scale": scale}
    return dict(state)


def quantize(x: jax.Array, scale: jax.Array, fmt: str) -> jax.Array:
    """``cast(x * s -> fmt)``, saturating, computed in float32; FP8 bytes (stored weights) are
    returned as they are."""
    if x.dtype == fmt_dtype(fmt):
        return x
    return saturating_cast(x.astype(jnp.float32) * scale, fmt)


def qdq(x: jax.Array, scale: jax.Array, fmt: str, dtype: Any = None) -> jax.Array:
    """Quantize (saturating) then dequantize, in ``dtype`` (x's by default):
    ``cast(x*s -> fmt) * (1/s)``."""
    q = quantize(x, scale, fmt)
    dtype = x.dtype if dtype is None else dtype
    return (q.astype(jnp.float32) * (1.0 / scale)).astype(dtype)


# Operands (input, kernel): quantized in forward, straight-through in backward; the state's
# cotangent is its new value. Outputs (x_qdq, scale used, current amax): the last two for
# telemetry only (their cotangents are zero and ignored).
@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def qdq_operand(x: jax.Array, state: dict, spec: QSpec):
    return _qdq_operand_fwd(x, state, spec)[0]


def _qdq_operand_fwd(x, state, spec):
    scale = _scale(x, state, spec)
    return (qdq(x, scale, spec.fmt), scale), _new_state(x, state, scale, spec)


def _qdq_operand_bwd(spec, new_state, g):
    return g[0], new_state


qdq_operand.defvjp(_qdq_operand_fwd, _qdq_operand_bwd)


# Output gradient: identity in forward; backward quantizes the incoming gradient with its own
# scale and returns the new state as the state's cotangent.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def qdq_grad(y: jax.Array, state: dict, spec: QSpec) -> jax.Array:
    return y


def _qdq_grad_fwd(y, state, spec):
    return y, state


def _qdq_grad_bwd(spec, state, g):
    scaling = {k: v for k, v in state.items() if k != "stats"}
    scale = _scale(g, scaling, spec)
    new = _new_state(g, scaling, scale, spec)
    if "stats" in state:     # telemetry: recorded here, sown by the next forward
        new["stats"] = quantization_stats(g, scale, spec.fmt)
    return qdq(g, scale, spec.fmt), new


def quantization_stats(x: jax.Array, scale: jax.Array, fmt: str) -> jax.Array:
    """``[saturated, flushed]`` of ``x`` quantized to ``fmt`` with multiplicative ``scale``:
    the fraction of all values beyond ``fmt_max`` after scaling (clipped by the saturating
    cast), and the fraction of non-zero values that quantize to 0 (float32, shape (2,))."""
    x = x.astype(jnp.float32)
    xs = x * scale
    nonzero = x != 0
    flushed = (saturating_cast(xs, fmt) == 0) & nonzero
    return jnp.stack([jnp.mean(jnp.abs(xs) > fmt_max(fmt)),
                      jnp.sum(flushed) / jnp.maximum(jnp.sum(nonzero), 1)]).astype(jnp.float32)


qdq_grad.defvjp(_qdq_grad_fwd, _qdq_grad_bwd)


# --------------------------------------------------------------------------------------------
# The direct form: every GEMM takes the FP8 bytes, the scales act on its output.

_NN = (((1,), (0,)), ((), ()))          # (N, K) @ (K, M)
_NT = (((1,), (1,)), ((), ()))          # (N, M) . (K, M)^T -> (N, K): the input gradient
_TN = (((0,), (0,)), ((), ()))          # (N, K)^T . (N, M) -> (K, M): the kernel gradient


def _inv(*scales: jax.Array) -> jax.Array:
    """The product of the scales' reciprocals (float32): turns the GEMM of FP8 bytes into the
    product of the dequantized operands (``q_a / s_a . q_b / s_b``)."""
    out = jnp.float32(1.0)
    for s in scales:
        out = out * (1.0 / jnp.asarray(s, jnp.float32))
    return out


def _deq(q: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """FP8 bytes -> ``q * (1/s)`` in ``dtype`` (computed in float32, as :func:`qdq`)."""
    return (q.astype(jnp.float32) * (1.0 / scale)).astype(dtype)


def _f8_gemm(a: jax.Array, b: jax.Array, dims, dtype) -> jax.Array:
    """XLA's dot on FP8 operands, accumulated and returned in ``dtype`` (what XLA:GPU's GEMM
    rewriter turns into ``__cublas$lt$matmul$f8``; XLA:CPU upcasts)."""
    return jax.lax.dot_general(a, b, dims, preferred_element_type=dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def fp8_dot(x: jax.Array, kernel: jax.Array, states: tuple, specs: tuple,
            matmul: Optional[Callable]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``x (N, K) @ kernel (K, M)`` in the direct FP8 form; returns (y, input scale, kernel
    scale) -- the scales for telemetry (their cotangents are ignored).

    Forward ``y = gemm(q_x, q_k) * (1/s_x * 1/s_k)``; backward ``dx = gemm(q_g, q_k^T) *
    (1/s_g * 1/s_k)``, ``dk = gemm(q_x^T, q_g) * (1/s_x * 1/s_g)``, with ``q = cast(t * s)``
    (saturating) of each tensor and its scale from ``states`` / ``specs`` (input, kernel,
    output_grad; :class:`QSpec`). The residuals are the FP8 bytes ``q_x``, ``q_k`` and the
    scales. ``matmul`` None: the GEMMs are ``lax.dot_general`` on the FP8 operands with
    ``preferred_element_type`` the compute dtype (x's). Otherwise (a CPU set's GEMM, which
    wants float operands) the operands are dequantized from the saved bytes, ``q * (1/s)`` in
    the compute dtype, and the set's GEMM and its own backward multiply them: the numerics of
    quantize -> dequantize -> GEMM, bit for bit what :func:`qdq` gives, with no extra pass over
    any GEMM output (there the dequantized operands are the residuals, as before: CPU
    emulation trades the FP8 residuals' memory for one pass less). A per-channel kernel scale (1, M) scales the output's columns in forward;
    in the input gradient it lies along the contracted axis, so that GEMM takes the dequantized
    kernel and gradient.
    The state's cotangent is its new value, as in :func:`qdq_operand`."""
    return _fp8_dot_fwd(x, kernel, states, specs, matmul)[0]


def _fp8_dot_fwd(x, kernel, states, specs, matmul):
    x_spec, k_spec, _ = specs
    dtype = x.dtype
    sx, sk = _scale(x, states[0], x_spec), _scale(kernel, states[1], k_spec)
    qx, qk = quantize(x, sx, x_spec.fmt), quantize(kernel, sk, k_spec.fmt)
    if matmul is None:
        y = _f8_gemm(qx, qk, _NN, dtype) * _inv(sx, sk).astype(dtype)
    else:   # (the dequantized operands are the residuals: no second pass in backward)
        qx, qk = _deq(qx, sx, dtype), _deq(qk, sk, dtype)
        y = matmul(qx, qk, _NN)
    new = (_new_state(x, states[0], sx, x_spec), _new_state(kernel, states[1], sk, k_spec))
    carrier = jnp.zeros((0,), kernel.dtype)        # the kernel's dtype, for its cotangent
    return (y, sx, sk), (qx, qk, sx, sk, states[2], new, carrier)


def _fp8_dot_bwd(specs, matmul, res, cts):
    qx, qk, sx, sk, g_state, (new_x, new_k), carrier = res
    gy = cts[0]
    dtype = gy.dtype
    g_spec = specs[2]
    scaling = {k: v for k, v in g_state.items() if k != "stats"}
    sg = _scale(gy, scaling, g_spec)
    qg = quantize(gy, sg, g_spec.fmt)
    new_g = _new_state(gy, scaling, sg, g_spec)
    if "stats" in g_state:
        new_g["stats"] = quantization_stats(gy, sg, g_spec.fmt)
    if matmul is not None:      # the set's own backward (its transposes; its forward unused)
        _, pull = jax.vjp(lambda u, v: matmul(u, v, _NN), qx, qk)   # dequantized in forward
        dx, dk = pull(_deq(qg, sg, dtype))
    elif jnp.size(sk) > 1:      # per-channel kernel scales run along dx's contracted axis
        dx = jax.lax.dot_general(_deq(qg, sg, dtype), _deq(qk, sk, dtype), _NT,
                                 preferred_element_type=dtype)
        dk = _f8_gemm(qx, qg, _TN, dtype) * _inv(sx, sg).astype(dtype)
    else:
        dx = _f8_gemm(qg, qk, _NT, dtype) * _inv(sg, sk).astype(dtype)
        dk = _f8_gemm(qx, qg, _TN, dtype) * _inv(sx, sg).astype(dtype)
    return dx.astype(dtype), dk.astype(carrier.dtype), (new_x, new_k, new_g)


fp8_dot.defvjp(_fp8_dot_fwd, _fp8_dot_bwd)


def _plain_dot(x, w, dimension_numbers, precision=None, preferred_element_type=None):
    return jax.lax.dot_general(x, w, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)


class Fp8DotGeneral(nn.Module):
    """``lax.dot_general``-like FP8 dot with its scaling state as params (module doc).

    Called by :class:`~tfm_jax.layers.linear.Linear` on 2-D operands x (N, K), kernel (K, M)
    contracting x's axis 1 with the kernel's axis 0. ``matmul`` is the GEMM of the dequantized
    operands (the run's ``ops.matmul``; None: ``lax.dot_general``).
    """

    recipe: str = "fp8_delayed"            # fp8_dynamic | fp8_delayed | fp8_static
    amax_history: int = 1024
    amax_compute: str = "max"
    margin: int = 0
    fwd_format: str = "float8_e4m3fn"
    bwd_format: str = "float8_e5m2"
    kernel_granularity: str = "per_tensor"  # or per_channel: one scale per output column
    scale_set: str = "any"                  # any | pow2 | gaudi2 (quant.scale_set)
    operands: tuple = ROLES                 # the tensors quantized (quant.fp8_operands)
    telemetry: bool = True
    matmul: Optional[Callable] = None

    def _qspec(self, role: str) -> QSpec:
        if role not in self.operands:
            return QSpec("off", "")
        mode = {"fp8_dynamic": "dynamic", "fp8_delayed": "delayed",
                "fp8_static": "static"}[self.recipe]
        if role == "output_grad" and mode == "static":
            mode = "dynamic"
        axis = (1,) if role == "kernel" and self.kernel_granularity == "per_channel" else None
        fmt = self.bwd_format if role == "output_grad" else self.fwd_format
        return QSpec(mode, fmt, self.amax_compute, self.margin, axis, self.scale_set)

    def _state_vars(self, role: str, spec: QSpec, scale_shape: tuple) -> dict:
        if spec.mode in ("dynamic", "off", "stored"):
            return {}
        replicated = lambda init, ndim: nn.with_logical_partitioning(  # noqa: E731
            init, (None,) * ndim)
        state = {"scale": self.param(f"{role}_scale", replicated(nn.initializers.ones,
                                                                 len(scale_shape)),
                                     scale_shape, jnp.float32)}
        if spec.mode == "delayed":
            shape = (self.amax_history,) + scale_shape
            state["amax_history"] = self.param(
                f"{role}_amax_history", replicated(nn.initializers.zeros, len(shape)),
                shape, jnp.float32)
        return state

    @nn.compact
    def __call__(self, x, kernel, dimension_numbers, precision=None,
                 preferred_element_type=None, *, kernel_scale=None, kernel_format=None):
        """``kernel_scale`` / ``kernel_format``: the kernel is FP8 weight storage
        (:mod:`tfm_jax.quant.storage`) -- its FP8 bytes, or the train step's float view of them
        (``bytes / kernel_scale``, recovered exactly by one cast) -- and its bytes and scale are
        the GEMM's kernel operand: no kernel scaling state, no requantization."""
        if dimension_numbers != (((1,), (0,)), ((), ())) or x.ndim != 2 or kernel.ndim != 2:
            raise ValueError("Fp8DotGeneral takes Linear's 2-D (tokens, in) @ (in, out) dot; got "
                             f"shapes {x.shape} @ {kernel.shape}, {dimension_numbers}")
        if self.recipe not in ("fp8_dynamic", "fp8_delayed", "fp8_static"):
            raise ValueError(f"Fp8DotGeneral recipe {self.recipe!r}; valid: fp8_dynamic, "
                             "fp8_delayed, fp8_static")
        specs = {r: self._qspec(r) for r in ROLES}
        if kernel_scale is not None and specs["kernel"].mode != "off":
            specs["kernel"] = QSpec("stored", kernel_format,
                                    axis=(1,) if jnp.size(kernel_scale) > 1 else None)
        direct = all(specs[r].mode != "off" for r in ROLES)
        if not direct:      # the kernel in the compute dtype (stored bytes dequantized)
            if kernel_scale is not None and kernel.dtype == fmt_dtype(kernel_format):
                kernel = kernel.astype(jnp.float32) * (1.0 / kernel_scale)
            kernel = kernel.astype(x.dtype)
        k_scale_shape = (1, kernel.shape[1]) if specs["kernel"].axis else ()
        states = {"input": self._state_vars("input", specs["input"], ()),
                  "kernel": ({"scale": kernel_scale} if specs["kernel"].mode == "stored" else
                             self._state_vars("kernel", specs["kernel"], k_scale_shape)),
                  "output_grad": self._state_vars("output_grad", specs["output_grad"], ())}
        if self.telemetry and specs["output_grad"].mode != "off":
            # [saturated, flushed] of the output gradient, written by the backward pass as an
            # overwritten state leaf (nothing can be sown there) and sown by the next forward
            states["output_grad"]["stats"] = self.param(
                "output_grad_stats", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                  (None,)), (2,), jnp.float32)
        if direct:      # every GEMM on FP8 bytes (the form XLA:GPU makes FP8 GEMMs of)
            y, x_scale, k_scale = fp8_dot(x, kernel, tuple(states[r] for r in ROLES),
                                          tuple(specs[r] for r in ROLES), self.matmul)
            if self.telemetry:
                self._sow_operand("input", x, x_scale, specs["input"])
                self._sow_operand("kernel", kernel, k_scale, specs["kernel"])
                self._sow_grad_state(states["output_grad"], specs["output_grad"])
            return y
        # a subset of the tensors quantized (quant.fp8_operands, a numerics study): each
        # quantized tensor is quantized and dequantized, the GEMM runs in the compute dtype
        xq, kq = x, kernel
        if specs["input"].mode != "off":
            xq, x_scale = qdq_operand(x, states["input"], specs["input"])
            if self.telemetry:
                self._sow_operand("input", x, x_scale, specs["input"])
        if specs["kernel"].mode != "off":
            kq, k_scale = qdq_operand(kernel, states["kernel"], specs["kernel"])
            if self.telemetry:
                self._sow_operand("kernel", kernel, k_scale, specs["kernel"])
        mm = self.matmul or _plain_dot
        y = mm(xq, kq, dimension_numbers, precision=precision)
        if specs["output_grad"].mode == "off":
            return y
        if self.telemetry:
            self._sow_grad_state(states["output_grad"], specs["output_grad"])
        return qdq_grad(y, states["output_grad"], specs["output_grad"])

    def _sow_operand(self, role: str, x: jax.Array, scale: jax.Array, spec: QSpec) -> None:
        from tfm_jax.core import telemetry

        x = jax.lax.stop_gradient(x).astype(jnp.float32)
        scale = jax.lax.stop_gradient(scale)
        m = fmt_max(spec.fmt)
        amax = jnp.max(jnp.abs(x))
        stats = quantization_stats(x, scale, spec.fmt)
        telemetry.sow(self, f"{role}_amax", amax, "max")
        telemetry.sow(self, f"{role}_scale", jnp.min(scale), "mean")
        telemetry.sow(self, f"{role}_saturated", stats[0], "mean")
        telemetry.sow(self, f"{role}_flushed", stats[1], "mean")
        # the amax the scale was made for: fmt_max / scale / 2**margin (per channel: its max)
        assumed = m / scale / 2.0 ** spec.margin
        telemetry.sow(self, f"{role}_staleness",
                      jnp.max(compute_amax(x, axis=spec.axis) / assumed), "max")

    def _sow_grad_state(self, state: dict, spec: QSpec) -> None:
        """The previous step's output-gradient statistics, read from the state: saturated and
        flushed fractions (every recipe) and, under fp8_delayed, its amax, scale and
        staleness."""
        from tfm_jax.core import telemetry

        stats = jax.lax.stop_gradient(state["stats"])
        telemetry.sow(self, "output_grad_saturated", stats[0], "max")
        telemetry.sow(self, "output_grad_flushed", stats[1], "max")
        if spec.mode != "delayed":
            return
        hist = jax.lax.stop_gradient(state["amax_history"])
        scale = jax.lax.stop_gradient(state["scale"])
        telemetry.sow(self, "output_grad_amax", hist[0], "max")
        telemetry.sow(self, "output_grad_scale", scale, "mean")
        telemetry.sow(self, "output_grad_staleness",
                      hist[0] * scale * 2.0 ** spec.margin / fmt_max(spec.fmt), "max")


def dot_general_factory(quant_cfg: Any, matmul: Optional[Callable] = None) -> Callable:
    """The ``dot_general_cls`` of ``quant`` config (:class:`~tfm_jax.config.QuantConfig`): a
    factory of :class:`Fp8DotGeneral` named ``fp8`` (so its state is ``<proj>/fp8/...``)."""
    q = quant_cfg
    factory = functools.partial(
        Fp8DotGeneral, recipe=q.recipe, amax_history=q.amax_history,
        amax_compute=q.amax_compute, margin=q.margin, fwd_format=q.fwd_format,
        bwd_format=q.bwd_format, kernel_granularity=q.kernel_granularity,
        scale_set=q.scale_set, operands=tuple(q.fp8_operands), telemetry=q.telemetry,
        matmul=matmul, name="fp8")
    only = [r for r in ROLES if r not in q.fp8_operands]
    factory.__name__ = (f"Fp8DotGeneral ({q.recipe}, {q.fwd_format} forward / {q.bwd_format} "
                        "gradients" + ("" if q.scale_set == "any" else
                                       f", {q.scale_set} scales")
                        + (f"; {', '.join(only)} not quantized" if only else "") + ")")
    return factory


# --------------------------------------------------------------------------------------------
# HLO check: native FP8 GEMMs or emulated, counted per projection.


def fp8_dot_mode(compiled_text: str) -> str:
    """What the compiled program's quantized projections run, from its GEMMs counted per
    projection (:func:`tfm_jax.quant.hlo_check.gemm_counts`): ``"native"`` if every one runs at
    least 3 FP8 GEMMs (forward, input and kernel gradient; cuBLASLt FP8 calls or FP8 Triton /
    cuDNN fusions) and no plain GEMM; ``"partial"`` if FP8 GEMMs exist but not so; ``"emulated"``
    if FP8 types appear but no FP8 GEMM (XLA:CPU upcasts); ``"none"`` without FP8 types."""
    from tfm_jax.quant import hlo_check

    counts = hlo_check.gemm_counts(compiled_text)
    if hlo_check.fp8_gemm_verdict(counts)[0]:
        return "native"
    if any(c["fp8"] for c in counts.values()):
        return "partial"
    if re.search(r"\bf8e[45]m[23]", compiled_text):
        return "emulated"
    return "none"


def fp8_native_in_hlo(compiled_text: str) -> bool:
    """Whether every quantized projection runs FP8 GEMMs (:func:`fp8_dot_mode` == native)."""
    return fp8_dot_mode(compiled_text) == "native"


def describe_dot_mode(mode: str, platform: str) -> str:
    """The line printed at train start for an fp8 recipe."""
    return {
        "native": f"fp8: native FP8 GEMMs in the compiled step ({platform}): every quantized "
                  "projection runs its 3 GEMMs in FP8",
        "partial": (f"fp8: some FP8 GEMMs in the compiled step ({platform}), but some quantized "
                    "projections run plain GEMMs (see tfm_jax.quant.hlo_check.gemm_counts)"),
        "emulated": (f"fp8: emulated -- the compiled step casts to FP8 and back but its dots run "
                     f"on upcast values ({platform}: no FP8 GEMM); FP8 numerics, no speed-up"),
        "none": f"fp8: no FP8 type in the compiled step ({platform}); check quant.recipe",
    }[mode]


# --------------------------------------------------------------------------------------------
# Static scales from a calibration file.


def load_calibration(path: str | pathlib.Path) -> dict[str, dict[str, Any]]:
    """Read a calibration file for ``fp8_static``; returns ``{projection path: {name: value}}``.

    Format (JSON)::

        {"format": "tfm-jax-fp8-calibration", "version": 1,
         "convention": "multiplicative",          # scale = fmt_max / amax (x ~= q / scale)
         "fwd_format": "float8_e4m3fn",           # the format the scales were made for
         "scales": {"layers_0/attn/q_proj": {"input_scale": 12.5, "kernel_scale": 900.0},
                    "layers/ffn/wo": {"input_scale": [3.1, 2.9], ...},   # nn.scan: per layer
                    ...}}

    Keys are projection paths in the params tree (the part before ``/fp8``); values are
    positive finite floats (a list per layer for a scanned model; a list per output channel,
    or per layer of such lists, for ``per_channel`` kernels). A missing or malformed file raises
    FileNotFoundError / ValueError naming the problem."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"quant.calibration={path}: no such file. fp8_static reads its scales from a "
            f"calibration file ({CALIBRATION_FORMAT} JSON, see tfm_jax.quant.fp8."
            "load_calibration); write one with `tfm-jax calibrate` or use quant.recipe="
            "fp8_delayed, which needs none")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"quant.calibration={path}: not valid JSON ({err})") from None
    if not isinstance(raw, dict) or raw.get("format") != CALIBRATION_FORMAT:
        raise ValueError(f"quant.calibration={path}: not a {CALIBRATION_FORMAT} file (its "
                         f"'format' key must be {CALIBRATION_FORMAT!r})")
    if raw.get("version") != CALIBRATION_VERSION:
        raise ValueError(f"quant.calibration={path}: version {raw.get('version')!r}; this "
                         f"version reads {CALIBRATION_VERSION}")
    if raw.get("convention", "multiplicative") != "multiplicative":
        raise ValueError(f"quant.calibration={path}: convention {raw.get('convention')!r}; "
                         "scales must be multiplicative (fmt_max / amax); convert inverse "
                         "scales with tfm_jax.quant.scaling.scale_from_scale_inv")
    scales = raw.get("scales")
    if not isinstance(scales, dict) or not scales:
        raise ValueError(f"quant.calibration={path}: 'scales' must map projection paths to "
                         "{input_scale, kernel_scale}")
    for proj, entry in scales.items():
        if not isinstance(entry, dict):
            raise ValueError(f"quant.calibration={path}: scales[{proj!r}] must be a mapping")
        for name, v in entry.items():
            if name not in ("input_scale", "kernel_scale"):
                raise ValueError(f"quant.calibration={path}: scales[{proj!r}] has {name!r}; "
                                 "valid: input_scale, kernel_scale")
            a = np.asarray(v, np.float64)
            if a.size == 0 or not np.all(np.isfinite(a)) or np.any(a <= 0):
                raise ValueError(f"quant.calibration={path}: scales[{proj!r}][{name!r}] = {v!r} "
                                 "must be positive finite number(s)")
    return {"fwd_format": raw.get("fwd_format"), "scales": scales}


def apply_calibration(params: Any, calibration: dict) -> Any:
    """``params`` with every ``<proj>/fp8/{input,kernel}_scale`` set from a loaded calibration
    (:func:`load_calibration`). Every static scale of the model must be in the file and every
    entry of the file must be a scale of the model (ValueError listing them otherwise)."""
    scales = calibration["scales"]
    used = set()
    missing = []

    def fill(path, leaf):
        names = [str(getattr(k, "key", k)) for k in path]
        if len(names) < 3 or names[-2] != "fp8" or names[-1] not in ("input_scale",
                                                                    "kernel_scale"):
            return leaf
        proj = "/".join(names[:-2])
        if proj not in scales or names[-1] not in scales[proj]:
            missing.append(f"{proj}/{names[-1]}")
            return leaf
        used.add((proj, names[-1]))
        value = np.asarray(scales[proj][names[-1]], np.float32)
        if value.size == leaf.size:              # per layer and/or per channel, as stored
            return jnp.asarray(value.reshape(leaf.shape), leaf.dtype)
        if value.ndim == 0:                      # one scale for every layer / channel
            return jnp.full(leaf.shape, value, leaf.dtype)
        raise ValueError(f"calibration scale {proj}/{names[-1]} has shape {value.shape}; "
                         f"the model's is {tuple(leaf.shape)}")

    out = jax.tree_util.tree_map_with_path(fill, params)
    extra = sorted(f"{p}/{n}" for p, e in scales.items() for n in e if (p, n) not in used)
    if missing or extra:
        raise ValueError("calibration file does not fit the model: "
                         + (f"missing {', '.join(missing[:6])}" if missing else "")
                         + ("; " if missing and extra else "")
                         + (f"not in the model: {', '.join(extra[:6])}" if extra else "")
                         + " (projection paths as in the params tree, before /fp8)")
    return out


def write_calibration(path: str | pathlib.Path, scales: dict[str, dict[str, Any]],
                      fwd_format: str = "float8_e4m3fn", scale_set: str = "any") -> None:
    """Write a calibration file (the format :func:`load_calibration` reads; ``scale_set``, the
    hardware scale set the scales were rounded to, is recorded for the reader only)."""
    def plain(v):
        return np.asarray(v, np.float64).tolist()
    doc = {"format": CALIBRATION_FORMAT, "version": CALIBRATION_VERSION,
           "convention": "multiplicative", "fwd_format": fwd_format, "scale_set": scale_set,
           "scales": {p: {n: plain(v) for n, v in e.items()} for p, e in scales.items()}}
    from tfm_jax.core.rundir import atomic_write      # never through a link

    atomic_write(path, json.dumps(doc, indent=1))
