"""The ``cpu-xla`` ops set: XLA ops shaped for XLA:CPU (the portable layers know nothing of it).

* the projection GEMM as :func:`matmul`, whose weight gradient stays on the fast GEMM path;
* the block-causal attention core (:mod:`tfm_jax.layers.attention_ops.block`), which skips the
  masked half of the score matrix.

:func:`tfm_jax.platform.backends.resolve_ops` picks this set for CPU runs that do not use the
native kernels.
"""

from __future__ import annotations

import functools

import jax

from tfm_jax.layers import functional
from tfm_jax.layers.attention_ops import block, dense
from tfm_jax.layers.ops import Ops


@jax.custom_vjp
def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """(N, K) @ (K, M), with a backward whose weight gradient is a plain (K, N) @ (N, M) GEMM.

    Left to itself XLA:CPU computes ``dW = x^T dy`` as a transposed-operand dot on a different
    (Eigen) path that runs beside the YNNPACK GEMMs; materialising ``x^T`` first (one cheap copy,
    kept by an optimization barrier) keeps every GEMM of the step on the same fast path.
    """
    return x @ w


def _matmul_fwd(x, w):
    return x @ w, (x, w)


def _matmul_bwd(res, dy):
    x, w = res
    x_t = jax.lax.optimization_barrier(x.T)
    return dy @ w.T, (x_t @ dy).astype(w.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def cpu_dot_general(x, w, dimension_numbers, precision=None, preferred_element_type=None):
    """``Linear``'s 2-D dot as :func:`matmul` (the ``cpu-xla`` ops' GEMM)."""
    assert dimension_numbers == (((1,), (0,)), ((), ())), dimension_numbers
    return matmul(x, w)


@functools.lru_cache(maxsize=None)
def cpu_xla_ops() -> Ops:
    """XLA ops shaped for XLA:CPU (the block-causal core and the transposed-free dW matmul)."""
    return Ops("cpu-xla", cpu_dot_general, block.causal_attention, functional.rms_norm,
               functional.swiglu, dense.cached_attention)
