"""Per-layer telemetry: modules sow scalars, the train loop logs whatever was sown.

A module calls :func:`sow` with a name, a value and how micro-batches combine (``max`` or
``mean``); the value lands in the Flax collection ``telemetry_<reduce>`` at the module's path.
The train step collects both collections (:data:`COLLECTIONS`), reduces them over gradient-
accumulation micro-batches as their name says, and the loop writes every leaf to
``metrics.jsonl`` and TensorBoard at log steps under its path, e.g.
``layers_0/attn/q_proj/fp8/input_amax`` (:func:`flatten`). No key is named in the loop: a new
module (MoE load, ...) only sows. When nothing is sown nothing is computed.

This module imports only flax/jax (it sits below the layers).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

REDUCTIONS = ("max", "mean")
# Auxiliary losses (MoE load balancing, router z-loss): sown like telemetry (logged, mean over
# micro-batches) and, in training, added to the loss by the train step (:func:`aux_loss`).
LOSSES = "losses"
COLLECTIONS = tuple(f"telemetry_{r}" for r in REDUCTIONS) + (LOSSES,)


def sow(module, name: str, value: jax.Array, reduce: str = "mean") -> None:
    """Record ``value`` (a float32 scalar, or one per channel) as ``name`` at ``module``'s path.
    ``reduce``: how the train step combines micro-batches (``max`` for amax-like values,
    ``mean`` for fractions and ratios). A module called twice keeps the last value."""
    if reduce not in REDUCTIONS:
        raise ValueError(f"telemetry reduce={reduce!r}; valid: {', '.join(REDUCTIONS)}")
    module.sow(f"telemetry_{reduce}", name, jnp.asarray(value, jnp.float32),
               init_fn=lambda: None, reduce_fn=lambda _, v: v)


def sow_loss(module, name: str, value: jax.Array) -> None:
    """Record an auxiliary loss term (a float32 scalar, already weighted by its coefficient)
    that the train step adds to the training loss; it is logged like telemetry under its path."""
    module.sow(LOSSES, name, jnp.asarray(value, jnp.float32),
               init_fn=lambda: None, reduce_fn=lambda _, v: v)


def aux_loss(sown: dict):
    """Sum of every sown auxiliary loss (scan-stacked ones: over layers); None if none."""
    leaves = jax.tree.leaves(sown.get(LOSSES, {}))
    return sum(jnp.sum(x) for x in leaves) if leaves else None


def split(variables: dict) -> tuple[dict, dict]:
    """``(variables without telemetry, {collection: tree})`` from a ``mutable`` apply result."""
    rest = dict(variables)
    tel = {c: rest.pop(c) for c in COLLECTIONS if c in rest}
    return rest, tel


def reduce_micro(stacked: dict) -> dict:
    """Telemetry stacked over micro-batches (leading axis) -> reduced as each collection says."""
    out = {}
    for col, tree in stacked.items():
        fn = jnp.max if col.endswith("_max") else jnp.mean
        out[col] = jax.tree.map(lambda x: fn(x, axis=0), tree)
    return out


def flatten(telemetry: dict) -> dict[str, float]:
    """Host-side: ``{collection: tree}`` -> ``{"path/name": float}``. A ``nn.scan``-stacked
    leaf (path starting with ``layers``) is split into ``layers_<i>/...`` like an unscanned
    model's; any other non-scalar leaf gets ``/<i>`` per entry."""
    rows: dict[str, float] = {}
    for tree in telemetry.values():
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
            key = jax.tree_util.keystr(path, simple=True, separator="/")
            x = np.asarray(x, np.float64)
            if x.ndim == 0:
                rows[key] = float(x)
                continue
            head, _, tail = key.partition("/")
            for i, v in enumerate(x.reshape(x.shape[0], -1).max(axis=1)):
                rows[f"layers_{i}/{tail}" if head == "layers" else f"{key}/{i}"] = float(v)
    return rows
