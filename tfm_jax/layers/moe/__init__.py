"""Mixture-of-Experts: pure routing numerics (:mod:`~tfm_jax.layers.moe.routing`), the dispatch
strategies (:mod:`~tfm_jax.layers.moe.dispatch`: dense, all-to-all under ``shard_map``,
implicit, ragged) and the Linen layer (:mod:`~tfm_jax.layers.moe.layer`)."""

from tfm_jax.layers.moe.layer import MoEFeedForward
from tfm_jax.layers.moe.routing import (Routing, assign_slots, balance_bias_update, expert_capacity,
                                        expert_counts, expert_ffn, kernel_axes, kernel_names,
                                        load_balance_loss,
                                        load_tap, route, router_z_loss)
