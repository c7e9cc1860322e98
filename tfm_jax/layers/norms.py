"""Normalization: LayerNorm, RMSNorm, BatchNorm (masked or not), as pure functions and modules.

Statistics are computed in float32 whatever the compute dtype.

* LayerNorm  ``y = (x - mean_d x) / sqrt(var_d x + eps) * scale + bias``   (per token)
* RMSNorm    ``y = x / sqrt(mean_d x^2 + eps) * scale``                    (per token, no centring)
* BatchNorm  ``y = (x - mu) / sqrt(s2 + eps) * scale + bias`` with mu, s2 per feature over all
  (batch, length) positions -- optionally only the non-padding ones (``mask``). Train mode uses
  the batch statistics and updates running averages in the ``batch_stats`` collection; eval mode
  uses the running averages. This is the cross-sample dependence the normalization study measures.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from tfm_jax.layers.functional import rms_norm  # noqa: F401  (re-exported)
from tfm_jax.layers.ops import Ops, resolve as resolve_ops
from tfm_jax.parallel import axes


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale + bias).astype(x.dtype)


def batch_stats(x: jax.Array, mask: Optional[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Per-feature mean and (biased) variance over all leading axes; ``mask`` (x.shape[:-1])
    selects which positions count. x: (..., D) -> mean, var: (D,)."""
    xf = x.astype(jnp.float32)
    if mask is None:
        mean = xf.mean(axis=tuple(range(x.ndim - 1)))
        var = jnp.square(xf - mean).mean(axis=tuple(range(x.ndim - 1)))
        return mean, var
    m = mask.astype(jnp.float32)[..., None]
    count = jnp.maximum(m.sum(), 1.0)
    mean = (xf * m).sum(axis=tuple(range(x.ndim - 1))) / count
    var = (jnp.square(xf - mean) * m).sum(axis=tuple(range(x.ndim - 1))) / count
    return mean, var


def batch_norm(x: jax.Array, mean: jax.Array, var: jax.Array, scale: jax.Array,
               bias: jax.Array, eps: float) -> jax.Array:
    y = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale + bias).astype(x.dtype)


def _vec(module: nn.Module, name: str, init, dim: int, dtype) -> jax.Array:
    return module.param(name, nn.with_logical_partitioning(init, (axes.NORM,)), (dim,), dtype)


class LayerNorm(nn.Module):
    eps: float = 1e-6
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None, *, train: bool = False):
        d = x.shape[-1]
        return layer_norm(x, _vec(self, "scale", nn.initializers.ones, d, self.param_dtype),
                          _vec(self, "bias", nn.initializers.zeros, d, self.param_dtype), self.eps)


class RMSNorm(nn.Module):
    eps: float = 1e-6
    param_dtype: Any = jnp.float32
    ops: Optional[Ops] = None   # the RMSNorm core (tfm_jax.layers.ops); None: XLA default

    @nn.compact
    def __call__(self, x, mask=None, *, train: bool = False):
        scale = _vec(self, "scale", nn.initializers.ones, x.shape[-1], self.param_dtype)
        return resolve_ops(self.ops).rms_norm(x, scale, self.eps)


class BatchNorm(nn.Module):
    """BatchNorm over (batch, length); ``masked`` restricts statistics to ``mask == 1``."""

    eps: float = 1e-6
    momentum: float = 0.99
    masked: bool = True
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None, *, train: bool = False):
        d = x.shape[-1]
        scale = _vec(self, "scale", nn.initializers.ones, d, self.param_dtype)
        bias = _vec(self, "bias", nn.initializers.zeros, d, self.param_dtype)
        stat_init = lambda init: nn.with_logical_partitioning(init, (axes.NORM,))  # noqa: E731
        ra_mean = self.variable("batch_stats", "mean", stat_init(nn.initializers.zeros),
                                None, (d,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", stat_init(nn.initializers.ones),
                               None, (d,), jnp.float32)
        if not train:
            return batch_norm(x, ra_mean.value, ra_var.value, scale, bias, self.eps)
        mean, var = batch_stats(x, mask if self.masked else None)
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return batch_norm(x, mean, var, scale, bias, self.eps)


class Identity(nn.Module):
    @nn.compact
    def __call__(self, x, mask=None, *, train: bool = False):
        return x


def make_norm(kind: str, *, eps: float, bn_momentum: float = 0.99, bn_masked: bool = True,
              param_dtype: Any = jnp.float32, name: Optional[str] = None,
              ops: Optional[Ops] = None) -> nn.Module:
    if kind == "layernorm":
        return LayerNorm(eps, param_dtype, name=name)
    if kind == "rmsnorm":
        return RMSNorm(eps, param_dtype, ops, name=name)
    if kind == "batchnorm":
        return BatchNorm(eps, bn_momentum, bn_masked, param_dtype, name=name)
    if kind == "none":
        return Identity(name=name)
    raise ValueError(f"unknown norm {kind!r}")
