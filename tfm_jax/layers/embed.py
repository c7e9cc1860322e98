"""Token embedding with an ``attend`` method for tied input/output embeddings."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from tfm_jax.parallel import axes


class Embed(nn.Module):
    vocab_size: int
    features: int
    init_std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(self.init_std),
                                         (axes.VOCAB, axes.EMBED)),
            (self.vocab_size, self.features), self.param_dtype)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens (B, T) int -> (B, T, d)."""
        return jnp.take(jnp.asarray(self.embedding, self.dtype), tokens, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:
        """x (B, T, d) -> logits (B, T, V) with the transposed embedding (tied head)."""
        return jnp.einsum("btd,vd->btv", x.astype(self.dtype),
                          jnp.asarray(self.embedding, self.dtype))
