"""Rotary position embeddings (RoPE): sin/cos tables per position, applied to q and k with a
hand-written VJP (the tables are constants of the backward pass)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def inv_frequencies(head_dim: int, theta: float, scaling=None):
    """RoPE inverse frequencies (D/2,) as a float32 numpy constant: ``theta^(-2i/D)``, then the
    ``scaling`` rule (:class:`tfm_jax.config.schema.RopeScaling`, or None). llama3 (Llama 3.1):
    with wavelength ``w = 2 pi / f``, ``L = original_max_position_embeddings``: ``w > L / low``
    -> ``f / factor``; ``w < L / high`` -> ``f``; in between ``(1 - s) f / factor + s f`` with
    ``s = (L / w - low) / (high - low)``."""
    import numpy as np

    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    inv = inv.astype(np.float32)
    if scaling is None:
        return inv
    if scaling.type != "llama3":
        raise ValueError(f"rope_scaling.type={scaling.type!r}: only llama3 is implemented")
    f = inv.astype(np.float64)
    factor, low, high = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
    old = scaling.original_max_position_embeddings
    wavelen = 2 * np.pi / f
    out = np.where(wavelen > old / low, f / factor, f)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return np.where(medium, smoothed, out).astype(np.float32)


def rope_tables(positions: jax.Array, head_dim: int, theta: float,
                scaling=None) -> jax.Array:
    """sin/cos tables for :func:`apply_rope`: positions (B, T) -> (2, B, T, 1, D/2) float32.

    ``inv_freq[i] = theta^(-2i/D)``, angle ``a = pos * inv_freq``. Computed once per forward and
    shared by every layer (and constant for the backward pass). ``scaling``: a
    ``model.rope_scaling`` frequency rule (:func:`inv_frequencies`).
    """
    if scaling is None:
        inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    else:
        inv_freq = jnp.asarray(inv_frequencies(head_dim, theta, scaling))             # (D/2,)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq                    # (B, T, D/2)
    return jnp.stack([jnp.sin(angles), jnp.cos(angles)])[:, :, :, None, :]


def _rotate(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


@jax.custom_vjp
def apply_rope(x: jax.Array, sincos: jax.Array) -> jax.Array:
    """Rotary embedding, "rotate-half" convention: x (B, T, H, D) split into halves (x1, x2),
    ``out = [x1 cos a - x2 sin a, x2 cos a + x1 sin a]``.

    The rotation is orthogonal, so its VJP is the inverse rotation (angle -a): one fused pass,
    written by hand. The tables are constants of the positions: no gradient flows to them.
    """
    return _rotate(x, sincos[0], sincos[1])


def _apply_rope_fwd(x, sincos):
    return _rotate(x, sincos[0], sincos[1]), sincos


def _apply_rope_bwd(sincos, dy):
    return _rotate(dy, -sincos[0], sincos[1]), jnp.zeros_like(sincos)


apply_rope.defvjp(_apply_rope_fwd, _apply_rope_bwd)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding of x (B, T, H, D) at positions (B, T)."""
    return apply_rope(x, rope_tables(positions, x.shape[-1], theta))
