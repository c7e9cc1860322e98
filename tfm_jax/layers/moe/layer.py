"""Mixture-of-Experts feed-forward: router, capacity, auxiliary losses, stacked experts.

Semantics (one definition for every dispatch strategy, :mod:`tfm_jax.layers.moe.dispatch`):

* Tokens are routed in **groups** (the token shards of the mesh: ``G = prod`` of the sizes of the
  mesh axes the ``batch`` rule maps to, plus ``expert``), each of ``N`` tokens.
* Router in float32: ``logits = x W_r`` (N, E). ``softmax``: ``p = softmax(logits)``, the top-k
  of ``p`` are chosen and their weights renormalised to sum to 1 when ``top_k > 1`` (top-1 keeps
  the raw probability, as Switch, so the router still gets a gradient). ``sigmoid``: scores
  ``s = sigmoid(logits)``; experts are chosen by ``s + b`` (``b``: the aux-loss-free balancing
  bias, DeepSeek-V3) and weighted by the chosen ``s``, renormalised when ``top_k > 1`` (top-1
  keeps the raw score, as Llama 4, for the same reason; the bias never enters the weights). ``b`` is the ``balance_bias`` leaf (E,) of the params tree, not trained: after each
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
  sown as losses (:func:`tfm_jax.core.telemetry.sow_loss`) that the train step adds to the loss.

The module (:class:`MoEFeedForward`) holds the parameters: ``router/kernel`` (d, E) float32,
``experts/{wi_0,wi_1,wo}/kernel`` stacked (E, d, F) / (E, F, d) with the logical ``expert`` axis
first, with ``moe.router: sigmoid`` the ``balance_bias`` (E,), and with ``moe.shared_expert`` a
dense ``shared`` FFN every token goes through.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from tfm_jax.core import telemetry
from tfm_jax.layers.ffn import FeedForward
from tfm_jax.layers.moe import dispatch as moe_dispatch
from tfm_jax.layers.moe.routing import kernel_axes, kernel_names, load_tap
from tfm_jax.parallel import axes


class _StackedKernel(nn.Module):
    """One stacked expert matrix ``kernel`` (E, n_in, n_out), logical axes ``kernel_axes`` (the
    name ``kernel`` gives it the ``weight`` role, :mod:`tfm_jax.core.roles`)."""

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

        cfg = self.moe
        b, t, d = x.shape
        e, f = cfg.n_experts, self.hidden
        router_kernel = _StackedKernel((d, e), (axes.EMBED, None), self.init_std, jnp.float32,
                                       name="router")()
        bias = None
        if cfg.router == "sigmoid":   # not trained: role "balance" (tfm_jax.core.roles)
            bias = self.param("balance_bias", nn.with_logical_partitioning(
                nn.initializers.zeros, (None,)), (e,), jnp.float32)
        shapes = {"wi_0": (e, d, f), "wi_1": (e, d, f), "wi": (e, d, f), "wo": (e, f, d)}
        kernels = {
            n: _StackedKernel(shapes[n], kernel_axes(n),
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
