"""Projection with logical-axis parameters; its dot comes from the ops seam.

Every matmul of the model goes through :class:`Linear`. Which GEMM runs is the backend's choice
(``ops.matmul``, :mod:`tfm_jax.layers.ops`); quantization recipes (INT8, FP8 with delayed scaling)
slot in through ``dot_general_cls``: a factory of a Linen module called like
``jax.lax.dot_general`` (given directly, or carried by the ops). Such a module may keep its own
state (scales, amax history) as variables next to the kernel, i.e. in the params tree under this
projection's path.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from flax import linen as nn

from tfm_jax.layers.cross_entropy import head_logits
from tfm_jax.layers.ops import Ops, resolve as resolve_ops

def _canon(x: Union[int, Sequence[int]]) -> tuple[int, ...]:
    return (x,) if isinstance(x, int) else tuple(x)


class Linear(nn.Module):
    """``y = x @ W`` contracting the last ``in_axes`` axes of x with the first of W.

    Kernel shape: ``x.shape[-in_axes:] + features``; its logical axes are ``kernel_axes``.
    The dot (``dot_general_cls`` if given, else ``ops.quant_dot_cls`` when ``quantized``,
    else ``ops.dot_general_cls``, else ``ops.matmul``) always sees 2-D operands: (tokens, in)
    and (in, out). ``quantized=False`` keeps a projection (the LM head) out of a quantization
    recipe and out of FP8 weight storage (``ops.weight_storage``, :mod:`tfm_jax.quant.storage`:
    then ``kernel`` is FP8 bytes with a float32 ``storage_scale`` beside it). ``f32_out``: the
    result in float32; with low-precision operands straight from the GEMM
    (:func:`tfm_jax.layers.cross_entropy.head_logits`), never rounded to the compute dtype first.
    """

    features: Union[int, Sequence[int]]
    kernel_axes: Sequence[str]
    in_axes: int = 1
    init_std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    ops: Optional[Ops] = None        # None: the XLA ops of jax's default backend
    dot_general_cls: Optional[Callable[[], nn.Module]] = None
    quantized: bool = True
    f32_out: bool = False            # float32 result straight from the GEMM (the LM head)

    def _stored_kernel(self, init, kernel_shape, n_in: int, spec) -> tuple[jax.Array, jax.Array]:
        """FP8 weight storage (:mod:`tfm_jax.quant.storage`): params ``kernel`` in ``spec.fmt``
        and ``storage_scale`` (float32); returns both as they are (a float kernel given at
        apply time is the train step's dequantized view). At init both come from one float32
        draw (the scale is its dynamic scale)."""
        from tfm_jax.quant import storage

        sshape = storage.scale_shape(kernel_shape, n_in, spec.granularity)
        saxes = (None,) * n_in + tuple(self.kernel_axes[n_in:]) if sshape else ()
        # one key for both inits (Flax re-traces them abstractly at apply to check shapes)
        key = self.make_rng("params") if self.is_initializing() else jax.random.key(0)
        draw = lambda: init(key, kernel_shape, jnp.float32)  # noqa: E731
        rne = spec._replace(stochastic_rounding=False)
        kernel = self.param("kernel", nn.with_logical_partitioning(
            lambda *_: storage.quantize_weight(draw(), storage.initial_scale(draw(), spec, n_in),
                                               rne), tuple(self.kernel_axes)))
        scale = self.param(storage.STORAGE_SCALE, nn.with_logical_partitioning(
            lambda *_: storage.initial_scale(draw(), spec, n_in), saxes))
        return kernel, scale

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = _canon(self.features)
        in_shape = x.shape[x.ndim - self.in_axes:]
        kernel_shape = in_shape + features
        if len(self.kernel_axes) != len(kernel_shape):
            raise ValueError(f"{self.name}: kernel_axes {self.kernel_axes} do not match kernel "
                             f"shape {kernel_shape}")
        init = nn.initializers.normal(self.init_std)
        ops = resolve_ops(self.ops)
        spec = ops.weight_storage if self.quantized else None
        scale = None
        if spec is not None:
            kernel, scale = self._stored_kernel(init, kernel_shape, len(in_shape), spec)
        else:
            kernel = self.param("kernel", nn.with_logical_partitioning(
                init, tuple(self.kernel_axes)), kernel_shape, self.param_dtype)
        # Always one 2-D GEMM (tokens, in) @ (in, out): contracting several axes, or keeping
        # (B, T) as two free axes, makes XLA:CPU emit transposes and slower batched dots
        # (benchmarks/README.md). The reshapes only merge adjacent row-major axes: free.
        lead = x.shape[:x.ndim - self.in_axes]
        k_in, k_out = math.prod(in_shape), math.prod(features)
        x2 = x.astype(self.dtype).reshape(math.prod(lead), k_in)
        dims = (((1,), (0,)), ((), ()))
        quant_cls = None if self.dot_general_cls else (ops.quant_dot_cls if self.quantized
                                                       else None)
        if scale is not None and quant_cls is not None:
            # FP8 storage into the FP8 dot: its bytes (or the train step's float view of
            # them, which one cast turns back into the same bytes) and their scale are the
            # GEMM's kernel operand -- no dequantize, no second rounding
            y = quant_cls()(x2, kernel.reshape(k_in, k_out), dims, precision=None,
                            kernel_scale=jnp.reshape(scale, (1, k_out) if jnp.ndim(scale)
                                                     else ()), kernel_format=spec.fmt)
            return y.reshape(lead + features)
        if scale is not None and jnp.dtype(kernel.dtype).itemsize == 1:
            from tfm_jax.quant import storage
            kernel = storage.dequantize_weight(kernel, scale)
        kernel = jnp.asarray(kernel, self.dtype).reshape(k_in, k_out)
        dot_cls = self.dot_general_cls or quant_cls or ops.dot_general_cls
        if (self.f32_out and dot_cls is None
                and jnp.dtype(self.dtype) != jnp.dtype(jnp.float32)):
            # low-precision operands, float32 logits; its backward keeps bf16 GEMMs
            return head_logits(x2, kernel).reshape(lead + features)
        dot_general = dot_cls() if dot_cls else ops.matmul
        y = dot_general(x2, kernel, dims, precision=None)
        y = y.astype(jnp.float32) if self.f32_out else y
        return y.reshape(lead + features)
