"""The portable XLA numerics behind the ops seam's elementwise and GEMM members: the projection
dot, RMSNorm and SwiGLU. Pure ``jnp``; the Linen layers and the ``xla`` ops set
(:func:`tfm_jax.layers.ops.xla_ops`) both use them, so this module imports no layer."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def plain_dot_general(x, w, dimension_numbers, precision=None, preferred_element_type=None):
    """``Linear``'s 2-D dot as XLA's own dot (the ``xla`` ops' GEMM)."""
    return jax.lax.dot_general(x, w, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """``x / sqrt(mean(x^2) + eps) * scale``, computed in float32, returned in x's dtype."""
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + eps)
    return (y * scale).astype(x.dtype)


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """``silu(gate) * up`` with ``silu(z) = z * sigmoid(z)``.

    Hand-written VJP: one fused pass computes both input gradients from (gate, up), where
    autodiff of ``silu`` re-derives the sigmoid in several separate elementwise passes:
    ``d_up = dy * silu(g)``, ``d_gate = dy * up * s * (1 + g * (1 - s))`` with ``s = sigmoid(g)``.
    """
    return jax.nn.silu(gate) * up


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(res, dy):
    gate, up = res
    g = gate.astype(jnp.float32)
    s = jax.nn.sigmoid(g)
    dy32 = dy.astype(jnp.float32)
    d_gate = dy32 * up.astype(jnp.float32) * s * (1.0 + g * (1.0 - s))
    d_up = dy32 * g * s
    return d_gate.astype(gate.dtype), d_up.astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)
