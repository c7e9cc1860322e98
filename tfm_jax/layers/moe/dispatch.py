"""MoE dispatch strategies: the same function of the same parameters, laid out three ways.

``moe_layer(x, router_kernel, kernels, spec, strategy=...)`` with x (B, T, d):

* ``dense`` -- the single-device reference: every expert runs on every token (E x the FLOPs) and
  each token sums its kept top-k outputs. Simple enough to trust; used at init and in tests.
* ``all_to_all`` -- explicit expert parallelism (DeepSpeed-MoE / GShard semantics) in
  ``jax.shard_map`` over the whole mesh: each device routes its own tokens (one group), packs
  capacity-bounded per-expert buffers (E, C, d), ``jax.lax.all_to_all`` over the ``expert``
  mesh axis sends each destination its experts' buffers, the local experts run as one batched
  einsum, ``all_to_all`` sends the results back, and the router weights combine them. Bytes
  moved per layer and direction: ``E * C * d`` elements per device (times (ep-1)/ep off-device).
* ``implicit`` -- the same buffers in the global view, with only sharding constraints: groups
  over the token axes, then experts over ``expert`` for the expert einsum, then back. XLA
  inserts the collectives (the "fused kernel" analogue: no collective in user code).

Routing groups are the token shards (:func:`token_axes`): ``G`` = product of the sizes of the mesh
axes the ``batch`` rule maps to, plus ``expert``; capacity and the auxiliary losses are per group
(:mod:`tfm_jax.layers.moe`), so every strategy drops the same assignments. Without a mesh
(or all axes of size 1) ``G = 1``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from tfm_jax.layers.moe import routing as moe_lib
from tfm_jax.parallel import axes

STRATEGIES = ("dense", "all_to_all", "implicit", "ragged")
EXPERT_AXIS = "expert"


@dataclasses.dataclass(frozen=True)
class MoESpec:
    n_experts: int
    top_k: int
    capacity_factor: Optional[float]
    router: str = "softmax"
    kind: str = "swiglu"
    dtype: Any = jnp.float32


def _mesh():
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty else mesh


def token_axes(mesh=None) -> tuple[str, ...]:
    """Mesh axes the routing groups (token shards) span: the ``batch`` rule's axes in the
    active logical rules, plus ``expert``; () without a mesh."""
    mesh = mesh if mesh is not None else _mesh()
    if mesh is None:
        return ()
    spec = nn.logical_to_mesh_axes((axes.BATCH,))
    entry = spec[0] if len(spec) else None
    names = [] if entry is None else [entry] if isinstance(entry, str) else list(entry)
    if EXPERT_AXIS in mesh.axis_names and EXPERT_AXIS not in names:
        names.append(EXPERT_AXIS)
    return tuple(n for n in names if n in mesh.axis_names)


def n_groups(mesh=None) -> int:
    mesh = mesh if mesh is not None else _mesh()
    return 1 if mesh is None else math.prod(mesh.shape[a] for a in token_axes(mesh))


# --------------------------------------------------------------------------------------------
# One group: route, pack, unpack.


def _route_group(x, router_kernel, spec: MoESpec, capacity: int, valid=None, bias=None):
    """x (N, d), valid (N,) bool or None, bias (E,) or None -> (routing, position, keep, stats
    of this group). Padding tokens (``valid`` False) are not routed and count nowhere."""
    logits = jnp.dot(x.astype(jnp.float32), router_kernel.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)                       # (N, E)
    r = moe_lib.route(logits, spec.top_k, router=spec.router, bias=bias)
    pos, keep = moe_lib.assign_slots(r.experts, spec.n_experts, capacity, valid)
    p = r.probs if spec.router == "softmax" else r.probs / jnp.sum(r.probs, -1, keepdims=True)
    counts = moe_lib.expert_counts(r.experts, spec.n_experts, valid)          # (E,)
    n_real = x.shape[0] if valid is None else jnp.sum(valid.astype(jnp.float32))
    real = None if valid is None else valid[:, None]
    stats = {
        "aux_loss": moe_lib.load_balance_loss(p, r.experts, valid),
        "z_loss": moe_lib.router_z_loss(logits, valid),
        "dropped": jnp.sum(~keep if real is None else real & ~keep).astype(jnp.int32),
        "assigned": (n_real * spec.top_k) if valid is not None else jnp.asarray(
            x.shape[0] * spec.top_k, jnp.float32),
        "counts": counts,
        "router_entropy": moe_lib._masked_mean(
            -jnp.sum(p * jnp.log(jnp.maximum(p, 1e-30)), axis=-1), valid),
    }
    return r, pos, keep, stats


def _pack(x, experts, pos, keep, n_experts: int, capacity: int):
    """Per-expert buffers (E, C, d) of one group's tokens x (N, d), and each assignment's slot
    (N, k) in the flattened buffer (``E*C`` = dropped)."""
    n, d = x.shape
    slot = jnp.where(keep, experts * capacity + pos, n_experts * capacity)       # (N, k)
    token = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[:, None], slot.shape)
    src = jnp.full((n_experts * capacity + 1,), n, jnp.int32).at[slot.ravel()].set(
        token.ravel())[:-1]                       # slot -> token id (n: empty slot)
    xpad = jnp.concatenate([x, jnp.zeros((1, d), x.dtype)], axis=0)
    return xpad[src].reshape(n_experts, capacity, d), slot


def _unpack(ybuf, slot, weights, keep):
    """Combine: y (N, d) = sum_k w_k * ybuf[slot_k] over kept assignments."""
    e, c, d = ybuf.shape
    yflat = jnp.concatenate([ybuf.reshape(e * c, d), jnp.zeros((1, d), ybuf.dtype)], axis=0)
    w = jnp.where(keep, weights, 0.0)                                             # (N, k)
    return jnp.einsum("nk,nkd->nd", w, yflat[slot].astype(jnp.float32))


def _finish_stats(stats, n_experts: int):
    out = dict(stats)
    out["drop_fraction"] = stats["dropped"].astype(jnp.float32) / jnp.maximum(
        stats.pop("assigned"), 1.0)
    out["load"] = stats["counts"] / jnp.maximum(jnp.sum(stats["counts"]), 1.0)
    out["load_max"] = n_experts * jnp.max(out["load"])
    return out


# statistics summed over groups (counts); the rest are per-group means, averaged over groups
_SUMMED = ("dropped", "assigned", "counts")


def _mean_groups(stats):
    return {k: (jnp.sum(v, axis=0) if k in _SUMMED else jnp.mean(v, axis=0))
            for k, v in stats.items()}


# --------------------------------------------------------------------------------------------
# Strategies. Each: xg (G, N, d) -> (y (G, N, d) float32, stats).


def dense(xg, router_kernel, kernels, spec: MoESpec, capacity: int, valid=None, bias=None):
    """Reference: all experts on all tokens, then each token's kept top-k combined."""
    g, n, d = xg.shape
    r, pos, keep, stats = jax.vmap(
        lambda x, v: _route_group(x, router_kernel, spec, capacity, v, bias))(xg, valid)
    xa = jnp.broadcast_to(xg.astype(spec.dtype).reshape(1, g * n, d), (spec.n_experts, g * n, d))
    ya = moe_lib.expert_ffn(xa, kernels, spec.kind).reshape(spec.n_experts, g, n, d)
    picked = jnp.take_along_axis(ya.transpose(1, 2, 0, 3), r.experts[..., None], axis=2)
    w = jnp.where(keep, r.weights, 0.0)                                           # (G, N, k)
    y = jnp.einsum("gnk,gnkd->gnd", w, picked.astype(jnp.float32))
    return y, _mean_groups(stats)


