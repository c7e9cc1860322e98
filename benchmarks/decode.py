"""Decode throughput: tfm_jax's KV-cache decoder vs a PyTorch KV-cache peer, side by side.

Both decode the *same* model (same weights: tfm_jax's random init exported through
:mod:`tfm_jax.tools.export` into :class:`benchmarks.torch_peer.TorchLM`) greedily from the same prompt
of ``--context`` tokens per row, ``--batch`` rows. Only decoding is timed (prefill excluded,
reported apart): tokens/s = batch x new tokens / decode seconds. tfm_jax is timed twice: its
compiled decode loop (:func:`tfm_jax.generate.generate`, what ``tfm-jax generate`` runs; the
headline figure) and one jitted ``Decoder.step`` call per token from Python (a host round trip
per token, as the eager peer works). The first new ids of both
implementations are compared (greedy decoding of the same weights must agree until fp32
rounding flips a near-tie; the agreement is reported).

Next to each measured time per decode step the *memory-traffic bound*: a decode step must read
every weight once plus each row's K/V cache, so ``step >= (weight bytes + KV bytes) / bandwidth``.
The bandwidth is measured here, in the same run, as the read rate of a jitted sum over (a) a
1 GiB array (DRAM) and (b) an array of the step's working-set size (which may sit in cache);
the bound is reported for both. Ratio = measured step / bound: 1.0 would be bandwidth-bound.

    python -m benchmarks.decode                                   # reference shape, ctx 1024, b1
    python -m benchmarks.decode --batch 16 --context 1024 --json out.json
    python -m benchmarks.decode --kv-heads 8 --context 4096 --no-torch
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

os.environ.setdefault("JAX_PLATFORMS", "cpu")   # no effect if jax was already imported
_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.train_throughput import machine_info, make_jax_config  # noqa: E402
from tfm_jax.platform import backends  # noqa: E402
from tfm_jax.config import param_counts  # noqa: E402
from tfm_jax.model import TransformerLM  # noqa: E402

REFERENCE = dict(d_model=256, layers=4, heads=8, kv_heads=2, vocab=264, ffn_hidden=768)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=REFERENCE["d_model"])
    p.add_argument("--layers", type=int, default=REFERENCE["layers"])
    p.add_argument("--heads", type=int, default=REFERENCE["heads"])
    p.add_argument("--kv-heads", type=int, default=REFERENCE["kv_heads"])
    p.add_argument("--vocab", type=int, default=REFERENCE["vocab"])
    p.add_argument("--ffn-hidden", type=int, default=REFERENCE["ffn_hidden"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=1024, help="prompt tokens per row")
    p.add_argument("--new-tokens", type=int, default=64, help="timed decode steps")
    p.add_argument("--kv-cache", choices=["none", "int8", "fp8"], default="none",
                   help="tfm_jax's KV-cache quantization (the peer is always fp32)")
    p.add_argument("--repeats", type=int, default=1, help="interleaved jax/torch rounds")
    p.add_argument("--no-torch", action="store_true", help="tfm_jax only")
    p.add_argument("--json", metavar="PATH", help="also write the results here")
    return p.parse_args(argv)


def model_config(args: argparse.Namespace):
    shape = dict(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers,
                 n_heads=args.heads, n_kv_heads=args.kv_heads,
                 head_dim=args.d_model // args.heads, ffn_hidden=args.ffn_hidden)
    cfg, note = make_jax_config(shape, seq=args.context + args.new_tokens, batch=args.batch,
                                total_steps=1)
    if note:
        print(note)
    return cfg.replace(**{"quant.kv_cache": args.kv_cache}), shape


# --------------------------------------------------------------------------------------------
# Memory bandwidth (same run, same machine state).


def read_bandwidth(nbytes: int, seconds: float = 0.5) -> float:
    """Bytes/s of a jitted float32 sum over an array of ``nbytes`` (best of repeated reads)."""
    n = max(nbytes // 4, 1024)
    x = jnp.ones((n,), jnp.float32)
    f = jax.jit(jnp.sum)
    f(x).block_until_ready()
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 4 * n / best


def traffic_bytes(cfg, batch: int, context: int, kv_bytes_per_elem: float) -> dict[str, int]:
    """Bytes one decode step must read: every matmul weight once (the embedding is a gather:
    ``batch`` rows), and each row's K/V for ``context`` positions in every layer."""
    m = cfg.model
    weights = 4 * (param_counts(m)["matmul"] + batch * m.d_model)
    kv = int(2 * m.n_layers * m.n_kv_heads * m.resolved_head_dim * context * batch
             * kv_bytes_per_elem)
    return {"weights": weights, "kv": kv, "total": weights + kv}


