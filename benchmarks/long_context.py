"""Long-context attention: time and memory of one causal attention call vs sequence length T.

For each implementation of the causal core (``backend.attention``) and each T, one jitted
forward+backward (gradients of ``sum(out * dO)`` wrt q, k, v) at a fixed model-like shape
(default B=1, H=8, Hkv=2, D=32, fp32, one CPU device):

* time: median of ``--iters`` calls after ``--warmup`` (the first call compiles; compile time
  is reported separately);
* memory: XLA's ``compiled.memory_analysis()``, temp + argument + output bytes of that
  forward+backward program -- what XLA allocates for the call, known before it runs, portable
  across backends. A native custom call's own scratch (the ``native`` core) is not in it.

A configuration whose XLA memory exceeds ``--mem-cap-gb`` is compiled but not run, and the
block-causal core (unrolled over query blocks: its program grows with T) is not built beyond
``--max-unrolled`` query blocks; both are marked in the table. Writes ``long_context.json``,
``long_context.md`` and ``long_context.png`` (time and memory vs T, log-log) to ``--out``.

    python -m benchmarks.long_context --out runs/long_context          # 512 ... 16k, CPU
    python -m benchmarks.long_context --seq 512 1024 --impls flash dense --iters 3
    python -m benchmarks.long_context --quick --out /tmp/lc            # tiny, seconds (smoke)

Like the other benchmarks, ``JAX_PLATFORMS`` defaults to ``cpu`` when this module is imported
before jax, and exactly one device is used even if ``XLA_FLAGS`` fakes several.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import statistics
import sys
import time
from typing import Any, Callable, Optional

os.environ.setdefault("JAX_PLATFORMS", "cpu")   # no effect if jax was already imported
_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.train_throughput import _loadavg, machine_info  # noqa: E402
from tfm_jax.layers.attention_ops import block, dense  # noqa: E402
from tfm_jax.layers.attention_ops import flash

IMPLS = ("dense", "block", "native", "flash", "xla_sdpa")
DESCRIPTIONS = {
    "dense": "dense masked reference (grouped_attention over the full T x T scores)",
    "block": "block-causal XLA core (cpu-xla set; unrolled over query blocks)",
    "native": "native CPU custom call (cpu-native set; block-causal, one call each way)",
    "flash": "flash: key-tiled online softmax, lax loops (tfm_jax.layers.attention_ops.flash)",
    "xla_sdpa": "jax.nn.dot_product_attention(implementation='xla', is_causal=True)",
}
SEQ_LENS = (512, 1024, 2048, 4096, 8192, 16384)
QUICK_SEQ = (16, 40)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq", type=int, nargs="+", default=list(SEQ_LENS), help="sequence lengths")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="q/k/v dtype (the native core is float32 only)")
    p.add_argument("--block-q", type=int, default=64,
                   help="query block of the block-causal and native cores (model.attn_block_q)")
    p.add_argument("--flash-block-q", type=int, default=flash.DEFAULT_BLOCK_Q)
    p.add_argument("--flash-block-k", type=int, default=flash.DEFAULT_BLOCK_K)
    p.add_argument("--iters", type=int, default=5, help="timed calls per configuration")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls first (>= 1: compiles)")
    p.add_argument("--mem-cap-gb", type=float, default=8.0,
                   help="do not run a configuration whose XLA memory (temp+args+outputs) "
                        "exceeds this many GiB")
    p.add_argument("--max-unrolled", type=int, default=128,
                   help="do not build the block-causal core beyond this many query blocks "
                        "(its program, and compile time, grow with T/block_q)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: T in {QUICK_SEQ}, tiny heads, 1 timed call")
    p.add_argument("--out", default="runs/long_context", help="output folder")
    args = p.parse_args(argv)
    if args.quick:
        args.seq, args.heads, args.kv_heads, args.head_dim = list(QUICK_SEQ), 4, 2, 8
        args.iters, args.warmup, args.block_q = 1, 1, 8
        args.flash_block_q, args.flash_block_k = 8, 16
    if args.iters < 1 or args.warmup < 1:
        p.error("--iters and --warmup must be >= 1")
    if args.heads % args.kv_heads:
        p.error(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}")
    return args


def make_core(name: str, args: argparse.Namespace) -> tuple[Optional[Callable], str]:
    """(core(q, k, v) -> out, note); core None when unavailable here, the note says why."""
    if name == "dense":
        return dense.dense_causal_attention, ""
    if name == "block":
        return functools.partial(block.causal_attention, block_q=args.block_q), ""
    if name == "flash":
        return functools.partial(flash.flash_attention, block_q=args.flash_block_q,
                                 block_k=args.flash_block_k), ""
    if name == "xla_sdpa":
        return flash.xla_sdpa_attention, ""
    if name == "native":
        if args.dtype != "float32":
            return None, "native core is float32 only"
        from tfm_jax.layers import ops as ops_lib
        from tfm_jax.platform.kernels import cpu
        cpu_kernels = cpu
        try:
            ops = cpu_kernels.native_ops()
        except RuntimeError as err:
            return None, f"native kernels unavailable: {err}"
        return functools.partial(ops.causal_attention, block_q=args.block_q), cpu.available()[1]
    raise ValueError(name)


def fwd_bwd(core: Callable) -> Callable:
    """(q, k, v, dO) -> (dq, dk, dv): one forward and one backward of the core."""
    def loss(q, k, v, do):
        return jnp.sum(core(q, k, v).astype(jnp.float32) * do)
    return jax.grad(loss, (0, 1, 2))


def memory_bytes(compiled) -> dict[str, Optional[int]]:
    """XLA's memory analysis of a compiled program (None fields where the backend has none)."""
    try:
        ma = compiled.memory_analysis()
    except Exception:            # some backends/plugins do not implement it
        ma = None
    fields = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
              "alias_size_in_bytes", "generated_code_size_in_bytes")
    out = {f.removesuffix("_size_in_bytes"): (None if ma is None else int(getattr(ma, f, 0)))
           for f in fields}
    out["total"] = (None if ma is None else
                    out["temp"] + out["argument"] + out["output"])
    return out


