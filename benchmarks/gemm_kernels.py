"""Single-thread sgemm rates of the native kernels' candidates on the calls one train step makes:
OpenBLAS (scipy-openblas32, the default install) vs MKL (the ``[mkl]`` extra).

Every candidate is called through ``ctypes`` with cblas_sgemm's arguments exactly as the kernels
pass them (row-major, one thread, the same leading dimensions, beta = 1 where they accumulate):

* projections (``tfm_gemm``): ``fwd`` y = x W, ``dX`` dy W^T, ``dW`` x^T dy for every projection
  of the preset's model, with M the row chunk one pool thread gets (``--threads``, default the
  CPU count, rounded to 64 rows as ``Gemm`` in ``cpu_kernels.cc`` does);
* attention (``tfm_attn_fwd``/``_bwd``): per (batch, kv head) and query block of ``--block``
  rows, the G query heads' tiles: ``S``/``dP`` = Q K^T (K = head_dim, K/V rows strided by
  kv_heads * head_dim), ``PV``/``dQ``, ``dV``/``dK`` = P^T dO (beta = 1).

Correctness first (each candidate against float64 numpy), then ``--rounds`` interleaved rounds
(openblas, mkl, openblas, ...); each timing is the *thread CPU time* of a batch of calls
of ~``--flops`` (a process descheduled by the shared machine's other load does not count). The
table gives the best round (the closest to what the core does; load only ever slows a call down)
and the ``step`` line the time of one train step's calls, each shape weighted by how often a
step makes it. Per-call ctypes overhead (~1 us) is in every column alike.

    python -m benchmarks.gemm_kernels                         # reference preset
    python -m benchmarks.gemm_kernels --rounds 40 --json gemm.json --markdown
    python -m benchmarks.gemm_kernels --blas openblas,mkl --only attn
"""

from __future__ import annotations

import argparse
import ctypes
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

import numpy as np  # noqa: E402

from benchmarks import blas_compare  # noqa: E402
from benchmarks import train_throughput as tt  # noqa: E402
from tfm_jax.platform.kernels import cpu  # noqa: E402

KINDS = ("openblas", "mkl")
REF = "openblas"          # the ratio columns: time / the default install's
ROW, N_, T_ = 101, 111, 112


def _sgemm(blas: cpu.Blas):
    i = ctypes.c_int64 if blas.ilp64 else ctypes.c_int32
    return ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_int, ctypes.c_int, i, i, i,
                            ctypes.c_float, ctypes.c_void_p, i, ctypes.c_void_p, i,
                            ctypes.c_float, ctypes.c_void_p, i)(blas.sgemm)


