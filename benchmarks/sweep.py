"""Throughput across sizes: tfm_jax vs the PyTorch peer at several shapes, batches and lengths.

Each case is one run of :mod:`benchmarks.train_throughput` (both frameworks, interleaved, the
same machine peak re-measured per round), so every ratio in the table comes from one run.
Writes ``sweep.json``, ``sweep.md`` (the table for the README) and ``seq_scaling.png`` (step
time vs sequence length: the attention term makes it grow faster than linearly in T).

    python -m benchmarks.sweep --out runs/bench            # ~15 min on 2 CPU cores
    python -m benchmarks.sweep --quick --out /tmp/sweep    # tiny shapes, seconds (smoke test)
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Any, Optional

_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks import train_throughput as tt  # noqa: E402

# (label, train_throughput CLI args)
CASES = [
    ("reference b8", ["--preset", "reference"]),
    ("reference b1", ["--preset", "reference", "--batch", "1"]),
    ("reference b32", ["--preset", "reference", "--batch", "32", "--steps", "8"]),
    ("large b8", ["--preset", "large", "--steps", "6", "--warmup", "2"]),
    ("large b1", ["--preset", "large", "--batch", "1", "--steps", "10"]),
    ("large b32", ["--preset", "large", "--batch", "32", "--steps", "3", "--warmup", "1"]),
]
SEQ_LENS = [128, 256, 512, 1024]   # reference width, batch 8


TINY = ["--d-model", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--ffn-hidden",
        "64", "--batch", "2", "--steps", "2", "--warmup", "1", "--peak-n", "128"]
SEQ_BASE = ["--preset", "reference", "--steps", "6", "--warmup", "2"]


def run_sweep(out_dir: pathlib.Path, quick: bool = False, no_torch: bool = False
              ) -> list[dict[str, Any]]:
    out_dir.mkdir(parents=True, exist_ok=True)
    if quick:
        cases, seq_lens, seq_base = [("tiny", TINY + ["--seq", "16"])], [16, 32], TINY
    else:
        cases, seq_lens, seq_base = CASES, SEQ_LENS, SEQ_BASE
    cases = cases + [(f"seq {t}", seq_base + ["--seq", str(t)]) for t in seq_lens]
    rows = []
    for label, argv in cases:
        print(f"\n### {label}: {' '.join(argv)}", flush=True)
        res = tt.run(tt.parse_args(argv + (["--no-torch"] if no_torch else [])))
        r = res["results"]
        rows.append({"case": label, "args": argv, "shape": res["shape"],
                     "peak_flops": res["peak"]["machine_fp32_matmul"],
                     "jax_tokens_per_s": r["tfm_jax"]["tokens_per_s"],
                     "jax_step_ms": r["tfm_jax"]["step_ms"], "jax_mfu": r["tfm_jax"]["mfu"],
                     "torch_tokens_per_s": r.get("torch", {}).get("tokens_per_s"),
                     "torch_step_ms": r.get("torch", {}).get("step_ms"),
                     "torch_mfu": r.get("torch", {}).get("mfu"), "ratio": res["ratio"],
                     "machine": res["machine"]})
    (out_dir / "sweep.json").write_text(json.dumps(rows, indent=2))
    (out_dir / "sweep.md").write_text(markdown_table(rows))
    plot_seq_scaling([r for r in rows if r["case"].startswith("seq ")],
                     out_dir / "seq_scaling.png")
    print(f"\n{markdown_table(rows)}\nwrote {out_dir}/sweep.json, sweep.md, seq_scaling.png")
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    def f(x: Optional[float], fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    lines = ["| case | d_model x layers | seq x batch | tfm_jax tok/s | torch tok/s | ratio | "
             "tfm_jax MFU | torch MFU |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["shape"]
        lines.append(
            f"| {r['case']} | {s['d_model']} x {s['n_layers']} | {s['seq_len']} x "
            f"{s['batch_size']} | {f(r['jax_tokens_per_s'], ',.0f')} | "
            f"{f(r['torch_tokens_per_s'], ',.0f')} | {f(r['ratio'], '.2f')}x | "
            f"{f(r['jax_mfu'] and 100 * r['jax_mfu'], '.1f')}% | "
            f"{f(r['torch_mfu'] and 100 * r['torch_mfu'], '.1f')}% |")
    return "\n".join(lines) + "\n"


def plot_seq_scaling(rows: list[dict[str, Any]], path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return
    t = [r["shape"]["seq_len"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for key, name in (("jax", "tfm_jax"), ("torch", "torch")):
        ms = [r[f"{key}_step_ms"] for r in rows]
        if all(m is not None for m in ms):
            a.plot(t, [m / tt_ for m, tt_ in zip(ms, t)], "o-", label=name)
            b.plot(t, [r[f"{key}_tokens_per_s"] for r in rows], "o-", label=name)
    a.set(xlabel="sequence length T", ylabel="step ms / T", xscale="log",
          title="step time per position vs T")
    b.set(xlabel="sequence length T", ylabel="tokens/s", xscale="log", title="throughput")
    for ax in (a, b):
        ax.legend()
        ax.grid(alpha=0.3)
    s = rows[0]["shape"]
    fig.suptitle(f"d_model {s['d_model']}, {s['n_layers']} layers, batch {s['batch_size']}, fp32")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/bench", help="output folder")
    p.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    p.add_argument("--no-torch", action="store_true")
    a = p.parse_args(argv)
    run_sweep(pathlib.Path(a.out), quick=a.quick, no_torch=a.no_torch)


if __name__ == "__main__":
    main(sys.argv[1:])