def measure(name: str, core: Callable, t: int, args: argparse.Namespace,
            device) -> dict[str, Any]:
    """One (implementation, T) row: compile, memory, and (within the caps) time."""
    b, h, hkv, d = args.batch, args.heads, args.kv_heads, args.head_dim
    row: dict[str, Any] = {"impl": name, "seq": t, "status": "ok", "note": ""}
    if name == "block" and -(-t // args.block_q) > args.max_unrolled:
        row.update(status="skipped",
                   note=f"{-(-t // args.block_q)} unrolled query blocks > --max-unrolled "
                        f"{args.max_unrolled}")
        return row
    dtype = jnp.dtype(args.dtype)
    r = np.random.default_rng(t)
    q, k, v, do = (jax.device_put(jnp.asarray(r.standard_normal((b, t, n, d)), dt), device)
                   for n, dt in ((h, dtype), (hkv, dtype), (hkv, dtype), (h, jnp.float32)))
    t0 = time.perf_counter()
    compiled = jax.jit(fwd_bwd(core)).lower(q, k, v, do).compile()
    row["compile_s"] = time.perf_counter() - t0
    mem = memory_bytes(compiled)
    row["memory_bytes"] = mem
    cap = args.mem_cap_gb * 2 ** 30
    if mem["total"] is not None and mem["total"] > cap:
        row.update(status="skipped", note=f"XLA memory {mem['total'] / 2 ** 30:.1f} GiB > "
                                          f"--mem-cap-gb {args.mem_cap_gb:g}")
        return row
    for _ in range(args.warmup):
        jax.block_until_ready(compiled(q, k, v, do))
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(q, k, v, do))
        times.append(time.perf_counter() - t0)
    row["ms_all"] = [1e3 * x for x in times]
    row["ms"] = statistics.median(row["ms_all"])
    row["best_ms"] = min(row["ms_all"])
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = jax.devices()[0]
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    load_before = _loadavg()
    rows, notes = [], {}
    for name in args.impls:
        core, note = make_core(name, args)
        notes[name] = note
        for t in args.seq:
            if core is None:
                rows.append({"impl": name, "seq": t, "status": "unavailable", "note": note})
                continue
            row = measure(name, core, t, args, device)
            rows.append(row)
            print(f"{name:<9} T={t:<6} " + (
                f"{row['ms']:9.1f} ms  {_mib(row['memory_bytes']['total'])}  "
                f"(compile {row['compile_s']:.1f} s)" if row["status"] == "ok"
                else f"{row['status']}: {row['note']}"), flush=True)
    machine = machine_info()
    machine["loadavg_1min"] = {"start": load_before, "end": _loadavg()}
    out = {
        "shape": {"batch": args.batch, "heads": args.heads, "kv_heads": args.kv_heads,
                  "head_dim": args.head_dim, "dtype": args.dtype},
        "blocks": {"block_q": args.block_q, "flash_block_q": args.flash_block_q,
                   "flash_block_k": args.flash_block_k},
        "timing": f"forward+backward of one call, median of {args.iters} after "
                  f"{args.warmup} warmup call(s)",
        "memory_measure": "XLA compiled.memory_analysis(): temp + argument + output bytes of "
                          "the jitted forward+backward (native custom calls' own scratch not "
                          "included)",
        "caps": {"mem_cap_gb": args.mem_cap_gb, "max_unrolled": args.max_unrolled},
        "impls": {n: {"description": DESCRIPTIONS[n], "note": notes[n]} for n in args.impls},
        "machine": machine,
        "rows": rows,
    }
    (out_dir / "long_context.json").write_text(json.dumps(out, indent=2))
    table = markdown_table(out)
    (out_dir / "long_context.md").write_text(table)
    plot(out, out_dir / "long_context.png")
    print(f"\n{table}\nwrote {out_dir}/long_context.json, long_context.md, long_context.png")
    return out


