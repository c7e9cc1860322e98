"""FP8 training-step overhead: the fp32 step vs the emulated ``fp8_delayed`` step, side by side.

The same model, shape, optimizer and fixed batch as :mod:`benchmarks.train_throughput` (its
reference preset and shape flags), one CPU device; the two steps run interleaved (fp32, fp8,
fp32, fp8, ... for ``--repeats``) and the ratio of the median step times is printed (target of
issue #10: <= 1.3x). On CPU the FP8 dot is emulated (e4m3/e5m2 casts around fp32 GEMMs): the
ratio measures the cost of the quantize/dequantize passes, the amax reductions, the delayed
state and, with ``--telemetry``, the per-projection telemetry; never an FP8 speed-up.

    python -m benchmarks.fp8_step                                  # reference preset
    python -m benchmarks.fp8_step --d-model 64 --layers 1 --seq 32 --steps 2 --repeats 1
    python -m benchmarks.fp8_step --recipe fp8_dynamic --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from typing import Optional

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks import train_throughput as tt  # noqa: E402


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="fp32 vs emulated fp8 train step (CPU)")
    p.add_argument("--preset", choices=sorted(tt.PRESETS), default="reference")
    for flag in ("--d-model", "--layers", "--heads", "--kv-heads", "--seq", "--batch",
                 "--vocab", "--ffn-hidden"):
        p.add_argument(flag, type=int)
    p.add_argument("--recipe", choices=["fp8_delayed", "fp8_dynamic"], default="fp8_delayed")
    p.add_argument("--telemetry", action="store_true",
                   help="quant.telemetry=true (off by default, as in the config)")
    p.add_argument("--cpu-kernels", choices=["auto", "native", "xla"], default="auto",
                   help="backend.cpu_kernels of both runs")
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    p.add_argument("--json", help="write the results here")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    shape, seq, batch = tt.resolve_shape(args)
    total = args.warmup + args.repeats * (args.steps + args.warmup) + 1
    base, note = tt.make_jax_config(shape, seq, batch, total)
    if note:
        print(note)
    base = base.replace(**{"backend.cpu_kernels": args.cpu_kernels})
    cfgs = {"fp32": base,
            args.recipe: base.replace(**{"quant.recipe": args.recipe,
                                         "quant.telemetry": args.telemetry})}
    benches = {name: tt.JaxBench(cfg, shape["vocab_size"]) for name, cfg in cfgs.items()}
    for name, b in benches.items():
        print(f"{name}: kernels {b.setup.ops.describe()}")
    times: dict[str, list[float]] = {name: [] for name in benches}
    for _ in range(args.repeats):
        for name, b in benches.items():
            times[name] += b.run(args.steps, args.warmup)
    med = {name: tt._median(ts) for name, ts in times.items()}
    best = {name: min(ts) for name, ts in times.items()}
    ratio = med[args.recipe] / med["fp32"]
    print(f"shape {shape}, seq {seq}, batch {batch}")
    for name in benches:
        print(f"  {name:12s} median {med[name] * 1e3:9.2f} ms   best {best[name] * 1e3:9.2f} ms"
              f"   last loss {benches[name].last_loss:.4f}")
    print(f"  ratio {args.recipe}/fp32 (median): {ratio:.3f}x  (target <= 1.3x; emulated FP8 "
          f"on CPU)")
    result = {"shape": shape, "seq": seq, "batch": batch, "recipe": args.recipe,
              "telemetry": args.telemetry, "median_s": med, "best_s": best,
              "ratio_median": ratio, "ratio_best": best[args.recipe] / best["fp32"],
              "steps": times}
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
