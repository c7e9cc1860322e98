"""Autoregressive sampling from a trained model.

This version recomputes the full forward over a fixed window of ``seq_len`` tokens for each new
token (one compiled shape; causal masking makes the not-yet-written tail of the window
irrelevant). When the window is full it slides left; RoPE is relative, so positions restart at 0.
A KV-cache prefill/decode path is the subject of a later module.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from tfm_jax.data import ByteTokenizer


def sample_logits(logits: jax.Array, rng: jax.Array, temperature: float, top_k: int) -> jax.Array:
    """logits (B, V) -> token ids (B,). temperature 0: greedy; top_k 0: no truncation."""
    if temperature <= 0:
        return jnp.argmax(logits, axis=-1)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1)


@partial(jax.jit, static_argnames=("model", "temperature", "top_k"))
def _next_token(model: nn.Module, variables: Any, window: jax.Array, length: jax.Array,
                rng: jax.Array, temperature: float, top_k: int) -> jax.Array:
    logits = model.apply(variables, window, train=False)                   # (B, L, V)
    last = jnp.take_along_axis(logits, (length - 1)[:, None, None], axis=1)[:, 0]
    return sample_logits(last, rng, temperature, top_k)


def generate_ids(model: nn.Module, variables: Any, prompt: np.ndarray, *, max_new_tokens: int,
                 window: int, temperature: float = 0.8, top_k: int = 40, seed: int = 0,
                 stop_id: Optional[int] = None) -> np.ndarray:
    """prompt (P,) int -> prompt + up to ``max_new_tokens`` sampled ids (stops at ``stop_id``)."""
    ids = list(int(i) for i in prompt)
    if not ids:
        raise ValueError("generation needs a non-empty prompt")
    rng = jax.random.key(seed)
    for _ in range(max_new_tokens):
        ctx = ids[-window:]
        buf = np.zeros((1, window), np.int32)
        buf[0, :len(ctx)] = ctx
        rng, sub = jax.random.split(rng)
        tok = int(_next_token(model, variables, jnp.asarray(buf),
                              jnp.asarray([len(ctx)], jnp.int32), sub, temperature, top_k)[0])
        if stop_id is not None and tok == stop_id:
            break
        ids.append(tok)
    return np.asarray(ids, np.int32)


def generate_text(model: nn.Module, variables: Any, prompt: str, *, max_new_tokens: int,
                  window: int, temperature: float = 0.8, top_k: int = 40, seed: int = 0) -> str:
    tok = ByteTokenizer()
    # Packed training streams separate documents with EOS, so EOS is the "document start" context.
    prompt_ids = np.concatenate([[tok.EOS_ID], tok.encode(prompt)]).astype(np.int32)
    ids = generate_ids(model, variables, prompt_ids,
                       max_new_tokens=max_new_tokens, window=window, temperature=temperature,
                       top_k=top_k, seed=seed, stop_id=tok.EOS_ID)
    return tok.decode(ids)