# --------------------------------------------------------------------------------------------
# tfm_jax


def bench_jax(cfg, context: int, batch: int, new_tokens: int) -> dict[str, Any]:
    """tfm_jax's decode speed (:func:`tfm_jax.generate.decode_speed`, same random prompts as
    the peer's), with the model's random init (returned for the peer)."""
    from tfm_jax.generate import decode_speed

    ops = backends.resolve_ops(cfg, jax.devices()[:1])
    model = TransformerLM(cfg.model, ops=ops)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    r = decode_speed(model, variables, batch=batch, context=context, new_tokens=new_tokens,
                     kv_cache=cfg.quant.kv_cache, per_step=True)
    r["kernels"] = ops.describe()
    r["variables"] = variables
    return r


# --------------------------------------------------------------------------------------------
# The run


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg, shape = model_config(args)
    # the prompts decode_speed draws (seed 0), for the peer
    prompt = np.random.default_rng(0).integers(0, shape["vocab_size"], (args.batch, args.context),
                                               dtype=np.int32)
    kv_elem = {"none": 4, "int8": 1, "fp8": 1}[args.kv_cache]
    traffic = traffic_bytes(cfg, args.batch, args.context, kv_elem)
    bw = {"dram": read_bandwidth(1 << 30), "working_set": read_bandwidth(traffic["total"])}
    res: dict[str, Any] = {"shape": shape, "batch": args.batch, "context": args.context,
                           "new_tokens": args.new_tokens, "kv_cache": args.kv_cache,
                           "machine": machine_info(), "bandwidth_bytes_per_s": bw,
                           "traffic_bytes_per_step": traffic}
    jax_runs, torch_runs = [], []
    for _ in range(args.repeats):
        jr = bench_jax(cfg, args.context, args.batch, args.new_tokens)
        variables = jr.pop("variables")
        jax_runs.append(jr)
        if not args.no_torch:
            torch_runs.append(_bench_torch(cfg, variables, prompt, args.new_tokens))
    res["tfm_jax"] = _summary(jax_runs, traffic, bw)
    if torch_runs:
        res["torch"] = _summary(torch_runs, traffic, bw)
        # the headline: the median over rounds of each round's ratio (the two ran back to back,
        # so a round shares the machine's state), with the range of the rounds
        rounds = [j["tokens_per_s"] / t["tokens_per_s"] for j, t in zip(jax_runs, torch_runs)]
        res["ratio_rounds"] = rounds
        res["ratio"] = statistics.median(rounds)
        res["ratio_per_step"] = statistics.median(
            j["per_step_tokens_per_s"] / t["tokens_per_s"] for j, t in zip(jax_runs, torch_runs))
        a, t = jax_runs[-1]["ids"], torch_runs[-1]["ids"]
        same = (a == t).all(axis=0)
        res["greedy_agreement"] = {"first_mismatch_step": int(np.argmin(same)) if not same.all()
                                   else None, "steps_compared": int(a.shape[1])}
    return res


