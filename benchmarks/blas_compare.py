"""The native CPU kernels with each installed BLAS, side by side: sgemm rates and the train step.

``tfm_jax/platform/kernels/cpu_kernels.cc`` links no BLAS; :mod:`tfm_jax.platform.kernels.cpu` hands it a
``cblas_sgemm`` at load time. This benchmark opens every candidate found on this machine

* ``openblas``        -- the ``scipy-openblas32`` wheel (its own library instance),
* ``numpy-openblas``  -- the ILP64 OpenBLAS numpy bundles (``numpy.libs``); opening it sets
  *numpy's* OpenBLAS to one thread for the rest of this process (fine here, which is why it is a
  benchmark-only candidate and not a ``backend.cpu_blas`` choice),
* ``mkl``             -- ``libmkl_rt.so.*`` (sequential threading layer),

and switches the one loaded kernel library between them (:func:`tfm_jax.platform.kernels.cpu.use_blas`),
so every candidate runs the *same* compiled executables. The machine is noisy, so everything is
interleaved (blas 1, blas 2, ..., torch; repeated ``--repeats`` times) and medians are reported.

1. GEMM rates: the model's projection GEMMs as the kernels run them (``tfm_gemm`` custom call,
   rows split over XLA's pool): ``fwd`` (N,K)@(K,M), ``dX`` dy W^T (B transposed), ``dW`` x^T dy
   (A transposed, contracting the N tokens), plus a 1024^3 GEMM; torch's matmul (its own MKL,
   ``--threads``) as the peer's reference. GFLOP/s = 2 N K M / median time.
2. The train step (``--train-steps`` > 0): the tfm_jax step of ``benchmarks.train_throughput``'s
   preset with each BLAS and the PyTorch eager peer, tokens/s from the median step.

    python -m benchmarks.blas_compare                         # reference preset, both parts
    python -m benchmarks.blas_compare --train-steps 0         # GEMM rates only
    python -m benchmarks.blas_compare --blas openblas,mkl --repeats 7 --json blas.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time
from typing import Any, Optional

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import gemm_rates  # noqa: E402
from benchmarks import train_throughput as tt  # noqa: E402
from tfm_jax.platform.kernels import cpu  # noqa: E402

KINDS = ("openblas", "numpy-openblas", "mkl")


def open_candidates(wanted: list[str]) -> tuple[dict[str, cpu.Blas], dict[str, str]]:
    """{kind: opened Blas} for the first library of each wanted kind that opens, and
    {kind: why not} for the others."""
    found = cpu.find_blas()
    opened, missing = {}, {}
    for kind in wanted:
        errs = []
        for path in found.get(kind, []):
            try:
                opened[kind] = cpu.open_blas(kind, path)
                break
            except RuntimeError as e:
                errs.append(str(e))
        if kind not in opened:
            missing[kind] = "; ".join(errs) or "not installed"
    return opened, missing


_time = gemm_rates._time   # median seconds of iters calls after one warm-up


def gemm_cases(shape: dict[str, int], seq: int, batch: int) -> list[tuple[str, str, int, int, int,
                                                                         bool, bool]]:
    """(gemm, case, m, k, n, ta, tb): C (m, n) = op(A) op(B) as the kernels run them."""
    out = []
    for name, n_tok, k, m in gemm_rates.projections(shape, seq, batch):
        out += [(name, "fwd", n_tok, k, m, False, False),       # y = x W
                (name, "dX", n_tok, m, k, False, True),         # dx = dy W^T
                (name, "dW", k, n_tok, m, True, False)]         # dW = x^T dy
    out.append(("square", "1024^3", 1024, 1024, 1024, False, False))
    return out


def gemm_part(args, blases: dict[str, cpu.Blas], shape, seq, batch, torch) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for name, case, m, k, n, ta, tb in gemm_cases(shape, seq, batch):
        a = rng.standard_normal((k, m) if ta else (m, k)).astype(np.float32)
        b = rng.standard_normal((n, k) if tb else (k, n)).astype(np.float32)
        ja, jb_ = jnp.asarray(a), jnp.asarray(b)
        f = jax.jit(lambda x, y, ta=ta, tb=tb: cpu._gemm(x, y, ta=ta, tb=tb))
        ref = (a.T if ta else a).astype(np.float64) @ (b.T if tb else b)
        times: dict[str, list[float]] = {kind: [] for kind in blases}
        for kind, blas in blases.items():                       # correctness first
            cpu.use_blas(blas)
            got = np.asarray(f(ja, jb_))
            err = float(np.max(np.abs(got - ref)) / (np.max(np.abs(ref)) + 1e-30))
            if err > 1e-5:
                raise AssertionError(f"{kind}: {name} {case} relative error {err:.2e}")
        if torch is not None:
            times["torch"] = []
            ta_, tb_ = torch.from_numpy(a), torch.from_numpy(b)
            tfn = lambda: (ta_.t() if ta else ta_) @ (tb_.t() if tb else tb_)  # noqa: E731
        for _ in range(args.repeats):
            for kind, blas in blases.items():
                cpu.use_blas(blas)
                times[kind].append(_time(lambda: f(ja, jb_).block_until_ready(), args.iters))
            if torch is not None:
                times["torch"].append(_time(tfn, args.iters))
        flops = 2.0 * m * k * n
        rows.append({"gemm": name, "case": case, "m": m, "k": k, "n": n, "ta": ta, "tb": tb,
                     "ms": {kk: 1e3 * statistics.median(v) for kk, v in times.items()},
                     "gflops": {kk: flops / statistics.median(v) / 1e9
                                for kk, v in times.items()}})
    return rows


def train_part(args, blases: dict[str, cpu.Blas], shape, seq, batch, torch) -> dict[str, Any]:
    cfg, note = tt.make_jax_config(dict(shape), seq, batch, 10 ** 6)
    cfg = cfg.replace(**{"backend.cpu_kernels": "native"})
    bench = tt.JaxBench(cfg, min(shape["vocab_size"], 256))
    peer = None
    if torch is not None:
        from benchmarks import torch_peer as peer
    times: dict[str, list[float]] = {kind: [] for kind in blases}
    if peer is not None:
        times["torch"] = []
    for kind, blas in blases.items():               # compile + warm every candidate once
        cpu.use_blas(blas)
        bench.run(1, args.warmup)
    for r in range(args.repeats):
        for kind, blas in blases.items():
            cpu.use_blas(blas)
            times[kind] += bench.run(args.train_steps, 1)
            print(f"[train round {r + 1}/{args.repeats}] {kind:<15} median step "
                  f"{1e3 * statistics.median(times[kind][-args.train_steps:]):7.1f} ms "
                  f"(loss {bench.last_loss:.3f})", flush=True)
        if peer is not None:
            res = peer.bench_torch_train(shape, batch, seq, steps=args.train_steps, warmup=1,
                                         threads=args.threads or os.cpu_count() or 1,
                                         lr=tt.OPTIMIZER["lr"], compile=False)
            times["torch"] += [ms / 1e3 for ms in res["step_ms_all"]]
            print(f"[train round {r + 1}/{args.repeats}] {'torch':<15} median step "
                  f"{res['step_ms']:7.1f} ms", flush=True)
    tokens = batch * seq
    out = {kk: {"step_ms": 1e3 * statistics.median(v), "tokens_per_s": tokens / statistics.median(v),
                "best_step_ms": 1e3 * min(v), "n_steps": len(v)} for kk, v in times.items()}
    if "torch" in out:
        for kk in blases:
            out[kk]["vs_torch"] = out[kk]["tokens_per_s"] / out["torch"]["tokens_per_s"]
    return {"results": out, "vocab_note": note, "tokens_per_step": tokens}


def run(args: argparse.Namespace) -> dict[str, Any]:
    wanted = [k.strip() for k in args.blas.split(",") if k.strip()]
    bad = [k for k in wanted if k not in KINDS]
    if bad:
        raise SystemExit(f"--blas: unknown {bad}; choose from {', '.join(KINDS)}")
    torch = None
    if not args.no_torch:
        # torch first: libmkl_rt loads its MKL layers into the global symbol scope, and a torch
        # imported after that binds its own MKL calls to them (sequential MKL 2026 instead of
        # torch's threaded MKL: a 10x slower torch step here).
        import torch
        torch.set_num_threads(args.threads or os.cpu_count() or 1)
    cpu.load()                                       # builds the library, default BLAS
    default = cpu.active_blas()
    blases, missing = open_candidates(wanted)
    if not blases:
        raise SystemExit(f"no BLAS could be opened: {missing}")
    shape, seq, batch = tt.resolve_shape(tt.parse_args(["--preset", args.preset]))
    out: dict[str, Any] = {
        "preset": args.preset, "shape": shape, "seq": seq, "batch": batch,
        "date": time.strftime("%Y-%m-%d"), "machine": tt.machine_info(),
        "env": {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
                                               "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")},
        "default_blas": default.describe() if default else None,
        "blas": {k: b.describe() for k, b in blases.items()}, "missing": missing,
        "torch": getattr(torch, "__version__", None), "repeats": args.repeats,
        "iters": args.iters, "train_steps": args.train_steps}
    try:
        out["gemm"] = gemm_part(args, blases, shape, seq, batch, torch) if args.iters else []
        out["train"] = (train_part(args, blases, shape, seq, batch, torch)
                        if args.train_steps else None)
    finally:
        if default is not None:
            cpu.use_blas(default)
    print_report(out)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    return out


def print_report(out: dict[str, Any]) -> None:
    m = out["machine"]
    print(f"\n{out['date']}, {m['cpu_model']}, {m['cpu_count']} CPUs, jax {m['jax']}, torch "
          f"{out['torch'] or 'not run'}; preset {out['preset']} (N = {out['batch'] * out['seq']} "
          f"tokens); medians of {out['repeats']} interleaved rounds")
    for k, d in out["blas"].items():
        print(f"  {k:<15} {d}")
    for k, why in out["missing"].items():
        print(f"  {k:<15} not measured: {why}")
    env = {k: v for k, v in out["env"].items() if v}
    print(f"  env: {env or 'no OPENBLAS_*/MKL_* variables set'}")
    cols = list(out["blas"]) + (["torch"] if out["torch"] else [])
    if out["gemm"]:
        print("\nGEMM GFLOP/s (kernels' tfm_gemm over XLA's pool; torch: its own matmul)")
        print(f"{'gemm':<12} {'case':<7} {'M x K x N':>16} | " + " ".join(f"{c:>14}" for c in cols))
        for r in out["gemm"]:
            dims = f"{r['m']}x{r['k']}x{r['n']}"
            print(f"{r['gemm']:<12} {r['case']:<7} {dims:>16} | "
                  + " ".join(f"{r['gflops'][c]:14.0f}" for c in cols))
        tot = {c: sum(r["ms"][c] for r in out["gemm"] if r["gemm"] != "square") for c in cols}
        print(f"{'sum of the projection GEMMs, ms':<37} | "
              + " ".join(f"{tot[c]:14.1f}" for c in cols))
    if out["train"]:
        res = out["train"]["results"]
        print(f"\ntrain step ({out['train']['tokens_per_step']} tokens/step), median of "
              f"{next(iter(res.values()))['n_steps']} steps each")
        for c in cols:
            if c in res:
                r = res[c]
                vs = f"  {r['vs_torch']:.3f}x torch" if "vs_torch" in r else ""
                print(f"  {c:<15} {r['step_ms']:8.1f} ms  {r['tokens_per_s']:9,.0f} tokens/s{vs}")


def markdown(out: dict[str, Any]) -> str:
    """The GEMM and train-step tables as markdown (for benchmarks/README.md)."""
    cols = list(out["blas"]) + (["torch"] if out["torch"] else [])
    lines = []
    if out["gemm"]:
        lines += ["| GEMM | case | M x K x N | " + " | ".join(cols) + " |",
                  "|---|---|---|" + "---:|" * len(cols)]
        for r in out["gemm"]:
            lines.append(f"| {r['gemm']} | {r['case']} | {r['m']}x{r['k']}x{r['n']} | "
                         + " | ".join(f"{r['gflops'][c]:.0f}" for c in cols) + " |")
        tot = {c: sum(r["ms"][c] for r in out["gemm"] if r["gemm"] != "square") for c in cols}
        lines.append("| all 18 projection GEMMs | ms | | "
                     + " | ".join(f"{tot[c]:.1f}" for c in cols) + " |")
    if out["train"]:
        res = out["train"]["results"]
        lines += ["", "| train step with | median ms | tokens/s | vs torch |", "|---|---:|---:|---:|"]
        for c in cols:
            if c in res:
                r = res[c]
                vs = f"{r['vs_torch']:.2f}x" if "vs_torch" in r else "1"
                lines.append(f"| {c} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {vs} |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(tt.PRESETS), default="reference")
    p.add_argument("--blas", default=",".join(KINDS),
                   help=f"comma-separated candidates (default: {','.join(KINDS)}; missing ones "
                        f"are reported and skipped)")
    p.add_argument("--iters", type=int, default=10, help="timed GEMM calls per round (0: skip)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    p.add_argument("--train-steps", type=int, default=10,
                   help="timed train steps per candidate per round (0: skip the train step)")
    p.add_argument("--warmup", type=int, default=2, help="untimed train steps per candidate")
    p.add_argument("--threads", type=int, help="torch threads (default: all CPUs)")
    p.add_argument("--no-torch", action="store_true", help="no PyTorch reference columns")
    p.add_argument("--json", metavar="OUT.json")
    p.add_argument("--markdown", action="store_true", help="also print the tables as markdown")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.iters < 0 or args.train_steps < 0 or args.warmup < 1:
        p.error("--repeats, --warmup >= 1; --iters, --train-steps >= 0")
    return main_run(args)


def main_run(args: argparse.Namespace) -> dict[str, Any]:
    out = run(args)
    if args.markdown:
        print(markdown(out))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