def _row_chunk(m: int, threads: int) -> int:
    """Rows per call of ``Gemm`` in cpu_kernels.cc: one chunk per pool thread, multiples of 64."""
    parts = max(1, min(threads, m // 32))
    return min(m, ((m + parts - 1) // parts + 63) // 64 * 64)


def step_calls(shape: dict[str, int], seq: int, batch: int, threads: int,
               block: int) -> list[dict[str, Any]]:
    """Every distinct sgemm call of one train step: group, name, transposes, m, n, k, leading
    dimensions, beta and how many times a step makes it."""
    tokens, d, f, L = batch * seq, shape["d_model"], shape["ffn_hidden"], shape["n_layers"]
    hd, h, hkv = shape["head_dim"], shape["n_heads"], shape["n_kv_heads"]
    out = []

    def add(group, name, ta, tb, m, n, k, lda, ldb, ldc, beta=0.0, count=1):
        out.append(dict(group=group, name=name, ta=ta, tb=tb, m=m, n=n, k=k, lda=lda, ldb=ldb,
                        ldc=ldc, beta=beta, count=count))

    # (name, in, out, how many such projections a step runs)
    projs = [("q", d, h * hd, L), ("k/v", d, hkv * hd, 2 * L), ("o", h * hd, d, L),
             ("gate/up", d, f, 2 * L), ("down", f, d, L), ("lm_head", d, shape["vocab_size"], 1)]
    mc = _row_chunk(tokens, threads)
    for name, k_in, n_out, per in projs:
        calls = -(-tokens // mc)                  # row chunks of the token axis
        # fwd y = x W: (tokens, in) @ (in, out)
        add("proj", f"fwd {name}", False, False, mc, n_out, k_in, k_in, n_out, n_out,
            count=per * calls)
        # dX = dy W^T: (tokens, out) @ (in, out)^T
        add("proj", f"dX {name}", False, True, mc, k_in, n_out, n_out, n_out, k_in,
            count=per * calls)
        # dW = x^T dy: the `in` features are the rows (chunked), contracting all tokens
        mw = _row_chunk(k_in, threads)
        add("proj", f"dW {name}", True, False, mw, n_out, tokens, k_in, n_out, n_out,
            count=per * -(-k_in // mw))
    g, ld = h // hkv, hkv * hd
    tasks = batch * hkv * L
    for t0 in range(0, seq, block):
        rows = min(seq, t0 + block) - t0
        end, mq = t0 + rows, g * rows
        add("attn", f"S/dP end {end}", False, True, mq, end, hd, hd, ld, end, count=3 * tasks)
        add("attn", f"PV/dQ end {end}", False, False, mq, hd, end, end, ld, hd, count=2 * tasks)
        add("attn", f"dV/dK end {end}", True, False, end, hd, mq, end, hd, ld, beta=1.0,
            count=2 * tasks)
    return out


def _arrays(rng, c: dict[str, Any]):
    a = rng.standard_normal(((c["k"] if c["ta"] else c["m"]), c["lda"])).astype(np.float32)
    b = rng.standard_normal(((c["n"] if c["tb"] else c["k"]), c["ldb"])).astype(np.float32)
    out = rng.standard_normal((c["m"], c["ldc"])).astype(np.float32)
    return a, b, out


def _run(fn, c, a, b, out) -> None:
    fn(ROW, T_ if c["ta"] else N_, T_ if c["tb"] else N_, c["m"], c["n"], c["k"], 1.0,
       a.ctypes.data, c["lda"], b.ctypes.data, c["ldb"], c["beta"], out.ctypes.data, c["ldc"])


def _check(kind, fn, c, a, b, out) -> None:
    """One call against float64 numpy (C's first n columns; the rest must stay untouched)."""
    m, n, k = c["m"], c["n"], c["k"]
    opa = (a[:, :m].T if c["ta"] else a[:, :k]).astype(np.float64)
    opb = (b[:, :k].T if c["tb"] else b[:, :n]).astype(np.float64)
    got = out.copy()
    _run(fn, c, a, b, got)
    ref = opa @ opb + c["beta"] * out[:, :n]
    bound = np.abs(opa) @ np.abs(opb) + abs(c["beta"]) * np.abs(out[:, :n])
    err = float(np.max(np.abs(got[:, :n] - ref) / bound))
    if err > 1e-5 or not np.array_equal(got[:, n:], out[:, n:]):
        raise AssertionError(f"{kind}: {c['name']} is wrong (max relative error {err:.2e})")


def run(args: argparse.Namespace) -> dict[str, Any]:
    wanted = [k.strip() for k in args.blas.split(",") if k.strip()]
    bad = [k for k in wanted if k not in KINDS]
    if bad:
        raise SystemExit(f"--blas: unknown {bad}; choose from {', '.join(KINDS)}")
    cpu.load()                                      # builds the library
    blases, missing = blas_compare.open_candidates(wanted)
    if not blases:
        raise SystemExit(f"nothing to measure: {missing}")
    fns = {kind: _sgemm(b) for kind, b in blases.items()}
    shape, seq, batch = tt.resolve_shape(tt.parse_args(["--preset", args.preset]))
    shape["vocab_size"] = args.vocab
    calls = [c for c in step_calls(shape, seq, batch, args.threads, args.block)
             if args.only in ("all", c["group"])]
    rng = np.random.default_rng(0)
    rows = []
    for c in calls:
        a, b, out = _arrays(rng, c)
        for kind, fn in fns.items():
            _check(kind, fn, c, a, b, out)
        flops = 2.0 * c["m"] * c["n"] * c["k"]
        reps = max(1, int(args.flops / flops))
        times: dict[str, list[float]] = {kind: [] for kind in fns}
        for _ in range(args.rounds):
            for kind, fn in fns.items():
                _run(fn, c, a, b, out)              # warm (caches, packing buffers)
                t0 = time.thread_time()
                for _ in range(reps):
                    _run(fn, c, a, b, out)
                times[kind].append((time.thread_time() - t0) / reps)
        rows.append({**c, "flops": flops,
                     "best_us": {k: 1e6 * min(v) for k, v in times.items()},
                     "median_us": {k: 1e6 * statistics.median(v) for k, v in times.items()}})
        if args.verbose:
            print(_line(rows[-1], list(fns)), flush=True)
    res = {"preset": args.preset, "shape": shape, "seq": seq, "batch": batch,
           "threads": args.threads, "block": args.block, "rounds": args.rounds,
           "date": time.strftime("%Y-%m-%d"), "machine": tt.machine_info(),
           "blas": {k: b.describe() for k, b in blases.items()}, "missing": missing,
           "calls": rows}
    print_report(res)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(res, indent=1))
        print(f"wrote {args.json}")
    if args.markdown:
        print(markdown(res))
    return res


def _gflops(r, kind, stat="best_us"):
    return r["flops"] / r[stat][kind] / 1e3


def _line(r, cols) -> str:
    dims = f"{r['m']}x{r['n']}x{r['k']}"
    op = ("T" if r["ta"] else "N") + ("T" if r["tb"] else "N")
    return (f"{r['name']:<16} {op} {dims:>14} x{r['count']:<4} | "
            + " ".join(f"{_gflops(r, c):9.1f}" for c in cols) + _ratios(r, cols))


def _ratios(r, cols) -> str:
    if REF not in cols:
        return ""
    return " | " + " ".join(f"{r['best_us'][c] / r['best_us'][REF]:6.2f}"
                            for c in cols if c != REF)


def step_totals(res: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{group: {kind: ms of one step's calls}} from the best rounds, plus "all"."""
    out: dict[str, dict[str, float]] = {}
    for r in res["calls"]:
        for g in (r["group"], "all"):
            for k, us in r["best_us"].items():
                out.setdefault(g, {}).setdefault(k, 0.0)
                out[g][k] += us * r["count"] / 1e3
    return out


def print_report(res: dict[str, Any]) -> None:
    m = res["machine"]
    cols = list(res["blas"])
    print(f"\n{res['date']}, {m['cpu_model']}, {m['cpu_count']} CPUs; preset {res['preset']}, "
          f"row chunks for {res['threads']} pool threads; best of {res['rounds']} interleaved "
          f"rounds, thread CPU time, one thread per call")
    for k, d in res["blas"].items():
        print(f"  {k:<9} {d}")
    for k, why in res["missing"].items():
        print(f"  {k:<9} not measured: {why}")
    others = [c for c in cols if c != REF]
    head = (f"{'call':<16} op {'M x N x K':>14} {'/step':<5} | "
            + " ".join(f"{c:>9}" for c in cols) + " GFLOP/s")
    if REF in cols and others:
        head += " | " + " ".join(f"{c[:6]:>6}" for c in others) + f" time / {REF}'s"
    print(head)
    for r in res["calls"]:
        print(_line(r, cols))
    for g, tot in step_totals(res).items():
        ratio = ""
        if REF in tot and others:
            ratio = " | " + " ".join(f"{tot[c] / tot[REF]:6.2f}" for c in others)
        print(f"{'one step, ' + g + ', ms':<39} | "
              + " ".join(f"{tot[c]:9.2f}" for c in cols) + ratio)


def markdown(res: dict[str, Any]) -> str:
    cols = list(res["blas"])
    lines = ["| call | op | M x N x K | per step | " + " | ".join(cols) + " |",
             "|---|---|---|---:|" + "---:|" * len(cols)]
    for r in res["calls"]:
        op = ("T" if r["ta"] else "N") + ("T" if r["tb"] else "N")
        lines.append(f"| {r['name']} | {op} | {r['m']}x{r['n']}x{r['k']} | {r['count']} | "
                     + " | ".join(f"{_gflops(r, c):.0f}" for c in cols) + " |")
    for g, tot in step_totals(res).items():
        lines.append(f"| one step ({g}), ms | | | | " + " | ".join(f"{tot[c]:.1f}" for c in cols)
                     + " |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(tt.PRESETS), default="reference")
    p.add_argument("--vocab", type=int, default=264,
                   help="LM head width (default 264: the byte tokenizer's padded vocabulary)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="XLA pool threads the projection rows are split over (default: CPUs)")
    p.add_argument("--block", type=int, default=64, help="attention query block (attn_block_q)")
    p.add_argument("--blas", default=",".join(KINDS),
                   help=f"comma-separated candidates (default {','.join(KINDS)}; missing ones "
                        f"are reported and skipped)")
    p.add_argument("--only", choices=("all", "proj", "attn"), default="all")
    p.add_argument("--rounds", type=int, default=30, help="interleaved rounds (best is kept)")
    p.add_argument("--flops", type=float, default=2e7, help="work per timed batch of calls")
    p.add_argument("--json", metavar="OUT.json")
    p.add_argument("--markdown", action="store_true", help="also print the table as markdown")
    p.add_argument("-v", "--verbose", action="store_true", help="print each row as it is done")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.threads < 1 or args.block < 1 or args.flops <= 0:
        p.error("--rounds, --threads, --block >= 1; --flops > 0")
    return run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
