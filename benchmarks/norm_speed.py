"""RMSNorm vs LayerNorm on the op: the seed's "RMSNorm drops the mean subtraction, ~15 % less
compute" (Ch1.1.4), timed side by side on this machine.

For each width d, the jitted pure functions of :mod:`tfm_jax.layers.norms` (``layer_norm``,
``rms_norm``; float32 statistics) run on (tokens, d) float32 inputs, forward alone and forward +
backward (the gradient of ``sum(y * g)`` w.r.t. x, scale and bias), interleaved over
``--repeats`` rounds; the median of each and the ratio RMSNorm / LayerNorm are reported. The
backend's own RMSNorm (``tfm_jax.platform.backends.resolve_ops``: the native CPU kernel where it is
enabled) is timed beside them, forward only (``rms_ops_over_ln_fwd``).

Both ops are memory-bound (a few flops per element read): counting operations, RMSNorm saves
the mean (one reduction) and the subtraction, about 2 of ~7 per element, but the time is set
by the passes over memory, which XLA fuses either way. Timing is wall-clock on a shared
machine: indicative only, and the end-to-end effect is in ``tfm-jax ablate norm``.

    python benchmarks/norm_speed.py                        # d = 128, 1024, 4096; 8192 tokens
    python benchmarks/norm_speed.py --out studies/norm_study/norm_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time
from typing import Optional

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="RMSNorm vs LayerNorm op timing")
    p.add_argument("--dims", nargs="+", type=int, default=[128, 1024, 4096])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--iters", type=int, default=20, help="calls per timing")
    p.add_argument("--repeats", type=int, default=7, help="interleaved rounds")
    p.add_argument("--out", help="write the results (JSON) here")
    return p.parse_args(argv)


def _time(fn, args, iters: int) -> float:
    import jax

    jax.block_until_ready(fn(*args))                 # compiled and warm
    t0 = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / iters


def bench_dim(d: int, tokens: int, iters: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp

    from tfm_jax.platform.backends import resolve_ops
    from tfm_jax.config import Config
    from tfm_jax.layers.norms import layer_norm, rms_norm

    kx, kg = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (tokens, d), jnp.float32)
    g = jax.random.normal(kg, (tokens, d), jnp.float32)
    scale, bias = jnp.ones((d,), jnp.float32), jnp.zeros((d,), jnp.float32)
    eps = 1e-6
    ops = resolve_ops(Config(), jax.devices()[:1])

    def ln_loss(x, s, b):
        return jnp.sum(layer_norm(x, s, b, eps) * g)

    def rms_loss(x, s, b):
        return jnp.sum(rms_norm(x, s, eps) * g)

    fns = {
        "ln_fwd": (jax.jit(lambda x, s, b: layer_norm(x, s, b, eps)), (x, scale, bias)),
        "rms_fwd": (jax.jit(lambda x, s: rms_norm(x, s, eps)), (x, scale)),
        "rms_ops_fwd": (jax.jit(lambda x, s: ops.rms_norm(x, s, eps)), (x, scale)),
        "ln_fwd_bwd": (jax.jit(jax.grad(ln_loss, argnums=(0, 1, 2))), (x, scale, bias)),
        "rms_fwd_bwd": (jax.jit(jax.grad(rms_loss, argnums=(0, 1, 2))), (x, scale, bias)),
    }
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, (fn, args) in fns.items():
            times[k].append(_time(fn, args, iters))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"d": d, "tokens": tokens, "median_ms": {k: 1e3 * v for k, v in med.items()},
            "rms_over_ln_fwd": med["rms_fwd"] / med["ln_fwd"],
            "rms_over_ln_fwd_bwd": med["rms_fwd_bwd"] / med["ln_fwd_bwd"],
            "rms_ops_over_ln_fwd": med["rms_ops_fwd"] / med["ln_fwd"],
            # every interleaved round, so a reader can pair them and see the spread
            "repeats_ms": {k: [1e3 * t for t in v] for k, v in times.items()},
            "ops": ops.describe()}


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    import jax

    from tfm_jax.ablate.provenance import provenance
    from tfm_jax.ablate.runner import describe_machine

    rows = []
    for d in args.dims:
        r = bench_dim(d, args.tokens, args.iters, args.repeats)
        rows.append(r)
        m = r["median_ms"]
        print(f"d={d:5d} x {args.tokens} tokens: fwd LN {m['ln_fwd']:7.3f} ms, RMS "
              f"{m['rms_fwd']:7.3f} ms ({r['rms_over_ln_fwd']:.2f}x), backend RMS "
              f"{m['rms_ops_fwd']:7.3f} ms ({r['rms_ops_over_ln_fwd']:.2f}x) | fwd+bwd LN "
              f"{m['ln_fwd_bwd']:7.3f} ms, RMS {m['rms_fwd_bwd']:7.3f} ms "
              f"({r['rms_over_ln_fwd_bwd']:.2f}x)")
    res_command = "python benchmarks/norm_speed.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    res = {"where": describe_machine(jax.devices()[:1]) + "; shared machine, load average "
           f"{os.getloadavg()[0]:.1f} at the end", "command": res_command,
           "rows": rows, "note": "wall-clock, interleaved medians, on a CPU shared with other "
           "jobs: indicative only",
           "provenance": provenance(res_command, jax.devices()[:1])}
    if args.out:
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.out).write_text(json.dumps(res, indent=1))
        print(f"wrote {args.out}")
    return res


if __name__ == "__main__":
    main()
