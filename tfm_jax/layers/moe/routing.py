"""Pure routing numerics of one token group (x (N, d)): top-k routing, capacity and slot
assignment, expert counts, the auxiliary losses, the aux-loss-free balancing bias, and one
expert's FFN. The semantics are documented in :mod:`tfm_jax.layers.moe.layer`."""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from tfm_jax.layers.ffn import ACTIVATIONS, swiglu
from tfm_jax.parallel import axes


# --------------------------------------------------------------------------------------------
# Pure routing numerics (one group: x (N, d)).


class Routing(NamedTuple):
    weights: jax.Array      # (N, k) float32 combine weights of the chosen experts
    experts: jax.Array      # (N, k) int32 chosen expert ids, best first
    probs: jax.Array        # (N, E) float32 router probabilities (softmax or sigmoid scores)


def route(logits: jax.Array, top_k: int, *, router: str = "softmax",
          bias: Optional[jax.Array] = None) -> Routing:
    """Top-k routing of float32 ``logits`` (N, E) (see the module docstring)."""
    logits = logits.astype(jnp.float32)
    if router == "softmax":
        probs = jax.nn.softmax(logits, axis=-1)
        weights, experts = jax.lax.top_k(probs, top_k)
    elif router == "sigmoid":
        probs = jax.nn.sigmoid(logits)
        sel = probs if bias is None else probs + jax.lax.stop_gradient(bias)
        _, experts = jax.lax.top_k(sel, top_k)
        weights = jnp.take_along_axis(probs, experts, axis=-1)
    else:
        raise ValueError(f"router {router!r}; valid: softmax, sigmoid")
    if top_k > 1:   # top-1 keeps the raw probability/score: renormalised it would be exactly
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)   # 1 (no router gradient)
    return Routing(weights, experts.astype(jnp.int32), probs)


def expert_capacity(n_tokens: int, n_experts: int, top_k: int,
                    capacity_factor: Optional[float]) -> int:
    """Slots per expert in a group of ``n_tokens``: ``ceil(cf * N * k / E)``, at most ``N`` (a
    token picks an expert once); ``None`` (dropless): ``N``."""
    if capacity_factor is None:
        return n_tokens
    return max(1, min(n_tokens, math.ceil(capacity_factor * n_tokens * top_k / n_experts)))


def assign_slots(experts: jax.Array, n_experts: int, capacity: int,
                 valid: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
    """Position of each assignment in its expert's buffer and whether it fits.

    experts (N, k) -> (position (N, k) int32, keep (N, k) bool). Priority: choice rank first,
    then token order (all first choices before any second choice). ``valid`` (N,) bool: padding
    tokens (False) take no slot and are never kept."""
    n, k = experts.shape
    onehot = jax.nn.one_hot(experts.T.reshape(k * n), n_experts, dtype=jnp.int32)  # (kN, E)
    if valid is not None:
        onehot = onehot * jnp.tile(valid.astype(jnp.int32), k)[:, None]
    pos = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=-1)              # (kN,)
    pos = pos.reshape(k, n).T
    keep = pos < capacity
    return pos, keep if valid is None else keep & valid[:, None]


def _masked_mean(x: jax.Array, valid: Optional[jax.Array], axis=0) -> jax.Array:
    """Mean over the real tokens (``valid`` (N,)) along ``axis`` 0; 0 when there are none."""
    if valid is None:
        return jnp.mean(x, axis=axis)
    w = valid.astype(jnp.float32).reshape(valid.shape + (1,) * (x.ndim - 1))
    return jnp.sum(x * w, axis=axis) / jnp.maximum(jnp.sum(w), 1.0)


def expert_counts(experts: jax.Array, n_experts: int,
                  valid: Optional[jax.Array] = None) -> jax.Array:
    """(E,) float32: how many of the real tokens' top-k choices picked each expert (the load,
    before capacity drops); experts (N, k)."""
    onehot = jax.nn.one_hot(experts, n_experts, dtype=jnp.float32)               # (N, k, E)
    if valid is not None:
        onehot = onehot * valid.astype(jnp.float32)[:, None, None]
    return jnp.sum(onehot, axis=(0, 1))


