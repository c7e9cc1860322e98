"""AdamW with low-precision moments: bfloat16, or blockwise 8-bit with a float32 scale per block.

``train.opt_moments`` (:func:`tfm_jax.train.make_optimizer`):

* ``fp32``: ``optax.adamw`` itself (the reference; golden losses recorded with it).
* ``bf16``: both moments stored in bfloat16 (rounded to nearest even after each update).
* ``int8``: blockwise 8-bit. Each moment keeps the parameter's shape (so it takes the parameter's
  sharding) plus one float32 scale per block of ``block`` values along the last axis (the whole
  row when ``block`` does not divide it):

  - first moment ``m``: symmetric int8, ``q = round(m / absmax * 127)`` per block;
  - second moment ``v``: its square root is stored, unsigned, as ``q = ceil(sqrt(v) / max *
    255)`` in 1..255 (``uint8``): no value maps to zero (a zero ``v`` under a large ``m`` makes
    ``m / (sqrt(v) + eps)`` explode -- the "zero-point problem" of Li et al., *Memory Efficient
    Optimizers with 4-bit States*, 2023) and rounding *up* only shrinks the update. The square
    root halves the dynamic range a block has to cover.

  Why not bitsandbytes' dynamic (non-linear) 8-bit maps: linear blocks need no lookup table, are
  plain jnp, exact to reference in numpy, and with 128-value blocks the error bound
  (``absmax / 254`` per value) is what the tests check. Decoding happens at the start of each
  update, computing in float32, and the new moments are encoded at the end.

Weight decay and the learning rate follow ``optax.adamw`` (decoupled decay with a mask, then
``-lr``), so ``fp32`` here and ``optax.adamw`` differ only by the moments' storage.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

MOMENTS = ("fp32", "bf16", "int8")


class Int8Moment(NamedTuple):
    """One moment leaf in 8 bits: ``q`` (param shape, int8 or uint8) and ``scale`` (float32,
    ``(..., n_blocks)``: the block's absmax, or max of sqrt(v))."""

    q: jax.Array
    scale: jax.Array


def _block(n: int, block: int) -> int:
    return block if n % block == 0 else n


def _blocks(x: jax.Array, block: int) -> jax.Array:
    """(..., n) -> (..., n // b, b) with b = :func:`_block` (scalars as (1, 1))."""
    x = x.reshape(1) if x.ndim == 0 else x
    b = _block(x.shape[-1], block)
    return x.reshape(*x.shape[:-1], x.shape[-1] // b, b)


def encode_signed(m: jax.Array, block: int) -> Int8Moment:
    """Symmetric blockwise int8 of ``m`` (round half to even; absmax 0 -> scale 0, q 0)."""
    xb = _blocks(m.astype(jnp.float32), block)
    amax = jnp.max(jnp.abs(xb), axis=-1)
    safe = jnp.where(amax > 0, amax, 1.0)
    q = jnp.clip(jnp.round(xb / safe[..., None] * 127.0), -127, 127).astype(jnp.int8)
    return Int8Moment(q.reshape(m.shape), amax)


def decode_signed(e: Int8Moment, block: int) -> jax.Array:
    qb = _blocks(e.q.astype(jnp.float32), block)
    return (qb * (e.scale[..., None] / 127.0)).reshape(e.q.shape)


def encode_sqrt(v: jax.Array, block: int) -> Int8Moment:
    """Blockwise uint8 of ``sqrt(v)`` with levels 1..255, rounded up (module doc)."""
    r = _blocks(jnp.sqrt(jnp.maximum(v.astype(jnp.float32), 0.0)), block)
    rmax = jnp.max(r, axis=-1)
    safe = jnp.where(rmax > 0, rmax, 1.0)
    q = jnp.clip(jnp.ceil(r / safe[..., None] * 255.0), 1, 255).astype(jnp.uint8)
    return Int8Moment(q.reshape(v.shape), rmax)


def decode_sqrt(e: Int8Moment, block: int) -> jax.Array:
    """-> v (the square of the decoded root)."""
    qb = _blocks(e.q.astype(jnp.float32), block)
    r = qb * (e.scale[..., None] / 255.0)
    return jnp.square(r).reshape(e.q.shape)


class ScaleByAdamLowpState(NamedTuple):
    count: jax.Array
    mu: Any
    nu: Any


def scale_by_adam_lowp(b1: float, b2: float, eps: float, moments: str,
                       block: int = 128) -> optax.GradientTransformation:
    """``optax.scale_by_adam`` (bias-corrected, eps outside the root) with ``mu``/``nu`` stored as
    ``moments`` (``fp32`` | ``bf16`` | ``int8``, module doc); arithmetic in float32."""
    if moments not in MOMENTS:
        raise ValueError(f"optimizer moments {moments!r}; valid: {', '.join(MOMENTS)}")

    def enc(x, signed):
        if moments == "fp32":
            return x
        if moments == "bf16":
            return x.astype(jnp.bfloat16)
        return encode_signed(x, block) if signed else encode_sqrt(x, block)

    def dec(e, signed):
        if moments in ("fp32", "bf16"):
            return e.astype(jnp.float32)
        return decode_signed(e, block) if signed else decode_sqrt(e, block)

    is_enc = lambda x: isinstance(x, Int8Moment)  # noqa: E731

    def init(params):
        z = lambda p: jnp.zeros(p.shape, jnp.float32)  # noqa: E731
        return ScaleByAdamLowpState(
            jnp.zeros((), jnp.int32),
            jax.tree.map(lambda p: enc(z(p), True), params),
            jax.tree.map(lambda p: enc(z(p), False), params))

    def update(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        mu = jax.tree.map(lambda g, e: b1 * dec(e, True) + (1 - b1) * g.astype(jnp.float32),
                          updates, state.mu, is_leaf=is_enc)
        nu = jax.tree.map(lambda g, e: b2 * dec(e, False)
                          + (1 - b2) * jnp.square(g.astype(jnp.float32)),
                          updates, state.nu, is_leaf=is_enc)
        c = count.astype(jnp.float32)
        bc1, bc2 = 1 - b1 ** c, 1 - b2 ** c
        out = jax.tree.map(lambda g, m, v: ((m / bc1) / (jnp.sqrt(v / bc2) + eps)).astype(
            g.dtype), updates, mu, nu)
        return out, ScaleByAdamLowpState(count, jax.tree.map(lambda m: enc(m, True), mu),
                                         jax.tree.map(lambda v: enc(v, False), nu))

    return optax.GradientTransformation(init, update)


def adamw_lowp(learning_rate: optax.ScalarOrSchedule, *, b1: float, b2: float, eps: float,
               weight_decay: float, mask: Any, moments: str,
               block: int = 128) -> optax.GradientTransformation:
    """AdamW as ``optax.adamw`` (same chain: Adam scaling, masked decoupled decay, -lr) with the
    moments stored as ``moments``."""
    return optax.chain(scale_by_adam_lowp(b1, b2, eps, moments, block),
                       optax.add_decayed_weights(weight_decay, mask),
                       optax.scale_by_learning_rate(learning_rate))


def moment_error_bound(m: jax.Array, block: int) -> jax.Array:
    """Per value, the largest |decode(encode(m)) - m| of :func:`encode_signed`: half a step,
    ``absmax / 254`` of its block (for tests and docs)."""
    amax = jnp.max(jnp.abs(_blocks(m.astype(jnp.float32), block)), axis=-1, keepdims=True)
    return jnp.broadcast_to(amax / 254.0, _blocks(m, block).shape).reshape(m.shape)


def state_leaves_by_kind(opt_state: Any) -> dict[str, list]:
    """Optimizer-state leaves grouped for memory accounting, from their tree paths: under a
    ``mu``/``nu`` field -> ``moments`` (an :class:`Int8Moment`'s ``scale`` -> ``moment_scales``);
    anything else (step counts) -> ``other``."""
    from tfm_jax.core.roles import path_names

    out: dict[str, list] = {"moments": [], "moment_scales": [], "other": []}
    for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        names = path_names(path)
        if "mu" in names or "nu" in names:   # (a norm's "scale" param is a dict key, not this)
            block_scale = (isinstance(path[-1], jax.tree_util.GetAttrKey)
                           and path[-1].name == "scale")
            out["moment_scales" if block_scale else "moments"].append(leaf)
        else:
            out["other"].append(leaf)
    return out
