"""``tfm-jax config show --memory``: the persistent train state and the compiled step's peak
for a config (builds the step; the byte counting is :mod:`tfm_jax.train.memory`)."""

from __future__ import annotations

from typing import Any, Optional

from tfm_jax import train
from tfm_jax.train.memory import _mib, peak_memory, state_bytes


def report(cfg: Any, *, peak: bool = True, devices: Optional[list] = None) -> dict[str, Any]:
    """State bytes (abstract) and, with ``peak``, the compiled step's peak for ``cfg``."""
    setup = train.build(cfg, devices)
    abstract = setup.abstract_state()
    out: dict[str, Any] = {"state": state_bytes(abstract),
                           "devices": len(setup.mesh.devices.flat)}
    if peak:
        out["peak"] = peak_memory(setup, abstract)
    return out


def format_report(rep: dict[str, Any]) -> str:
    """The ``config show --memory`` text (YAML-comment lines, after the config)."""
    s = rep["state"]
    lines = ["# memory (tfm_jax.train.memory): persistent train state, from the pytree (global bytes)"]
    for k in ("params", "fp8_state", "opt_moments", "opt_moment_scales", "opt_other",
              "model_state", "step", "total"):
        lines.append(f"#   {k:<18} {s[k]:>14,d} B  {_mib(s[k])}")
    for k, v in s["params_by_dtype"].items():
        lines.append(f"#     params {k:<11} {v:>14,d} B")
    if "peak" in rep:
        p = rep["peak"]
        lines.append(f"# compiled train step, per device ({rep['devices']} device(s)): "
                     "peak_estimate = arguments + outputs - aliased + temporaries")
        for k in ("arguments", "outputs", "aliased", "temporaries", "peak_estimate"):
            v = p.get(k)
            lines.append(f"#   {k:<18} {'n/a' if v is None else format(v, ',d'):>14} B  "
                         f"{_mib(v)}")
    return "\n".join(lines)
