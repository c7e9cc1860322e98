"""Position-wise feed-forward: ReLU / GELU (2 matrices) or SwiGLU (3 matrices).

* relu/gelu: ``FFN(x) = act(x W_in) W_out``, W_in: (d, F), W_out: (F, d). GELU is the exact erf
  form.
* swiglu:    ``FFN(x) = (silu(x W_gate) * (x W_up)) W_out`` with kernels ``wi_0`` = W_gate (d, F),
  ``wi_1`` = W_up (d, F), ``wo`` (F, d). Two separate GEMMs measure faster on XLA:CPU than one
  fused (d, 2F) GEMM followed by a split (the split's strided copies cost more in backward).

The hidden width F comes from :func:`tfm_jax.config.ffn_hidden_size` (the Llama rule).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from tfm_jax.layers.functional import swiglu  # noqa: F401  (re-exported)
from tfm_jax.layers.linear import Linear
from tfm_jax.layers.ops import Ops, resolve as resolve_ops
from tfm_jax.parallel import axes

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


class FeedForward(nn.Module):
    hidden: int
    kind: str = "swiglu"
    init_std: float = 0.02
    out_init_std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    ops: Optional[Ops] = None   # GEMM + SwiGLU core (tfm_jax.layers.ops); None: XLA defaults

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        ops = resolve_ops(self.ops)
        dense = lambda feats, kaxes, std, name: Linear(  # noqa: E731
            feats, kaxes, init_std=std, dtype=self.dtype, param_dtype=self.param_dtype,
            ops=ops, name=name)
        if self.kind == "swiglu":
            gate = dense(self.hidden, (axes.EMBED, axes.MLP), self.init_std, "wi_0")(x)
            up = dense(self.hidden, (axes.EMBED, axes.MLP), self.init_std, "wi_1")(x)
            h = ops.swiglu(gate, up)                                     # (B, T, F)
        elif self.kind in ACTIVATIONS:
            h = ACTIVATIONS[self.kind](
                dense(self.hidden, (axes.EMBED, axes.MLP), self.init_std, "wi")(x))
        else:
            raise ValueError(f"unknown ffn kind {self.kind!r}")
        h = nn.with_logical_constraint(h, (axes.BATCH, axes.LENGTH, axes.MLP))
        return dense(d, (axes.MLP, axes.EMBED), self.out_init_std, "wo")(h)   # (B, T, d)
