"""Memory accounting of a training run: persistent train-state bytes and the compiled step's peak.

* :func:`state_bytes`: bytes of the persistent train state, from the pytree (works on abstract
  ``jax.ShapeDtypeStruct`` trees: nothing is allocated), split into

  - ``params``: the parameters the model computes with, by dtype (``params_by_dtype``: an
    FP8-stored kernel counts 1 byte per value, a float32 one 4);
  - ``fp8_state``: quantization state in the params tree -- the FP8 dot's scales and amax
    histories (role ``quant``) and the FP8 kernels' storage scales (role ``storage``);
  - ``opt_moments`` / ``opt_moment_scales``: the optimizer's moments and, for 8-bit moments,
    their per-block scales; ``opt_other``: step counts;
  - ``model_state`` (e.g. BatchNorm statistics), ``step``; and ``total``.

* :func:`peak_memory`: the compiled train step's ``memory_analysis()`` (per device: the SPMD
  program each device runs): arguments, outputs, aliased (donated) bytes, temporaries, and
  ``peak_estimate = arguments + outputs - aliased + temporaries`` (what XLA allocates at once at
  most, code excluded). Compiling is real work (seconds for the tiny model).

:func:`tfm_jax.tools.memory.report` gives both for a config (``tfm-jax config show --memory``); the loop
logs :func:`summary_line` at the start of a run.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np


def _nbytes(x: Any) -> int:
    return int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize


def state_bytes(state: Any) -> dict[str, Any]:
    """Bytes of a :class:`tfm_jax.train.TrainState` (concrete or abstract), by part (module
    doc). ``params_by_dtype`` maps dtype names to bytes of the non-state parameters."""
    import jax

    from tfm_jax.core import roles as param_roles
    from tfm_jax.quant import optim

    by_dtype: dict[str, int] = {}
    params = fp8_state = 0
    for path, x in jax.tree_util.tree_flatten_with_path(state.params)[0]:
        role = param_roles.param_role(path)
        if role in ("quant", "storage"):
            fp8_state += _nbytes(x)
        else:
            params += _nbytes(x)
            name = np.dtype(x.dtype).name
            by_dtype[name] = by_dtype.get(name, 0) + _nbytes(x)
    kinds = optim.state_leaves_by_kind(state.opt_state)
    out = {
        "params": params,
        "params_by_dtype": dict(sorted(by_dtype.items())),
        "fp8_state": fp8_state,
        "opt_moments": sum(_nbytes(x) for x in kinds["moments"]),
        "opt_moment_scales": sum(_nbytes(x) for x in kinds["moment_scales"]),
        "opt_other": sum(_nbytes(x) for x in kinds["other"]),
        "model_state": sum(_nbytes(x) for x in jax.tree.leaves(state.model_state)),
        "step": _nbytes(state.step),
    }
    out["total"] = sum(v for k, v in out.items() if k != "params_by_dtype")
    return out


def _batch_struct(setup: Any) -> dict:
    return setup.abstract_batch()


def peak_memory(setup: Any, abstract_state: Optional[Any] = None) -> dict[str, Optional[int]]:
    """The compiled train step's memory analysis, per device (module doc); values are None
    where the backend reports nothing."""
    state = setup.abstract_state() if abstract_state is None else abstract_state
    with setup.context():
        compiled = setup.train_step.lower(state, _batch_struct(setup)).compile()
    stats = compiled.memory_analysis()
    if stats is None:
        return {"peak_estimate": None}
    get = lambda name: getattr(stats, name, None)  # noqa: E731
    out = {"arguments": get("argument_size_in_bytes"), "outputs": get("output_size_in_bytes"),
           "aliased": get("alias_size_in_bytes"), "temporaries": get("temp_size_in_bytes"),
           "code": get("generated_code_size_in_bytes")}
    parts = [out[k] for k in ("arguments", "outputs", "aliased", "temporaries")]
    out["peak_estimate"] = (None if any(p is None for p in parts)
                            else parts[0] + parts[1] - parts[2] + parts[3])
    return out


def _mib(n: Optional[int]) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.2f} MiB"


def summary_line(state_b: dict[str, Any], peak: Optional[dict] = None) -> str:
    """One line for the run log."""
    dt = ", ".join(f"{k} {_mib(v)}" for k, v in state_b["params_by_dtype"].items())
    line = (f"memory: train state {_mib(state_b['total'])} = params {_mib(state_b['params'])} "
            f"({dt}) + fp8 state {_mib(state_b['fp8_state'])} + optimizer moments "
            f"{_mib(state_b['opt_moments'] + state_b['opt_moment_scales'])}")
    if peak is not None:
        line += f"; compiled step peak {_mib(peak.get('peak_estimate'))} per device"
    return line


def available_bytes(devices: list) -> tuple[Optional[int], str]:
    """(bytes a run on ``devices`` can still allocate, where the figure comes from), or (None,
    why not known). Accelerators: the smallest ``bytes_limit - bytes_in_use`` over the devices
    (per device). CPU (all devices share the host): the smallest of /proc/meminfo's
    MemAvailable, the cgroup's ``memory.max - memory.current`` and the address-space limit
    (``ulimit -v``) minus this process's size."""
    if devices and devices[0].platform != "cpu":
        free = []
        for d in devices:
            stats = d.memory_stats() if hasattr(d, "memory_stats") else None
            if not stats or "bytes_limit" not in stats:
                return None, f"{d.platform} devices report no memory limit"
            free.append(int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)))
        return min(free), f"free memory of the smallest {devices[0].device_kind} device"
    found: list[tuple[int, str]] = []
    meminfo = _read_kib("/proc/meminfo", "MemAvailable:")
    if meminfo is not None:
        found.append((meminfo, "MemAvailable"))
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        used = int(open("/sys/fs/cgroup/memory.current").read().strip())
        if limit != "max":
            found.append((int(limit) - used, "the cgroup's memory.max"))
    except (OSError, ValueError):
        pass
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        vm = _read_kib("/proc/self/status", "VmSize:")
        if soft != resource.RLIM_INFINITY and vm is not None:
            found.append((soft - vm, "the address-space limit (ulimit -v)"))
    except (ImportError, OSError, ValueError):
        pass
    if not found:
        return None, "no memory figure on this system"
    return min(found)


def _read_kib(path: str, field: str) -> Optional[int]:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_fits(setup: Any, abstract_state: Any = None) -> Optional[str]:
    """A one-line reason when the compiled train step of ``setup`` will not fit in the
    available memory (:func:`available_bytes`), else None. Compiles the step (the run's own
    compilation is then reused). On CPU this process's devices share the host, so the
    per-device peak counts once per local device."""
    import jax

    # this process's share: the devices of the mesh that live on this host
    devices = [d for d in setup.mesh.devices.flat if d.process_index == jax.process_index()]
    need = peak_memory(setup, abstract_state).get("peak_estimate")
    have, source = available_bytes(devices)
    if need is None or have is None:
        return None
    shared = devices[0].platform == "cpu"
    total = need * (len(devices) if shared else 1)
    if total <= have:
        return None
    per = f" ({len(devices)} devices x {_mib(need)})" if shared and len(devices) > 1 else ""
    return (f"the compiled train step needs about {_mib(total)}{per} "
            f"{'in all' if shared else 'per device'}, but {_mib(max(have, 0))} is available "
            f"({source}); lower train.batch_size or data.seq_len, raise train.grad_accum, or "
            f"set train.memory_check=false to start anyway")
