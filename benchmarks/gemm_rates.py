"""The model's own GEMMs, one at a time: XLA:CPU (jax) vs PyTorch (MKL) on the same shapes.

A train step of the benchmark model is ~2/3 GEMM time, so the per-GEMM rate of each framework
bounds the step-time ratio. For every projection of the preset's model (q, k, v, o, SwiGLU
gate/up/down, LM head) this times the three GEMMs a training step runs:

* ``fwd``  -- ``y = x @ W``                       (N, K) @ (K, M)
* ``dX``   -- ``dx = dy @ W^T``                   (N, M) @ (M, K), W read transposed
* ``dW``   -- ``dW = x^T @ dy``, contracting the N = batch*seq tokens. Timed both ways XLA can
  run it: ``dW (TN)`` lets XLA contract dim 0 of both operands (its transposed-operand path) and
  ``dW (x^T)`` materialises ``x^T`` first and runs a plain GEMM (what ``tfm_jax.layers.linear``
  does). torch passes the transposes to MKL as flags (no copy).

Each case is timed jax / torch / jax / torch ... (``--repeats``) and the median is kept; GFLOP/s
= 2 N K M / time. ``--threads`` sets torch's threads (default: all CPUs, like the peer); jax
uses its own pool over all CPUs (it has no thread-count option). For one core run the whole
command under ``taskset -c 0``.

    python -m benchmarks.gemm_rates                    # reference preset
    python -m benchmarks.gemm_rates --preset large --json gemm.json
    taskset -c 0 python -m benchmarks.gemm_rates --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time
from typing import Any, Callable, Optional

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import train_throughput as tt  # noqa: E402


def projections(shape: dict[str, int], seq: int, batch: int) -> list[tuple[str, int, int, int]]:
    """(name, N, K, M) of every distinct projection GEMM of one layer + the LM head."""
    n, d, f = batch * seq, shape["d_model"], shape["ffn_hidden"]
    hd = shape["n_heads"] * shape["head_dim"]
    kvd = shape["n_kv_heads"] * shape["head_dim"]
    out = [("q_proj", n, d, hd), ("k/v_proj", n, d, kvd), ("o_proj", n, hd, d),
           ("ffn gate/up", n, d, f), ("ffn down", n, f, d),
           ("lm_head", n, d, shape["vocab_size"])]
    return out


def _time(fn: Callable[[], Any], iters: int) -> float:
    fn()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def cases(n: int, k: int, m: int) -> dict[str, tuple[Callable, Callable, tuple, tuple]]:
    """label -> (jax fn, torch fn, operand shapes)."""
    return {
        "fwd": (lambda x, w: x @ w, lambda x, w: x @ w, ((n, k), (k, m))),
        "dX": (lambda dy, w: dy @ w.T, lambda dy, w: dy @ w.t(), ((n, m), (k, m))),
        "dW (TN)": (lambda x, dy: x.T @ dy, lambda x, dy: x.t() @ dy, ((n, k), (n, m))),
        "dW (x^T)": (lambda x, dy: jax.lax.optimization_barrier(x.T) @ dy,
                     lambda x, dy: x.t().contiguous() @ dy, ((n, k), (n, m))),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    shape, seq, batch = tt.resolve_shape(tt.parse_args(["--preset", args.preset]))
    rng = np.random.default_rng(0)
    rows = []
    for name, n, k, m in projections(shape, seq, batch):
        for label, (jf, tf, shapes) in cases(n, k, m).items():
            ops = [rng.standard_normal(s).astype(np.float32) for s in shapes]
            jops = [jnp.asarray(o) for o in ops]
            tops = [torch.from_numpy(o) for o in ops]
            jfn = jax.jit(jf)
            jt, pt = [], []
            for _ in range(args.repeats):
                jt.append(_time(lambda: jfn(*jops).block_until_ready(), args.iters))
                pt.append(_time(lambda: tf(*tops), args.iters))
            flops = 2.0 * n * k * m
            j_s, t_s = statistics.median(jt), statistics.median(pt)
            rows.append({"gemm": name, "case": label, "n": n, "k": k, "m": m,
                         "jax_ms": 1e3 * j_s, "torch_ms": 1e3 * t_s,
                         "jax_gflops": flops / j_s / 1e9, "torch_gflops": flops / t_s / 1e9,
                         "ratio": t_s / j_s})
    return {"preset": args.preset, "shape": shape, "seq": seq, "batch": batch,
            "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "jax": jax.__version__, "torch": torch.__version__, "rows": rows}


def print_report(out: dict[str, Any]) -> None:
    print(f"preset {out['preset']} (N = batch*seq = {out['batch'] * out['seq']} tokens), "
          f"{out['cpus']} CPUs, torch threads {out['torch_threads']}, jax {out['jax']}, "
          f"torch {out['torch']}; medians")
    print(f"{'gemm':<12} {'case':<9} {'N x K x M':>18} | {'jax ms':>7} {'GFLOP/s':>8} | "
          f"{'torch ms':>8} {'GFLOP/s':>8} | jax/torch speed")
    for r in out["rows"]:
        dims = f"{r['n']}x{r['k']}x{r['m']}"
        print(f"{r['gemm']:<12} {r['case']:<9} {dims:>18} | {r['jax_ms']:7.2f} "
              f"{r['jax_gflops']:8.0f} | {r['torch_ms']:8.2f} {r['torch_gflops']:8.0f} | "
              f"{r['ratio']:.2f}x")
    # What each framework runs for one training step of one projection: tfm_jax's Linear
    # materialises x^T for dW (layers/linear.py), torch hands the transpose to MKL.
    jt = sum(r["jax_ms"] for r in out["rows"] if r["case"] in ("fwd", "dX", "dW (x^T)"))
    pt = sum(r["torch_ms"] for r in out["rows"] if r["case"] in ("fwd", "dX", "dW (TN)"))
    print(f"one fwd + dX + dW of every projection (jax: dW via x^T, as tfm_jax runs it; torch: "
          f"dW TN, as torch runs it): jax {jt:.1f} ms, torch {pt:.1f} ms -> jax/torch speed "
          f"{pt / jt:.2f}x")


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(tt.PRESETS), default="reference")
    p.add_argument("--threads", type=int, help="torch threads (default: all CPUs)")
    p.add_argument("--iters", type=int, default=10, help="timed calls per repeat")
    p.add_argument("--repeats", type=int, default=3, help="interleaved jax/torch rounds")
    p.add_argument("--json", metavar="OUT.json")
    args = p.parse_args(argv)
    out = run(args)
    print_report(out)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
