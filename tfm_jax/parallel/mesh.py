"""Device mesh from config, and the one resolver from logical axes to shardings."""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tfm_jax.config import MESH_AXES, ConfigError, MeshConfig
from tfm_jax.parallel import axes

Rules = Sequence[tuple[str, Any]]


def make_mesh(mesh_cfg: MeshConfig, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A mesh with axes ``(data, fsdp, tensor, expert)`` of Auto axis type over ``devices``.

    Auto axes let Linen's logical constraints and XLA's sharding propagation decide collectives
    (jax >= 0.7 defaults ``jax.make_mesh`` to Explicit axes, which Linen does not support).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_cfg.resolved_sizes(len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    if len(devices) == jax.device_count() and jax.process_count() == 1:
        dev_array = jax.make_mesh(shape, MESH_AXES, devices=devices,
                                  axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES)
                                  ).devices
    else:
        dev_array = np.asarray(devices).reshape(shape)
    return Mesh(dev_array, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def rules_tuple(rules: Rules) -> tuple[tuple[str, Any], ...]:
    """Config rules (lists from YAML) as the tuple form flax expects."""
    out = []
    for logical, mesh_axes in rules:
        if isinstance(mesh_axes, list):
            mesh_axes = tuple(mesh_axes)
        out.append((logical, mesh_axes))
    return tuple(out)


def used_logical_names(logical_specs: Any) -> set[str]:
    names: set[str] = set()
    for spec in jax.tree.leaves(logical_specs, is_leaf=lambda x: isinstance(x, P)):
        if isinstance(spec, P):
            for entry in spec:
                if entry is None:
                    continue
                names.update([entry] if isinstance(entry, str) else entry)
    return names


def check_rules_cover(logical_specs: Any, rules: Rules) -> None:
    """Every logical name used by the model must have a rule (possibly mapping to None)."""
    have = {logical for logical, _ in rules}
    missing = sorted(used_logical_names(logical_specs) - have)
    if missing:
        raise ConfigError(
            f"mesh.rules: no rule for logical axis {missing} used by the model; add e.g. "
            f"['{missing[0]}', null] to mesh.rules (known names: {', '.join(axes.ALL)})")


def logical_to_sharding(logical_specs: Any, mesh: Mesh, rules: Rules) -> Any:
    """Tree of logical PartitionSpecs -> tree of NamedShardings via the rule table."""
    return nn.logical_to_mesh_sharding(logical_specs, mesh, rules_tuple(rules))


def check_divisible(abstract_tree: Any, shardings: Any) -> None:
    """Every sharded dimension must divide evenly; name the parameter otherwise."""
    flat, _ = jax.tree_util.tree_flatten_with_path(abstract_tree)
    flat_s = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for (path, leaf), sh in zip(flat, flat_s):
        for dim, entry in zip(leaf.shape, sh.spec):
            if entry is None:
                continue
            names = (entry,) if isinstance(entry, str) else entry
            n = math.prod(sh.mesh.shape[a] for a in names)
            if dim % n:
                raise ConfigError(
                    f"{jax.tree_util.keystr(path)}: dimension {dim} cannot be split over mesh "
                    f"axes {names} of total size {n}; change the mesh sizes or map that logical "
                    "axis to null in mesh.rules")


def data_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Sharding of a (batch, length) token array."""
    spec = nn.logical_to_mesh_axes((axes.BATCH, axes.LENGTH), rules_tuple(rules))
    return NamedSharding(mesh, spec)