def load_balance_loss(probs: jax.Array, experts: jax.Array,
                      valid: Optional[jax.Array] = None) -> jax.Array:
    """``E * sum_e f_e * P_e`` for one group; probs (N, E), experts (N, k). 1 when uniform.
    ``valid`` (N,): only real tokens count in ``f`` and ``P``."""
    n_experts = probs.shape[-1]
    f = _masked_mean(jnp.mean(jax.nn.one_hot(experts, n_experts, dtype=jnp.float32), axis=1),
                     valid)                                                        # (E,)
    return n_experts * jnp.sum(f * _masked_mean(probs, valid))


def router_z_loss(logits: jax.Array, valid: Optional[jax.Array] = None) -> jax.Array:
    """``mean_n logsumexp(logits_n)^2`` for one group (ST-MoE), logits (N, E) float32, over the
    real tokens (``valid`` (N,))."""
    return _masked_mean(jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)),
                        valid)


def balance_bias_update(bias: jax.Array, counts: jax.Array, rate: float) -> jax.Array:
    """Aux-loss-free balancing (DeepSeek-V3): ``b_e += rate * sign(mean_e(load) - load_e)``.

    bias, counts (..., E) float32 (a leading ``layers`` axis under ``scan_layers``); ``counts``
    is the per-expert load of the whole optimizer step (summed over micro-batches). Overloaded
    experts get a lower bias (chosen less), underloaded ones a higher."""
    mean = jnp.mean(counts, axis=-1, keepdims=True)
    return (bias + rate * jnp.sign(mean - counts)).astype(bias.dtype)


@jax.custom_vjp
def load_tap(bias: jax.Array, counts: jax.Array, y: jax.Array) -> jax.Array:
    """Identity on ``y`` whose VJP returns ``counts`` as the cotangent of ``bias``.

    This is how the balancing bias learns its layer's load inside the ordinary gradient
    computation: the train step finds the counts in the bias's "gradient" (summed over micro-
    batches, data shards and -- under ``nn.scan`` -- kept per layer, like any gradient) and
    applies :func:`balance_bias_update` instead of AdamW (role ``balance``,
    :mod:`tfm_jax.core.roles`). ``y`` (the layer output) keeps the tap on the loss path."""
    del bias, counts
    return y


def _load_tap_fwd(bias, counts, y):
    return y, counts


def _load_tap_bwd(counts, g):
    return counts, jnp.zeros_like(counts), g


load_tap.defvjp(_load_tap_fwd, _load_tap_bwd)


def expert_ffn(x: jax.Array, kernels: dict[str, jax.Array], kind: str) -> jax.Array:
    """Batched experts: x (..., E, C, d) with kernels (E, d, F) / (E, F, d) -> (..., E, C, d).

    ``kind`` is the model's FFN type (swiglu: ``wi_0`` gate, ``wi_1`` up; relu/gelu: ``wi``)."""
    dot = lambda a, w: jnp.einsum("...ecd,edf->...ecf", a, w.astype(a.dtype))  # noqa: E731
    if kind == "swiglu":
        h = swiglu(dot(x, kernels["wi_0"]), dot(x, kernels["wi_1"]))
    elif kind in ACTIVATIONS:
        h = ACTIVATIONS[kind](dot(x, kernels["wi"]))
    else:
        raise ValueError(f"unknown ffn kind {kind!r}")
    return dot(h, kernels["wo"])                                          # (E, C, d)


def kernel_names(kind: str) -> tuple[str, ...]:
    return ("wi_0", "wi_1", "wo") if kind == "swiglu" else ("wi", "wo")


def kernel_axes(name: str) -> tuple[str, str, str]:
    """Logical axes of a stacked expert kernel: (expert, embed, mlp), ``wo`` (expert, mlp,
    embed). The dispatch strategies derive their ``shard_map`` layouts from these and the rules."""
    if name == "wo":
        return (axes.EXPERT, axes.MLP, axes.EMBED)
    return (axes.EXPERT, axes.EMBED, axes.MLP)


# --------------------------------------------------------------------------------------------
# The module.