def _mib(x: Optional[int]) -> str:
    return "n/a" if x is None else f"{x / 2 ** 20:,.1f} MiB"


def _cell(row: dict[str, Any]) -> str:
    mem = row.get("memory_bytes", {}).get("total")
    if row["status"] == "ok":
        return f"{row['ms']:,.1f} ms / {_mib(mem)}"
    if row["status"] == "skipped" and mem is not None:
        return f"not run ({_mib(mem)} > cap)"
    return "not run" if row["status"] == "skipped" else "n/a"


def markdown_table(out: dict[str, Any]) -> str:
    """Rows = implementations, columns = T; each cell 'time / memory' or why it is missing."""
    s = out["shape"]
    seqs = sorted({r["seq"] for r in out["rows"]})
    impls = list(out["impls"])
    cells = {(r["impl"], r["seq"]): r for r in out["rows"]}
    lines = [f"Causal attention, forward+backward of one call: B={s['batch']}, H={s['heads']}, "
             f"Hkv={s['kv_heads']}, D={s['head_dim']}, {s['dtype']}. Cell: median time / "
             f"memory ({out['memory_measure']}).", "",
             "| implementation | " + " | ".join(f"T={t}" for t in seqs) + " |",
             "|---|" + "---|" * len(seqs)]
    for name in impls:
        lines.append(f"| {name} | " + " | ".join(
            _cell(cells[(name, t)]) if (name, t) in cells else "-" for t in seqs) + " |")
    skipped = [r for r in out["rows"] if r["status"] != "ok"]
    if skipped:
        lines += ["", "Not run:"] + [f"- {r['impl']} T={r['seq']}: {r['note']}" for r in skipped]
    lines += ["", "Implementations:"] + [
        f"- `{n}`: {d['description']}" + (f" ({d['note']})" if d["note"] else "")
        for n, d in out["impls"].items()]
    return "\n".join(lines) + "\n"


def plot(out: dict[str, Any], path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in out["impls"]:
        ok = [r for r in out["rows"] if r["impl"] == name and r["status"] == "ok"]
        mem = [r for r in out["rows"] if r["impl"] == name
               and r.get("memory_bytes", {}).get("total") is not None]
        if ok:
            a.plot([r["seq"] for r in ok], [r["ms"] for r in ok], "o-", label=name)
        if mem:
            b.plot([r["seq"] for r in mem], [r["memory_bytes"]["total"] / 2 ** 20 for r in mem],
                   "o-", label=name)
    a.set(xlabel="sequence length T", ylabel="forward+backward ms", xscale="log", yscale="log",
          title="time of one attention call")
    b.set(xlabel="sequence length T", ylabel="MiB (XLA temp + args + outputs)", xscale="log",
          yscale="log", title="memory (XLA memory analysis; incl. skipped runs)")
    for ax in (a, b):
        ax.grid(alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    s = out["shape"]
    fig.suptitle(f"causal attention, B={s['batch']}, H={s['heads']}, Hkv={s['kv_heads']}, "
                 f"D={s['head_dim']}, {s['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    return run(parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
