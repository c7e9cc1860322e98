"""What the compiler emits for a config's train step: ``tfm-jax inspect``.

Compiles the jitted train step of any config on the available devices (without running it or
touching data) and reports parameters, model FLOPs per token, XLA's compiled memory analysis
and every collective in the optimized HLO -- all-to-all, all-reduce, all-gather,
reduce-scatter, collective-permute -- with its count and bytes. Generic: FSDP / tensor
parallelism show up as much as MoE expert parallelism.

Bytes are per device and per step: the size of each collective's result (for an async
``*-start`` the largest array of its result tuple, i.e. the gathered/received buffer), summed
over the collectives in the program text. A collective inside a loop body (``nn.scan`` over
layers, gradient-accumulation ``lax.scan``) appears once in the text but runs once per
iteration; ``in_loop`` counts those occurrences so the total can be read correctly.
"""

from __future__ import annotations

import re
from typing import Any, Optional

COLLECTIVES = ("all-to-all", "all-reduce", "all-gather", "reduce-scatter", "collective-permute")

# HLO element type -> bytes
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_OP = re.compile(r"=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(-start)?\(")


def _bytes(dtype: str, dims: str) -> int:
    n = 1
    for s in filter(None, dims.split(",")):
        n *= int(s)
    if dtype.startswith("f8") or dtype.startswith("f4"):
        return n            # fp8 formats (f8e4m3fn, ...): one byte
    return n * _DTYPE_BYTES.get(dtype, 4)


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """``{kind: {"count": n, "bytes": b, "in_loop": m}}`` for every collective kind of
    :data:`COLLECTIVES` in optimized HLO text (kinds that do not occur have count 0)."""
    out = {k: {"count": 0, "bytes": 0, "in_loop": 0} for k in COLLECTIVES}
    loop_bodies = set(re.findall(r"\bbody=%?([\w.\-]+)", hlo_text))
    computation = None
    for line in hlo_text.splitlines():
        head = re.match(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if head and "=" not in line.split("{")[0]:
            computation = head.group(1)
        m = _OP.search(line)
        if not m or "-done(" in line:
            continue
        result_type, kind, start = m.group(1), m.group(2), m.group(3)
        sizes = [_bytes(t, d) for t, d in _SHAPE.findall(result_type)]
        if not sizes:
            continue
        rec = out[kind]
        rec["count"] += 1
        rec["bytes"] += max(sizes) if start else sum(sizes)
        rec["in_loop"] += computation in loop_bodies
    return out


def _memory(compiled) -> dict[str, Optional[int]]:
    try:
        mem = compiled.memory_analysis()
    except Exception:       # noqa: BLE001 -- not every backend implements it
        mem = None
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "temp_size_in_bytes", "generated_code_size_in_bytes")
    return {k.removesuffix("_size_in_bytes") + "_bytes": (int(getattr(mem, k)) if mem is not None
                                                          and hasattr(mem, k) else None)
            for k in keys}


def inspect_train_step(cfg, devices: Optional[list] = None) -> dict[str, Any]:
    """Compile ``cfg``'s train step (:func:`tfm_jax.train.build`) and report on it."""

    from tfm_jax.platform import backends
    from tfm_jax import train as train_lib
    from tfm_jax.model import count_params, train_flops_per_token

    backends.configure(cfg.backend)
    setup = train_lib.build(cfg, devices)
    state = setup.abstract_state()
    with setup.context():
        compiled = setup.train_step.lower(state, setup.abstract_batch()).compile()
    text = compiled.as_text()
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        xla_flops = float(cost.get("flops")) if cost and "flops" in cost else None
    except Exception:       # noqa: BLE001
        xla_flops = None
    tokens = cfg.train.batch_size * cfg.data.seq_len
    return {
        "config": cfg.run.name,
        "mesh": {k: int(v) for k, v in setup.mesh.shape.items()},
        "devices": len(setup.mesh.devices.flat),
        "platform": setup.mesh.devices.flat[0].platform,
        "params": count_params(cfg.model, cfg.moe),
        "tokens_per_step": tokens,
        "flops_per_token": train_flops_per_token(cfg.model, cfg.data.seq_len, cfg.moe),
        "xla_flops_per_device_per_step": xla_flops,
        "memory": _memory(compiled),
        "collectives": collectives(text),
    }


