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


def _flat_axes(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


@dataclasses.dataclass(frozen=True)
class _Layout:
    """How ``shard_map`` sees the MoE weights, derived from the active logical-axis rules.

    ``specs``: each weight's PartitionSpec as the rules store it (so entering the ``shard_map``
    moves nothing). Inside, ``gathers`` lists per weight ``(dim, mesh axes)`` to all-gather --
    the ``embed`` dimension (FSDP: gathered for the compute, its gradient reduce-scattered) and an
    ``mlp`` dimension sharded over axes the tokens are also sharded over. ``partial``: mesh axes
    the ``mlp`` dimension stays sharded over (tensor parallelism inside each expert: every rank
    computes its slice of the hidden width, and the combined output is summed over them once)."""

    specs: dict
    gathers: dict
    partial: tuple[str, ...]


def _layout(kernels, tok: tuple[str, ...], mesh) -> _Layout:
    live = {a for a in mesh.axis_names if mesh.shape[a] > 1}
    specs, gathers, partial = {}, {}, set()
    names = dict(kernels)
    names["router"] = None
    for name in names:
        logical = (axes.EMBED, None) if name == "router" else moe_lib.kernel_axes(name)
        spec = tuple(_flat_axes(e) for e in nn.logical_to_mesh_axes(logical))
        spec = spec + ((),) * (len(logical) - len(spec))
        gather = []
        for dim, (lname, mesh_axes) in enumerate(zip(logical, spec)):
            used = tuple(a for a in mesh_axes if a in live)
            if lname == axes.EXPERT:
                want = (EXPERT_AXIS,) if EXPERT_AXIS in live else ()
                if used != want:
                    raise ValueError(f"the rules map the logical axis '{axes.EXPERT}' to mesh "
                                     f"axes {used or 'none'}; with mesh.expert="
                                     f"{mesh.shape.get(EXPERT_AXIS, 1)} the MoE dispatch needs "
                                     f"{want or 'none'} (mesh.rules)")
            elif lname == axes.MLP and used and not set(used) & set(tok):
                partial.update(used)
            elif used:
                gather.append((dim, used))
        live_spec = [tuple(a for a in m if a in live) for m in spec]   # size-1 axes: replicated
        specs[name] = P(*[(m if len(m) != 1 else m[0]) if m else None for m in live_spec])
        gathers[name] = tuple(gather)
    return _Layout(specs, gathers, tuple(a for a in mesh.axis_names if a in partial))


def _gather(w, gathers):
    for dim, mesh_axes in gathers:
        w = jax.lax.all_gather(w, mesh_axes if len(mesh_axes) > 1 else mesh_axes[0], axis=dim,
                               tiled=True)
    return w


def _expert_shards(mesh, n_experts: int, strategy: str):
    ep = mesh.shape[EXPERT_AXIS] if EXPERT_AXIS in mesh.axis_names else 1
    if n_experts % ep:
        raise ValueError(f"moe.n_experts={n_experts} is not divisible by mesh.expert={ep}")
    return ep, n_experts // ep


def _sharded(local, xg, valid, router_kernel, bias, kernels, tok, mesh, layout):
    """Run ``local(x (N, d), valid (N,), w_router, bias, kernels) -> (y (N, d), stats)`` on
    every device's token group, weights laid out as the rules store them and gathered inside;
    statistics summed/averaged over the groups, partial outputs summed over ``layout.partial``."""

    def body(x, v, wr, b, ks):
        wr = _gather(wr, layout.gathers["router"])
        ks = {n: _gather(k, layout.gathers[n]) for n, k in ks.items()}
        y, stats = local(x[0], v[0], wr, b, ks)
        if layout.partial:
            y = jax.lax.psum(y, layout.partial)
        stats = {k: (jax.lax.psum(s, tok) if k in _SUMMED else jax.lax.pmean(s, tok))
                 for k, s in stats.items()}
        return y[None], stats

    stat_specs = {k: P() for k in ("aux_loss", "z_loss", "dropped", "assigned", "counts",
                                   "router_entropy")}
    kspecs = {n: layout.specs[n] for n in kernels}
    fn = jax.shard_map(body, mesh=mesh,
                       in_specs=(P(tok), P(tok), layout.specs["router"], P(), kspecs),
                       out_specs=(P(tok), stat_specs))
    return fn(xg, valid, router_kernel, bias, kernels)


def all_to_all(xg, router_kernel, kernels, spec: MoESpec, capacity: int, tok: tuple[str, ...],
               mesh, valid=None, bias=None):
    """Explicit expert parallelism: ``jax.shard_map`` + two ``jax.lax.all_to_all`` per layer.
    The weights keep the layout the rules give them (:class:`_Layout`)."""
    e = spec.n_experts
    ep, e_local = _expert_shards(mesh, e, "all_to_all")

    def local(x, v, wr, b, ks):                 # x (N, d): this device's group
        n, d = x.shape
        r, pos, keep, stats = _route_group(x, wr, spec, capacity, v, b)
        buf, slot = _pack(x.astype(spec.dtype), r.experts, pos, keep, e, capacity)  # (E, C, d)
        # send expert block j to expert-rank j; receive (ep sources x E_local, C, d)
        buf = jax.lax.all_to_all(buf, EXPERT_AXIS, 0, 0, tiled=True)
        buf = buf.reshape(ep, e_local, capacity, d).transpose(1, 0, 2, 3).reshape(
            e_local, ep * capacity, d)
        ybuf = moe_lib.expert_ffn(buf, ks, spec.kind)                          # local experts
        ybuf = ybuf.reshape(e_local, ep, capacity, d).transpose(1, 0, 2, 3).reshape(
            e, capacity, d)
        ybuf = jax.lax.all_to_all(ybuf, EXPERT_AXIS, 0, 0, tiled=True)        # back home
        return _unpack(ybuf, slot, r.weights, keep), stats

    return _sharded(local, xg, valid, router_kernel, bias, kernels, tok, mesh,
                    _layout(kernels, tok, mesh))


# --------------------------------------------------------------------------------------------
# Dropless: grouped GEMMs over the tokens sorted by expert (jax.lax.ragged_dot).


def _ragged_ffn(x, kernels, sizes, kind: str):
    """x (M, d) rows grouped by expert (``sizes`` (E,) rows each, in expert order; rows past
    their sum are padding) -> (M, d); padding rows come out 0."""
    dot = lambda a, w: jax.lax.ragged_dot(a, w.astype(a.dtype), sizes)  # noqa: E731
    if kind == "swiglu":
        from tfm_jax.layers.ffn import swiglu
        h = swiglu(dot(x, kernels["wi_0"]), dot(x, kernels["wi_1"]))
    else:
        from tfm_jax.layers.ffn import ACTIVATIONS
        h = ACTIVATIONS[kind](dot(x, kernels["wi"]))
    y = dot(h, kernels["wo"])
    real = jnp.arange(x.shape[0]) < jnp.sum(sizes)
    return jnp.where(real[:, None], y, jnp.zeros((), y.dtype))


def _ragged_all_to_all(operand, output, in_off, send, out_off, recv):
    """``jax.lax.ragged_all_to_all`` over ``mesh.expert``. XLA:CPU does not implement it, so
    there (tests) the same semantics come from all-gathers: every rank sees every operand and
    places the rows sent to it (O(ep) memory; for checking the offsets, not for speed)."""
    if jax.default_backend() != "cpu":
        return jax.lax.ragged_all_to_all(operand, output, in_off, send, out_off, recv,
                                         axis_name=EXPERT_AXIS)
    del recv
    me = jax.lax.axis_index(EXPERT_AXIS)
    ops = jax.lax.all_gather(operand, EXPERT_AXIS)                          # (ep, R, d)
    io, ss, oo = (jax.lax.all_gather(a, EXPERT_AXIS)[:, me] for a in (in_off, send, out_off))
    i = jnp.arange(operand.shape[0])
    rows = jax.vmap(lambda o, off: o[jnp.clip(off + i, 0, operand.shape[0] - 1)])(ops, io)
    dst = jnp.where(i[None, :] < ss[:, None], oo[:, None] + i[None, :], output.shape[0])
    return output.at[dst.reshape(-1)].set(rows.reshape(-1, operand.shape[1]), mode="drop")


# how rows travel between expert ranks: "auto" (ragged_all_to_all where the backend has it,
# else padded all_to_all buffers), "padded" or "ragged" (tests set it)
EXCHANGE = "auto"


def _exchange_ragged(xs, e_sorted, sizes, ks, spec: MoESpec, ep: int, e_local: int):
    """Expert parallelism without capacity: each device's assignment rows ``xs`` (M, d), sorted
    by expert (``e_sorted`` (M,), ``E`` for padding; ``sizes`` (E,)), go to the rank owning their
    expert and come back computed. On GPU/TPU ``jax.lax.ragged_all_to_all`` moves only the real
    rows; on CPU one ``all_to_all`` of (ep, M, d) buffers (M: every row could go to one rank).
    The received rows are regrouped by local expert for :func:`_ragged_ffn`."""
    m, d = xs.shape
    ragged = EXCHANGE == "ragged" or (EXCHANGE == "auto" and jax.default_backend() != "cpu")
    per_rank = sizes.reshape(ep, e_local)
    count = jnp.sum(per_rank, axis=1)                                       # rows to each rank
    start = jnp.cumsum(count) - count
    i = jnp.arange(m)
    rsizes = jax.lax.all_to_all(per_rank, EXPERT_AXIS, 0, 0, tiled=True)     # (ep src, E_l)
    if ragged:
        c = jax.lax.all_gather(count, EXPERT_AXIS)                          # (src, dst) rows
        me = jax.lax.axis_index(EXPERT_AXIS)
        got = c[:, me]                                                      # from each source
        flat = _ragged_all_to_all(xs, jnp.zeros((ep * m, d), xs.dtype), start, count,
                                  (jnp.cumsum(c, axis=0) - c)[me], got)
        recv = flat[jnp.clip((jnp.cumsum(got) - got)[:, None] + i[None, :], 0, ep * m - 1)]
    else:
        src = jnp.clip(start[:, None] + i[None, :], 0, m - 1)               # (ep, M)
        buf = jnp.where((i[None, :] < count[:, None])[..., None], xs[src],
                        jnp.zeros((), xs.dtype))                            # (ep, M, d)
        recv = jax.lax.all_to_all(buf, EXPERT_AXIS, 0, 0, tiled=True)       # (ep src, M, d)
    # received row (s, i) belongs to local expert j; place it expert-major, source-minor
    cum = jnp.cumsum(rsizes, axis=1)                                        # (ep, E_l)
    j = jax.vmap(lambda c: jnp.searchsorted(c, i, side="right"))(cum)       # (ep, M)
    ok = j < e_local
    jj = jnp.minimum(j, e_local - 1)
    total = jnp.sum(rsizes, axis=0)                                         # (E_l,)
    expert_off = jnp.cumsum(total) - total
    src_off = jnp.cumsum(rsizes, axis=0) - rsizes                           # (ep, E_l)
    within = i[None, :] - (jnp.take_along_axis(cum, jj, 1) - jnp.take_along_axis(rsizes, jj, 1))
    pos = expert_off[jj] + jnp.take_along_axis(src_off, jj, 1) + within
    spare = jnp.cumsum(~ok).reshape(ep, m) - 1 + jnp.sum(total)             # padding at the end
    pos = jnp.where(ok, pos, spare).reshape(-1)
    xr = jnp.zeros((ep * m, d), xs.dtype).at[pos].set(recv.reshape(ep * m, d),
                                                     unique_indices=True)
    yr = _ragged_ffn(xr, ks, total, spec.kind)[pos]                          # (src, i) order
    if ragged:   # back to each source, straight into its sorted order
        back = (jnp.cumsum(c, axis=1) - c)[:, me]                           # where, at source s
        return _ragged_all_to_all(yr, jnp.zeros((m, d), yr.dtype), jnp.arange(ep) * m,
                                  jnp.sum(rsizes, axis=1), back, count)
    yback = jax.lax.all_to_all(yr.reshape(ep, m, d), EXPERT_AXIS, 0, 0, tiled=True)
    # sorted row p went to rank e_sorted[p] // E_l as that rank's row p - start[rank]
    rank = jnp.minimum(e_sorted // e_local, ep - 1)
    out = yback[rank, jnp.clip(i - start[rank], 0, m - 1)]
    return jnp.where((e_sorted < spec.n_experts)[:, None], out, jnp.zeros((), out.dtype))


def _ragged_group(x, v, wr, b, ks, spec: MoESpec, ep: int, e_local: int):
    """One group, dropless: route, sort the (token, choice) assignments by expert, grouped
    GEMMs (local, or across the expert ranks), unsort and combine."""
    n, d = x.shape
    k, e = spec.top_k, spec.n_experts
    r, _, keep, stats = _route_group(x, wr, spec, n, v, b)     # capacity N: nothing dropped
    flat = jnp.where(keep, r.experts, e).reshape(-1)            # (N*k,) padding -> E (last)
    order = jnp.argsort(flat, stable=True)
    e_sorted = flat[order]
    sizes = jnp.bincount(flat, length=e + 1)[:e].astype(jnp.int32)
    xs = x.astype(spec.dtype)[order // k]
    if ep == 1:
        ys = _ragged_ffn(xs, ks, sizes, spec.kind)
    else:
        ys = _exchange_ragged(xs, e_sorted, sizes, ks, spec, ep, e_local)
    y = jnp.zeros_like(ys).at[order].set(ys, unique_indices=True).reshape(n, k, d)
    w = jnp.where(keep, r.weights, 0.0)
    return jnp.einsum("nk,nkd->nd", w, y.astype(jnp.float32)), stats


def ragged(xg, router_kernel, kernels, spec: MoESpec, tok: tuple[str, ...], mesh, valid=None,
           bias=None):
    """Dropless MoE with grouped GEMMs (``jax.lax.ragged_dot``): no capacity, no drops. Without
    a mesh one group on one device; with one, ``shard_map`` like :func:`all_to_all`."""
    if mesh is None:                        # one group (G = 1)
        y, stats = _ragged_group(xg[0], valid[0], router_kernel, bias, kernels, spec, 1,
                                 spec.n_experts)
        return y[None], _mean_groups(jax.tree.map(lambda a: a[None], stats))
    ep, e_local = _expert_shards(mesh, spec.n_experts, "ragged")

    def local(x, v, wr, b, ks):
        return _ragged_group(x, v, wr, b, ks, spec, ep, e_local)

    return _sharded(local, xg, valid, router_kernel, bias, kernels, tok, mesh,
                    _layout(kernels, tok, mesh))


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
    if strategy not in STRATEGIES:
        raise ValueError(f"moe.dispatch={strategy!r}; valid: {', '.join(STRATEGIES)}")
    mesh = _mesh()
    tok = token_axes(mesh)
    g = groups if groups is not None else n_groups(mesh)
    if strategy not in ("dense", "ragged") and mesh is None:
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
    elif strategy == "ragged":
        y, stats = ragged(xg, router_kernel, kernels, spec, tok, mesh, valid, router_bias)
    else:
        y, stats = all_to_all(xg, router_kernel, kernels, spec, capacity, tok, mesh, valid,
                              router_bias)
    stats = _finish_stats(stats, spec.n_experts)
    return y.reshape(b + pad, t, d)[:b].astype(spec.dtype), stats