def implicit(xg, router_kernel, kernels, spec: MoESpec, capacity: int, tok: tuple[str, ...],
             valid=None, bias=None):
    """Buffers in the global view; only sharding constraints (XLA inserts the collectives)."""
    e = spec.n_experts
    rest = tuple(a for a in tok if a != EXPERT_AXIS)
    by_group = P(tok or None)
    by_expert = P(rest or None, EXPERT_AXIS)
    xg = jax.lax.with_sharding_constraint(xg, by_group)

    def pack(x, v):
        r, pos, keep, stats = _route_group(x, router_kernel, spec, capacity, v, bias)
        buf, slot = _pack(x.astype(spec.dtype), r.experts, pos, keep, e, capacity)
        return buf, slot, r.weights, keep, stats

    buf, slot, w, keep, stats = jax.vmap(pack)(xg, valid)                             # (G, E, C, d)
    buf = jax.lax.with_sharding_constraint(buf, by_group)
    buf = jax.lax.with_sharding_constraint(buf, by_expert)        # XLA: all-to-all (dispatch)
    ybuf = moe_lib.expert_ffn(buf, kernels, spec.kind)
    ybuf = jax.lax.with_sharding_constraint(ybuf, by_expert)
    ybuf = jax.lax.with_sharding_constraint(ybuf, by_group)       # XLA: all-to-all (combine)
    y = jax.vmap(_unpack)(ybuf, slot, w, keep)
    return y, _mean_groups(stats)


