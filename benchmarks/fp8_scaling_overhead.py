"""Dynamic-scaling overhead: the amax + scale computation vs the GEMM it feeds (the seed's "≈2 %
latency overhead", Ch2.3), on this machine's CPU.

For each GEMM shape (tokens N, in K, out M) four jitted functions are timed, interleaved
(``--repeats`` rounds, median of each):

* ``gemm``: ``x @ w`` in float32 (the run's GEMM on upcast values: what an emulated FP8 dot
  multiplies);
* ``amax_scale``: ``fmt_max / max|x|`` and ``fmt_max / max|w|`` (per tensor) -- the part of
  dynamic scaling that delayed / static scaling avoid at the point of use;
* ``qdq``: the saturating e4m3 cast of x and w with given scales and back (the part every FP8
  recipe pays when emulated; a native FP8 GEMM fuses it);
* ``dynamic``: amax + scale + qdq + GEMM, i.e. the emulated ``fp8_dynamic`` dot.

The ratio that answers the claim is ``amax_scale / gemm``: reading x and w once each is O(NK +
KM) memory traffic against the GEMM's 2NKM flops, so it shrinks as the GEMM grows. On CPU the
GEMM is slow (tens of GFLOP/s), which makes the ratio *smaller* than on an H100, whose GEMM is
~100x faster while its bandwidth is only ~30x higher: a CPU ratio is no estimate of the H100's.
Timing is wall-clock on a shared machine: the numbers are indicative only.

    python -m benchmarks.fp8_scaling_overhead                     # the default shapes
    python -m benchmarks.fp8_scaling_overhead --shapes 2048x128x384 --repeats 3 --json out.json
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

# tiny model projections (16 x 128 tokens: d=128, ffn 384), then larger square GEMMs
DEFAULT_SHAPES = ("2048x128x384", "2048x384x128", "2048x1024x1024", "4096x2048x2048")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="amax+scale cost vs GEMM (CPU)")
    p.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES),
                   help="NxKxM GEMM shapes (tokens x in x out)")
    p.add_argument("--fmt", default="float8_e4m3fn")
    p.add_argument("--iters", type=int, default=5, help="calls per timing")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    p.add_argument("--json", help="write the results here")
    return p.parse_args(argv)


def _time(fn, args, iters: int) -> float:
    import jax

    t0 = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / iters


def bench_shape(n: int, k: int, m: int, fmt: str, iters: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp

    from tfm_jax.quant.formats import fmt_max, saturating_cast

    fm = jnp.float32(fmt_max(fmt))
    rng = jax.random.split(jax.random.key(0))
    x = jax.random.normal(rng[0], (n, k), jnp.float32)
    w = jax.random.normal(rng[1], (k, m), jnp.float32) * 0.02

    def qdq(a, s):
        return saturating_cast(a * s, fmt).astype(jnp.float32) * (1.0 / s)

    def amax_scale(x, w):
        return fm / jnp.max(jnp.abs(x)), fm / jnp.max(jnp.abs(w))

    fns = {
        "gemm": jax.jit(lambda x, w: x @ w),
        "amax_scale": jax.jit(amax_scale),
        "qdq": jax.jit(lambda x, w, sx, sw: (qdq(x, sx), qdq(w, sw))),
        "dynamic": jax.jit(lambda x, w: (lambda s: qdq(x, s[0]) @ qdq(w, s[1]))(
            amax_scale(x, w))),
    }
    sx, sw = jax.jit(amax_scale)(x, w)
    args = {"gemm": (x, w), "amax_scale": (x, w), "qdq": (x, w, sx, sw), "dynamic": (x, w)}
    for name, fn in fns.items():               # compile + warm
        jax.block_until_ready(fn(*args[name]))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_time(fn, args[name], iters))
    med = {name: statistics.median(v) for name, v in times.items()}
    return {"shape": [n, k, m], "median_s": med,
            "gemm_gflops": 2 * n * k * m / med["gemm"] / 1e9,
            "amax_scale_over_gemm": med["amax_scale"] / med["gemm"],
            # the same ratio per interleaved round: its spread says how far the median holds
            "amax_scale_over_gemm_rounds": [a / g for a, g in zip(times["amax_scale"],
                                                                  times["gemm"])],
            "qdq_over_gemm": med["qdq"] / med["gemm"],
            "dynamic_over_gemm": med["dynamic"] / med["gemm"]}


def main(argv: Optional[list[str]] = None) -> dict:
    import jax

    from tfm_jax.ablate.provenance import load_average, provenance

    args = parse_args(argv)
    prov = provenance("python -m benchmarks.fp8_scaling_overhead " + " ".join(
        sys.argv[1:] if argv is None else argv), jax.devices()[:1])
    rows = []
    for shape in args.shapes:
        try:
            n, k, m = (int(v) for v in shape.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--shapes {shape!r}: give NxKxM, e.g. 2048x128x384") from None
        r = bench_shape(n, k, m, args.fmt, args.iters, args.repeats)
        rows.append(r)
        print(f"{n}x{k}x{m}: GEMM {r['median_s']['gemm'] * 1e3:8.3f} ms "
              f"({r['gemm_gflops']:6.1f} GFLOP/s) | amax+scale "
              f"{100 * r['amax_scale_over_gemm']:6.2f} % of it | qdq "
              f"{100 * r['qdq_over_gemm']:6.1f} % | emulated dynamic dot "
              f"{r['dynamic_over_gemm']:.2f}x the GEMM")
    prov["load_end"] = load_average()
    res = {"device": str(jax.devices()[0]), "fmt": args.fmt, "rows": rows,
           "repeats": args.repeats, "provenance": prov,
           "note": "wall-clock on a shared CPU: indicative only (see the module doc)"}
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
