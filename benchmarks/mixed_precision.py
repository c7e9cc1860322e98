"""Loss of a short training run under each mixed-precision policy, against float32.

Trains the same config (default: the tiny model on the built-in corpus) once per policy with the
same seed and batches, and prints the final train loss (mean of the last logged rows), the
validation loss and their differences from the float32 run:

* ``f32``: float32 parameters and compute (the reference);
* ``bf16-compute``: float32 parameters, bfloat16 compute (the GPU default policy);
* ``bf16-master``: bfloat16 parameters, float32 master weights in the optimizer state;
* ``bf16-stochastic``: bfloat16 parameters, no master copy, updates rounded stochastically;
* ``bf16-nearest``: bfloat16 parameters, no master copy, updates rounded to nearest even (the
  pure-bfloat16 AdamW the policies exist to avoid).

    python -m benchmarks.mixed_precision --steps 300 --json out.json
    python -m benchmarks.mixed_precision --steps 5 model.d_model=32 model.n_layers=1   # smoke
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time
from typing import Optional

_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

POLICIES = {
    "f32": [],
    "bf16-compute": ["model.dtype=bfloat16"],
    "bf16-master": ["model.dtype=bfloat16", "model.param_dtype=bfloat16",
                    "model.master_weights=float32"],
    "bf16-stochastic": ["model.dtype=bfloat16", "model.param_dtype=bfloat16",
                        "model.master_weights=none", "model.param_rounding=stochastic"],
    "bf16-nearest": ["model.dtype=bfloat16", "model.param_dtype=bfloat16",
                     "model.master_weights=none", "model.param_rounding=nearest"],
}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="short-run loss per mixed-precision policy vs f32")
    p.add_argument("--config", default=None, help="YAML config (default configs/tiny.yaml)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--policies", default=",".join(POLICIES),
                   help=f"comma-separated subset of {', '.join(POLICIES)}")
    p.add_argument("--json", help="write the results here")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides for every run")
    return p.parse_args(argv)


def run_policy(config: Optional[str], steps: int, extra: list[str], overrides: list[str],
               run_dir: str) -> dict:
    from tfm_jax.config import load_config
    from tfm_jax.train import train

    cfg = load_config(config, [f"train.steps={steps}", f"train.eval_every={steps}",
                               f"train.checkpoint_every={steps}", f"train.log_every=10",
                               f"train.warmup_steps={min(50, steps // 5)}",
                               "train.sample_tokens=0", "run.progress=false",
                               "run.tensorboard=false", f"run.dir={run_dir}"]
                      + list(overrides) + extra)
    t0 = time.perf_counter()
    res = train(cfg)
    rows = [json.loads(line) for line in (pathlib.Path(res.run_dir) / "metrics.jsonl")
            .read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in rows if "loss" in r and r.get("step", 0) > 0]
    tail = losses[-3:] or [res.last_loss]
    return {"train_loss": sum(tail) / len(tail), "val_loss": res.eval.get("val_loss"),
            "seconds": time.perf_counter() - t0, "overrides": extra}


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    names = [n.strip() for n in args.policies.split(",") if n.strip()]
    unknown = [n for n in names if n not in POLICIES]
    if unknown:
        raise SystemExit(f"unknown policies {unknown}; choose from {', '.join(POLICIES)}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            results[name] = run_policy(args.config, args.steps, POLICIES[name], args.overrides,
                                       f"{tmp}/{name}")
            print(f"{name:<17} train {results[name]['train_loss']:.4f}  val "
                  f"{results[name]['val_loss']:.4f}  ({results[name]['seconds']:.0f} s)",
                  flush=True)
    ref = results.get("f32")
    if ref is not None:
        print(f"{'policy':<17}{'train':>9}{'vs f32':>9}{'val':>9}{'vs f32':>9}")
        for name, r in results.items():
            dt = (r["train_loss"] / ref["train_loss"] - 1) * 100
            dv = (r["val_loss"] / ref["val_loss"] - 1) * 100
            r.update(train_vs_f32_pct=dt, val_vs_f32_pct=dv)
            print(f"{name:<17}{r['train_loss']:>9.4f}{dt:>+8.2f}%{r['val_loss']:>9.4f}"
                  f"{dv:>+8.2f}%")
    out = {"steps": args.steps, "config": args.config or "configs/tiny.yaml",
           "overrides": args.overrides, "results": results}
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()
