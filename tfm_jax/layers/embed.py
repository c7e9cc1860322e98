"""Token embedding with an ``attend`` method for tied input/output embeddings."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from tfm_jax.layers.cross_entropy import head_logits
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
        """tokens (B, T) int -> (B, T, d): rows gathered from the stored table, then cast to the
        compute dtype (the table is never converted as a whole; its gradient scatter-adds in
        the parameter dtype)."""
        return jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """x (B, T, d) -> float32 logits (B, T, V) with the transposed embedding (tied head),
        straight out of a compute-dtype GEMM (:func:`tfm_jax.layers.cross_entropy.head_logits`)."""
        b, t, d = x.shape
        w = jnp.asarray(self.embedding, self.dtype).T                            # (d, V)
        return head_logits(x.astype(self.dtype).reshape(b * t, d), w).reshape(b, t, -1)
