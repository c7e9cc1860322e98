"""Mixture-of-Experts feed-forward: router, capacity, auxiliary losses, stacked experts.

Semantics (one definition for every dispatch strategy, :mod:`tfm_jax.parallel.moe_dispatch`):

* Tokens are routed in **groups** (the token shards of the mesh: ``G = prod`` of the sizes of the
  mesh axes the ``batch`` rule maps to, plus ``expert``), each of ``N`` tokens.
* Router in float32: ``logits = x W_r`` (N, E). ``softmax``: ``p = softmax(logits)``, the top-k
  of ``p`` are chosen and their weights renormalised to sum to 1 when ``top_k > 1`` (top-1 keeps
  the raw probability, as Switch, so the router still gets a gradient). ``sigmoid``: scores
  ``s = sigmoid(logits)``; experts are chosen by ``s + b`` (``b``: the aux-loss-free balancing
  bias, DeepSeek-V3) and weighted by the chosen ``s`` renormalised (the bias never enters the
  weights). ``b`` is the ``balance_bias`` leaf (E,) of the params tree, not trained: after each
  optimizer step ``b_e += moe.bias_update_rate * sign(mean(load) - load_e)`` with the step's
  load (summed over micro-batches), applied by the train step (:func:`balance_bias_update`,
  :func:`load_tap`). The auxiliary loss of a sigmoid router uses the scores normalised per token.
* Padding tokens (``token_mask`` False) are not routed: they take no capacity slot, their output
  is 0, and they count in none of the statistics (load, drops, losses, entropy).
* Capacity per (group, expert): ``C = ceil(capacity_factor * N * top_k / E)`` (``None``:
  dropless, ``C = N``). Slots fill in priority order: all first choices (token order), then all
  second choices, ... (GShard); an assignment past ``C`` is **dropped** (it contributes 0; the
  token keeps its other assignments and the residual connection).
* Load-balancing loss (Switch eq. 4, top-k form): ``E * sum_e f_e P_e`` with ``f_e`` the
  fraction of the ``N * top_k`` assignments that chose ``e`` (before drops) and ``P_e`` the mean
  router probability of ``e``; router z-loss (ST-MoE): ``mean_n logsumexp(logits_n)^2``. Both
  per group, averaged over groups, times ``moe.aux_loss_coef`` / ``moe.z_loss_coef``; they are
  sown as losses (:func:`tfm_jax.telemetry.sow_loss`) that the train step adds to the loss.

The module (:class:`MoEFeedForward`) holds the parameters: ``router/kernel`` (d, E) float32,
``experts/{wi_0,wi_1,wo}/kernel`` stacked (E, d, F) / (E, F, d) with the logical ``expert`` axis
first, with ``moe.router: sigmoid`` the ``balance_bias`` (E,), and with ``moe.shared_expert`` a
dense ``shared`` FFN every token goes through.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from tfm_jax import telemetry
from tfm_jax.layers.ffn import ACTIVATIONS, FeedForward, swiglu
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
    if top_k > 1 or router == "sigmoid":
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
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
    :mod:`tfm_jax.param_roles`). ``y`` (the layer output) keeps the tap on the loss path."""
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


# --------------------------------------------------------------------------------------------
# The module.


class _StackedKernel(nn.Module):
    """One stacked expert matrix ``kernel`` (E, n_in, n_out), logical axes ``kernel_axes`` (the
    name ``kernel`` gives it the ``weight`` role, :mod:`tfm_jax.param_roles`)."""

    shape: tuple[int, ...]
    kernel_axes: tuple[str, ...]
    init_std: float
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self) -> jax.Array:
        init = nn.initializers.normal(self.init_std)
        return self.param("kernel", nn.with_logical_partitioning(init, self.kernel_axes),
                          self.shape, self.param_dtype)


class MoEFeedForward(nn.Module):
    """x (B, T, d) -> (B, T, d): the MoE replacement of :class:`tfm_jax.layers.ffn.FeedForward`.

    ``moe`` is the :class:`tfm_jax.config.MoEConfig`; ``hidden`` the expert width F; ``kind`` the
    model's FFN type. The dispatch strategy (``moe.dispatch``) changes only how the computation
    is laid out over devices, never the parameters or (in float32, to rounding) the result.
    Sows per layer: the weighted losses ``load_balance_loss`` / ``router_z_loss`` (losses
    collection) and telemetry ``moe/drop_fraction``, ``moe/load_max`` (max expert load over the
    mean: 1 = balanced), ``moe/router_entropy``, ``moe/load`` (E,) assignment fractions.
    """

    moe: Any
    hidden: int
    kind: str = "swiglu"
    init_std: float = 0.02
    out_init_std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    ops: Any = None

    # Block passes its token_mask (padding positions are not routed, :func:`assign_slots`)
    uses_token_mask = True

    @nn.compact
    def __call__(self, x: jax.Array, token_mask: Optional[jax.Array] = None) -> jax.Array:
        from tfm_jax.parallel import moe_dispatch

        cfg = self.moe
        b, t, d = x.shape
        e, f = cfg.n_experts, self.hidden
        router_kernel = _StackedKernel((d, e), (axes.EMBED, None), self.init_std, jnp.float32,
                                       name="router")()
        bias = None
        if cfg.router == "sigmoid":   # not trained: role "balance" (tfm_jax.param_roles)
            bias = self.param("balance_bias", nn.with_logical_partitioning(
                nn.initializers.zeros, (None,)), (e,), jnp.float32)
        shapes = {"wi_0": (e, d, f), "wi_1": (e, d, f), "wi": (e, d, f), "wo": (e, f, d)}
        kaxes = {"wo": (axes.EXPERT, axes.MLP, axes.EMBED)}
        kernels = {
            n: _StackedKernel(shapes[n], kaxes.get(n, (axes.EXPERT, axes.EMBED, axes.MLP)),
                              self.out_init_std if n == "wo" else self.init_std,
                              self.param_dtype, name=f"experts_{n}")()
            for n in kernel_names(self.kind)}
        spec = moe_dispatch.MoESpec(
            n_experts=e, top_k=cfg.top_k, capacity_factor=cfg.capacity_factor,
            router=cfg.router, kind=self.kind, dtype=self.dtype)
        init = self.is_initializing()     # (init: any batch, e.g. 1 row; same parameters)
        y, stats = moe_dispatch.moe_layer(x, router_kernel, kernels, spec,
                                          strategy="dense" if init else cfg.dispatch,
                                          groups=1 if init else None, token_mask=token_mask,
                                          router_bias=bias)
        if bias is not None:
            y = load_tap(bias, jax.lax.stop_gradient(stats["counts"]), y)
        telemetry.sow_loss(self, "load_balance_loss", cfg.aux_loss_coef * stats["aux_loss"])
        telemetry.sow_loss(self, "router_z_loss", cfg.z_loss_coef * stats["z_loss"])
        telemetry.sow(self, "moe/drop_fraction", stats["drop_fraction"])
        telemetry.sow(self, "moe/load_max", stats["load_max"], reduce="max")
        telemetry.sow(self, "moe/router_entropy", stats["router_entropy"])
        telemetry.sow(self, "moe/load", stats["load"])
        if cfg.shared_expert:
            y = y + FeedForward(self.hidden, self.kind, init_std=self.init_std,
                                out_init_std=self.out_init_std, dtype=self.dtype,
                                param_dtype=self.param_dtype, ops=self.ops, name="shared")(x)
        return y.astype(self.dtype)