def format_report(rep: dict[str, Any]) -> str:
    """The human-readable form of :func:`inspect_train_step`'s report."""
    p = rep["params"]
    lines = [f"config {rep['config']} | {rep['devices']} {rep['platform']} device(s), mesh "
             f"{rep['mesh']}",
             f"parameters: {p['total']:,} total" + (f", {p['active']:,} active per token"
                                                     if "active" in p else ""),
             f"train FLOPs/token (model): {rep['flops_per_token']:,.0f}; tokens/step "
             f"{rep['tokens_per_step']:,}"]
    if rep["xla_flops_per_device_per_step"] is not None:
        lines.append(f"XLA cost analysis: {rep['xla_flops_per_device_per_step']:,.0f} FLOPs per "
                     "device per step")
    mem = {k: v for k, v in rep["memory"].items() if v is not None}
    if mem:
        lines.append("compiled memory per device: " + ", ".join(
            f"{k.removesuffix('_bytes')} {v / 2**20:,.2f} MiB" for k, v in mem.items()))
    lines.append(f"{'collective':<20}{'count':>7}{'bytes/step':>16}{'in loop':>9}")
    for kind, c in rep["collectives"].items():
        lines.append(f"{kind:<20}{c['count']:>7}{c['bytes']:>16,}{c['in_loop']:>9}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# dot dtypes of a step lowered with another platform's op set (mixed-precision checks on CPU)

_DOT = re.compile(r"stablehlo\.dot_general\b.*?:\s*\(tensor<([^>]*)>,\s*tensor<([^>]*)>\)\s*->"
                  r"\s*tensor<([^>]*)>")


class _PlatformDevice:
    """Stands for a device of ``platform`` when choosing an ops set (nothing runs on it)."""

    def __init__(self, platform: str):
        self.platform = platform


def lower_step(cfg, platform: str = "gpu", which: str = "train") -> str:
    """StableHLO text of ``cfg``'s train (or eval) step built with the op set a run on
    ``platform`` gets (:func:`tfm_jax.platform.backends.resolve_ops`), lowered from shapes
    only on one local device: what XLA receives on that platform before its own passes."""
    import jax

    from tfm_jax.platform import backends
    from tfm_jax import train as train_lib

    ops = backends.resolve_ops(cfg, [_PlatformDevice(platform)])
    setup = train_lib.build(cfg, jax.devices()[:1], ops=ops)
    batch = setup.abstract_batch()
    if which != "train":     # the eval step takes the plain (inputs, targets, mask) batch
        batch = {k: batch[k] for k in ("inputs", "targets", "mask")}
    state = setup.abstract_state()
    step, state = ((setup.train_step, state) if which == "train"
                   else (setup.eval_step, setup.eval_state(state)))   # eval: no optimizer
    with setup.context():
        return step.lower(state, batch).as_text()


_ALGO = re.compile(r"lhs_precision_type\s*=\s*(\w+),\s*rhs_precision_type\s*=\s*(\w+)")


def dot_dtypes(stablehlo_text: str) -> list[tuple[str, str, str]]:
    """(lhs, rhs, result) element types of every ``dot_general`` in a lowered program, as the
    GEMM runs them: a dot with an ``algorithm`` (e.g. ``jax.nn.dot_product_attention``'s
    BF16_BF16_F32) rounds its operands to the algorithm's precision types first, so those count."""
    out = []
    for m in _DOT.finditer(stablehlo_text):
        lhs, rhs, res = (t.rsplit("x", 1)[-1] for t in m.groups())
        algo = _ALGO.search(m.group(0))
        if algo:
            lhs, rhs = algo.groups()
        out.append((lhs, rhs, res))
    return out