def _bench_torch(cfg, variables, prompt: np.ndarray, new_tokens: int) -> dict[str, Any]:
    import torch

    from benchmarks.torch_peer import TorchLM, bench_torch_decode, load_numpy_weights
    from tfm_jax.tools.export import export_canonical

    m = cfg.model
    model = TorchLM(m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads,
                    m.resolved_head_dim, m.resolved_ffn_hidden, m.rope_theta, m.norm_eps)
    load_numpy_weights(model, export_canonical(variables["params"], m))
    r = bench_torch_decode(model, torch.from_numpy(prompt.astype(np.int64)), new_tokens)
    r["kernels"] = f"torch {torch.__version__}, {r['threads']} threads"
    return r


def _summary(runs: list[dict[str, Any]], traffic: dict[str, int], bw: dict[str, float]
             ) -> dict[str, Any]:
    best = max(runs, key=lambda r: r["tokens_per_s"])
    step_s = best["step_ms"] / 1e3
    out = {k: v for k, v in best.items() if k != "ids"}
    out["tokens_per_s_runs"] = [r["tokens_per_s"] for r in runs]
    out["tokens_per_s_median"] = statistics.median(out["tokens_per_s_runs"])
    out["bound_ms"] = {k: 1e3 * traffic["total"] / v for k, v in bw.items()}
    out["step_over_bound"] = {k: step_s / (traffic["total"] / v) for k, v in bw.items()}
    return out


def print_report(res: dict[str, Any]) -> None:
    s, tr, bw = res["shape"], res["traffic_bytes_per_step"], res["bandwidth_bytes_per_s"]
    print(f"decode: d{s['d_model']} x {s['n_layers']}L, {s['n_heads']} heads / "
          f"{s['n_kv_heads']} kv heads, vocab {s['vocab_size']}; batch {res['batch']}, context "
          f"{res['context']}, {res['new_tokens']} new tokens (greedy), kv cache {res['kv_cache']}")
    print(f"bytes per step: weights {tr['weights'] / 2**20:.1f} MiB + KV {tr['kv'] / 2**20:.1f} "
          f"MiB; read bandwidth {bw['dram'] / 1e9:.1f} GB/s (1 GiB array), "
          f"{bw['working_set'] / 1e9:.1f} GB/s (working-set-sized array)")
    for name in ("tfm_jax", "torch"):
        if name not in res:
            continue
        r = res[name]
        print(f"  {name:8s} {r['tokens_per_s']:9,.0f} tokens/s best, "
              f"{r['tokens_per_s_median']:,.0f} median of {len(r['tokens_per_s_runs'])}  "
              f"{r['step_ms']:7.2f} ms/step  "
              f"bound {r['bound_ms']['dram']:.2f} ms (DRAM) / {r['bound_ms']['working_set']:.2f} "
              f"ms (cache)  step/bound {r['step_over_bound']['dram']:.1f}x  prefill "
              f"{r['prefill_s']:.2f} s  [{r['kernels']}]")
        if "per_step_tokens_per_s" in r:
            print(f"  {'':8s} {r['per_step_tokens_per_s']:9,.0f} tokens/s  "
                  f"{r['per_step_ms']:7.2f} ms/step  (one Decoder.step call per token from "
                  f"Python, a host round trip each)")
    if "ratio" in res:
        g = res["greedy_agreement"]
        agree = ("all steps" if g["first_mismatch_step"] is None
                 else f"first {g['first_mismatch_step']} steps")
        rounds = res["ratio_rounds"]
        print(f"  tfm_jax / torch: {res['ratio']:.2f}x (compiled loop; median of {len(rounds)} "
              f"interleaved rounds, range {min(rounds):.2f}-{max(rounds):.2f}), "
              f"{res['ratio_per_step']:.2f}x (per-step calls); greedy ids agree for {agree} "
              f"of {g['steps_compared']}")


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    res = run(args)
    print_report(res)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(res, indent=2, default=float))
        print(f"wrote {args.json}")
    return res


if __name__ == "__main__":
    main()