def all_to_all(xg, router_kernel, kernels, spec: MoESpec, capacity: int, tok: tuple[str, ...],
               mesh, valid=None, bias=None):
    """Explicit expert parallelism: ``jax.shard_map`` + two ``jax.lax.all_to_all`` per layer."""
    e = spec.n_experts
    ep = mesh.shape[EXPERT_AXIS] if EXPERT_AXIS in mesh.axis_names else 1
    if e % ep:
        raise ValueError(f"moe.n_experts={e} is not divisible by mesh.expert={ep}")
    e_local = e // ep
    kspecs = {k: P(EXPERT_AXIS) for k in kernels}

    def local(x, v, wr, b, ks):                 # x (1, N, d): this device's group
        x = x[0]
        n, d = x.shape
        r, pos, keep, stats = _route_group(x, wr, spec, capacity, v[0], b)
        buf, slot = _pack(x.astype(spec.dtype), r.experts, pos, keep, e, capacity)  # (E, C, d)
        # send expert block j to expert-rank j; receive (ep sources x E_local, C, d)
        buf = jax.lax.all_to_all(buf, EXPERT_AXIS, 0, 0, tiled=True)
        buf = buf.reshape(ep, e_local, capacity, d).transpose(1, 0, 2, 3).reshape(
            e_local, ep * capacity, d)
        ybuf = moe_lib.expert_ffn(buf, ks, spec.kind)                          # local experts
        ybuf = ybuf.reshape(e_local, ep, capacity, d).transpose(1, 0, 2, 3).reshape(
            e, capacity, d)
        ybuf = jax.lax.all_to_all(ybuf, EXPERT_AXIS, 0, 0, tiled=True)        # back home
        y = _unpack(ybuf, slot, r.weights, keep)
        stats = {k: (jax.lax.psum(s, tok) if k in _SUMMED else jax.lax.pmean(s, tok))
                 for k, s in stats.items()}
        return y[None], stats

    stat_specs = {k: P() for k in ("aux_loss", "z_loss", "dropped", "assigned", "counts",
                                   "router_entropy")}
    fn = jax.shard_map(local, mesh=mesh, in_specs=(P(tok), P(tok), P(), P(), kspecs),
                       out_specs=(P(tok), stat_specs))
    return fn(xg, valid, router_kernel, bias, kernels)


def moe_layer(x, router_kernel, kernels, spec: MoESpec, *, strategy: str = "dense",
              groups: Optional[int] = None, token_mask=None, router_bias=None):
    """x (B, T, d) -> (y (B, T, d) in ``spec.dtype``, stats). ``stats``: ``aux_loss``,
    ``z_loss`` (unweighted, mean over groups), ``dropped`` (int32 count of dropped assignments),
    ``drop_fraction``, ``counts`` (E,) float32 assignments per expert (the load, before drops),
    ``load`` (E,) assignment fractions, ``load_max``, ``router_entropy``.

    ``token_mask`` (B, T) bool/0-1: padding (False) is not routed (no slot, output 0) and counts
    in no statistic. A batch that does not split into the ``G`` token shards (generation with
    batch 1, say) is completed with such padding rows (the training batch rule makes the batch a
    multiple of ``G``, :func:`tfm_jax.config.check_runtime`). ``router_bias`` (E,): the sigmoid router's balancing bias (selection only).

    ``groups``: routing groups for ``dense`` (default: the mesh's token shards, as the other
    strategies use; tests pass it to compare with a layout-free reference)."""
    b, t, d = x.shape
    if strategy == "ragged":
        raise ValueError("moe.dispatch=ragged (dropless jax.lax.ragged_all_to_all) is not "
                         "implemented in this version; use moe.dispatch=all_to_all, implicit or "
                         "dense")
    if strategy not in STRATEGIES:
        raise ValueError(f"moe.dispatch={strategy!r}; valid: {', '.join(STRATEGIES)}")
    mesh = _mesh()
    tok = token_axes(mesh)
    g = groups if groups is not None else n_groups(mesh)
    if strategy != "dense" and mesh is None:
        raise ValueError(f"moe.dispatch={strategy} needs a device mesh (jax.set_mesh); use "
                         "moe.dispatch=dense without one")
    if strategy != "dense" and g != n_groups(mesh):
        raise ValueError("groups= is only for the dense reference")
    pad = (-b) % g
    if pad:   # e.g. generation with batch 1 on 8 token shards: rows that are not routed
        mask = jnp.ones((b, t), bool) if token_mask is None else token_mask.astype(bool)
        token_mask = jnp.concatenate([mask, jnp.zeros((pad, t), bool)], axis=0)
        x = jnp.concatenate([x, jnp.zeros((pad, t, d), x.dtype)], axis=0)
    n = ((b + pad) // g) * t
    capacity = moe_lib.expert_capacity(n, spec.n_experts, spec.top_k, spec.capacity_factor)
    if (router_bias is not None) != (spec.router == "sigmoid"):
        raise ValueError(f"router={spec.router!r}: the balancing bias is for (and required by) "
                         "the sigmoid router")
    xg = x.reshape(g, n, d)
    valid = (jnp.ones((g, n), bool) if token_mask is None
             else token_mask.astype(bool).reshape(g, n))
    if router_bias is None:   # (shard_map needs an array; route() ignores it for softmax)
        router_bias = jnp.zeros((spec.n_experts,), jnp.float32)
    if strategy == "dense":
        y, stats = dense(xg, router_kernel, kernels, spec, capacity, valid, router_bias)
    elif strategy == "implicit":
        y, stats = implicit(xg, router_kernel, kernels, spec, capacity, tok, valid, router_bias)
    else:
        y, stats = all_to_all(xg, router_kernel, kernels, spec, capacity, tok, mesh, valid,
                              router_bias)
    stats = _finish_stats(stats, spec.n_experts)
    return y.reshape(b + pad, t, d)[:b].astype(spec.dtype), stats
