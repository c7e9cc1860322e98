"""Training throughput: tfm_jax (jit, one CPU device) vs the PyTorch eager peer, side by side.

Both frameworks train the *same* decoder-only LM (pre-RMSNorm, RoPE, GQA, SwiGLU, untied
embeddings, fp32) with the same AdamW (lr 3e-4, b1 0.9, b2 0.95, eps 1e-8, wd 0.1), no gradient
clipping, no gradient accumulation, on one fixed random batch reused every step. The machine is
noisy, so the runs are interleaved (jax, torch, jax, torch, ... for ``--repeats``) and medians
over all timed steps are reported (plus the best step, the least noise-affected figure). MFU
uses one denominator for both: the *machine fp32 matmul peak*, the largest of jax's and torch's
n x n matmul rates, re-measured before every round. FLOPs follow the PaLM convention (full T x T
attention), so an implementation that skips the causal half can exceed 100% "MFU".

    python -m benchmarks.train_throughput                          # reference preset
    python -m benchmarks.train_throughput --preset large --steps 10
    python -m benchmarks.train_throughput --d-model 128 --layers 2 --no-torch --json out.json

This is a CPU benchmark: ``JAX_PLATFORMS`` defaults to ``cpu`` when this module is imported
before jax (the torch peer runs on CPU), and exactly one jax device is used even if
``XLA_FLAGS`` fakes several (the test suite does).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Any, Optional

os.environ.setdefault("JAX_PLATFORMS", "cpu")   # no effect if jax was already imported
_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:          # `python benchmarks/train_throughput.py` finds the torch peer
    sys.path.insert(0, _ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from tfm_jax.platform import backends  # noqa: E402
from tfm_jax.config import (BYTE_VOCAB_SIZE, CONFIG_DIR, Config, ConfigError,  # noqa: E402
                            load_config)
from tfm_jax.model import count_params, train_flops_per_token  # noqa: E402
from tfm_jax.train import build  # noqa: E402

BASE_CONFIG = "tiny.yaml"   # in tfm_jax.config.CONFIG_DIR
# Vocab used for BOTH peers if tfm_jax's config refuses a vocab below the byte tokenizer's ids.
FALLBACK_VOCAB = 264

PRESETS: dict[str, dict[str, int]] = {
    "reference": dict(d_model=256, layers=4, heads=8, kv_heads=2, seq=256, batch=8, vocab=256,
                      ffn_hidden=768),
    "large": dict(d_model=512, layers=8, heads=8, kv_heads=2, seq=512, batch=8, vocab=256,
                  ffn_hidden=1536),
}

# AdamW as in benchmarks/torch_peer.bench_torch_train (its betas/eps/wd are hard-coded there).
OPTIMIZER = dict(lr=3e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)


# --------------------------------------------------------------------------------------------
# Shape and configs.


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="tfm_jax vs PyTorch eager training throughput (fp32, CPU)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="reference",
                   help="base shape; the shape flags below override its fields")
    p.add_argument("--d-model", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--kv-heads", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--vocab", type=int)
    p.add_argument("--ffn-hidden", type=int,
                   help="SwiGLU hidden width (default: the preset's; 3*d_model if d_model is "
                        "overridden)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per framework per repeat")
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed steps first (jax: the first one compiles); >= 1")
    p.add_argument("--repeats", type=int, default=1,
                   help="interleaved rounds (jax then torch each round)")
    p.add_argument("--no-torch", action="store_true", help="tfm_jax only")
    p.add_argument("--kernels", choices=["auto", "native", "xla"], default="auto",
                   help="tfm_jax's backend.cpu_kernels (xla: XLA's ops only, the pre-kernel path)")
    p.add_argument("--peak-n", type=int, default=1024, help="matmul size for the fp32 peak")
    p.add_argument("--json", metavar="OUT.json", help="also write the results here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 1 or args.repeats < 1:
        p.error("--steps, --warmup and --repeats must be >= 1")
    return args


def resolve_shape(args: argparse.Namespace) -> tuple[dict[str, int], int, int]:
    """(TorchLM kwargs, seq_len, batch) from the preset plus explicit flags."""
    s = dict(PRESETS[args.preset])
    for key in ("d_model", "layers", "heads", "kv_heads", "seq", "batch", "vocab", "ffn_hidden"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    if args.ffn_hidden is None and args.d_model is not None:
        s["ffn_hidden"] = 3 * s["d_model"]
    if s["d_model"] % s["heads"]:
        raise SystemExit(f"--d-model {s['d_model']} is not divisible by --heads {s['heads']}")
    shape = dict(vocab_size=s["vocab"], d_model=s["d_model"], n_layers=s["layers"],
                 n_heads=s["heads"], n_kv_heads=s["kv_heads"],
                 head_dim=s["d_model"] // s["heads"], ffn_hidden=s["ffn_hidden"])
    return shape, s["seq"], s["batch"]


def jax_config(shape: dict[str, int], seq: int, batch: int, total_steps: int) -> Config:
    """configs/tiny.yaml with every field that matters for the comparison set explicitly."""
    ov: dict[str, Any] = {
        "model.vocab_size": shape["vocab_size"],
        "model.d_model": shape["d_model"],
        "model.n_layers": shape["n_layers"],
        "model.n_heads": shape["n_heads"],
        "model.n_kv_heads": shape["n_kv_heads"],
        "model.head_dim": shape["head_dim"],
        "model.ffn_type": "swiglu",
        "model.ffn_hidden": shape["ffn_hidden"],
        "model.norm": "rmsnorm",
        "model.norm_position": "pre",
        "model.norm_eps": 1e-6,
        "model.rope_theta": 10000.0,
        "model.tie_embeddings": False,
        "model.dtype": "float32",
        "model.param_dtype": "float32",
        "model.scan_layers": False,
        "model.remat": "none",
        "data.seq_len": seq,
        "train.batch_size": batch,
        "train.grad_accum": 1,
        "train.grad_clip": 0.0,           # the torch peer does not clip
        "train.steps": max(total_steps, 1),
        "train.warmup_steps": 0,
        "train.lr": OPTIMIZER["lr"],
        "train.b1": OPTIMIZER["b1"],
        "train.b2": OPTIMIZER["b2"],
        "train.eps": OPTIMIZER["eps"],
        "train.weight_decay": OPTIMIZER["weight_decay"],
        "mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1, "mesh.expert": 1,
        "run.tensorboard": False,
        "run.progress": False,
    }
    if shape["vocab_size"] < BYTE_VOCAB_SIZE:
        ov["data.tokenizer"] = "none"     # token ids come from us, not the byte tokenizer
    return load_config(str(CONFIG_DIR / BASE_CONFIG)).replace(**ov)


def make_jax_config(shape: dict[str, int], seq: int, batch: int, total_steps: int
                    ) -> tuple[Config, Optional[str]]:
    """The config, or (if vocab < 259 is refused) the config at FALLBACK_VOCAB with a note;
    ``shape`` is updated in place so the torch peer gets the same vocab."""
    try:
        return jax_config(shape, seq, batch, total_steps), None
    except ConfigError as err:
        if shape["vocab_size"] >= BYTE_VOCAB_SIZE:
            raise
        note = (f"NOTE: tfm_jax's config refuses model.vocab_size={shape['vocab_size']} "
                f"({str(err).splitlines()[-1].strip()}); BOTH models use vocab "
                f"{FALLBACK_VOCAB} instead (token ids still drawn from [0, "
                f"{shape['vocab_size']}))")
        shape["vocab_size"] = FALLBACK_VOCAB
        return jax_config(shape, seq, batch, total_steps), note


# --------------------------------------------------------------------------------------------
# Timing.


class JaxBench:
    """Compiled tfm_jax train step on one device, a fixed batch, and the evolving state."""

    def __init__(self, cfg: Config, token_high: int):
        self.cfg = cfg
        self.device = jax.devices()[0]
        self.setup = build(cfg, devices=[self.device])
        t = cfg.data.seq_len
        b = cfg.train.batch_size
        data = np.random.default_rng(1234).integers(0, token_high, (b, t + 1), dtype=np.int32)
        host = {"inputs": np.ascontiguousarray(data[:, :-1]),
                "targets": np.ascontiguousarray(data[:, 1:]),
                "mask": np.ones((b, t), np.float32)}
        with self.setup.context():
            self.state = self.setup.init_state()
            self.batch = self.setup.shard_batch(host)
        self.n_params = int(sum(x.size for x in jax.tree.leaves(self.state.params)))
        self.first_step_s: Optional[float] = None
        self.last_loss = float("nan")

    def _steps(self, n: int) -> list[float]:
        times = []
        with self.setup.context():
            for _ in range(n):
                t0 = time.perf_counter()
                self.state, metrics = self.setup.train_step(self.state, self.batch)
                jax.block_until_ready(metrics["loss"])
                times.append(time.perf_counter() - t0)
        jax.block_until_ready(self.state)
        self.last_loss = float(metrics["loss"])
        if not math.isfinite(self.last_loss):
            raise FloatingPointError(f"tfm_jax loss is {self.last_loss}")
        return times

    def run(self, steps: int, warmup: int) -> list[float]:
        """``warmup`` untimed steps (the very first includes compilation), then ``steps`` timed
        steps; returns their wall times in seconds."""
        warm = self._steps(warmup)
        if self.first_step_s is None:
            self.first_step_s = warm[0]
        return self._steps(steps)


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def _loadavg() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def machine_info() -> dict[str, Any]:
    model_name = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model_name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    dev = jax.devices()[0]
    return {"processor": platform.processor(), "cpu_model": model_name or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "jax": jax.__version__, "jax_platform": dev.platform,
            "jax_device_kind": dev.device_kind, "jax_devices_visible": jax.device_count(),
            "jax_devices_used": 1, "xla_flags": os.environ.get("XLA_FLAGS", "")}


# --------------------------------------------------------------------------------------------
# Main.


def run(args: argparse.Namespace) -> dict[str, Any]:
    shape, seq, batch = resolve_shape(args)
    load_before = _loadavg()
    token_high = min(shape["vocab_size"], 256)
    total = args.repeats * (args.warmup + args.steps)
    cfg, vocab_note = make_jax_config(shape, seq, batch, total)
    cfg = cfg.replace(**{"backend.cpu_kernels": args.kernels})
    if vocab_note:
        print(vocab_note, flush=True)

    flops_tok = train_flops_per_token(cfg.model, seq)
    threads = os.cpu_count() or 1
    peer = None
    if not args.no_torch:
        from benchmarks import torch_peer as peer   # imports torch
        import torch
        peer_flops = peer.train_flops_per_token(seq_len=seq, **shape)
        if not math.isclose(peer_flops, flops_tok, rel_tol=1e-12):
            raise AssertionError(f"FLOPs/token disagree: tfm_jax {flops_tok} vs torch peer "
                                 f"{peer_flops} for {shape}, seq {seq}")
        # (on CPU: the "meta" device would pull in torch._dynamo, seconds of import)
        torch_params = sum(p.numel() for p in peer.TorchLM(**shape).parameters())
    jax_params_formula = count_params(cfg.model)["total"]

    # Machine fp32 matmul peak, measured by both frameworks (torch with the bench's thread
    # count) before every round; noise only slows a matmul down, so the max is kept.
    peaks: dict[str, list[float]] = {"jax": [], "torch": []}
    if peer is not None:
        torch.set_num_threads(threads)

    def measure_peaks() -> None:
        # measured_matmul_peak is lru_cached: call the wrapped function to re-measure
        peaks["jax"].append(backends.measured_matmul_peak.__wrapped__(args.peak_n, "float32"))
        if peer is not None:
            peaks["torch"].append(peer.torch_matmul_peak_flops(n=args.peak_n))

    jb = JaxBench(cfg, token_high)
    if jb.n_params != jax_params_formula:
        raise AssertionError(f"tfm_jax parameter tree has {jb.n_params} elements but "
                             f"count_params says {jax_params_formula}")
    if peer is not None and torch_params != jb.n_params:
        raise AssertionError(f"models differ: tfm_jax {jb.n_params:,} params vs torch peer "
                             f"{torch_params:,}")

    jax_times: list[float] = []
    jax_round_ms: list[float] = []
    torch_times: list[float] = []
    torch_round_ms: list[float] = []
    torch_res: dict[str, Any] = {}
    for r in range(args.repeats):
        measure_peaks()
        t = jb.run(args.steps, args.warmup)
        jax_times += t
        jax_round_ms.append(1e3 * _median(t))
        print(f"[round {r + 1}/{args.repeats}] tfm_jax  median step {jax_round_ms[-1]:8.1f} ms"
              f"  (loss {jb.last_loss:.3f})", flush=True)
        if peer is not None:
            torch_res = peer.bench_torch_train(
                shape, batch, seq, steps=args.steps, warmup=args.warmup, threads=threads,
                lr=OPTIMIZER["lr"], compile=False)
            torch_times += [ms / 1e3 for ms in torch_res["step_ms_all"]]
            torch_round_ms.append(torch_res["step_ms"])
            print(f"[round {r + 1}/{args.repeats}] torch    median step "
                  f"{torch_round_ms[-1]:8.1f} ms", flush=True)

    tokens_step = batch * seq
    peak_jax = max(peaks["jax"])
    peak_torch = max(peaks["torch"]) if peaks["torch"] else None
    peak = max(p for p in (peak_jax, peak_torch) if p is not None)

    def summary(times: list[float], rounds: list[float]) -> dict[str, Any]:
        step_s = _median(times)
        tps = tokens_step / step_s
        return {"tokens_per_s": tps, "step_ms": 1e3 * step_s, "mfu": tps * flops_tok / peak,
                "best_step_ms": 1e3 * min(times), "best_tokens_per_s": tokens_step / min(times),
                "step_ms_rounds": rounds, "step_ms_all": [1e3 * x for x in times]}

    results: dict[str, Any] = {"tfm_jax": summary(jax_times, jax_round_ms)}
    med_step = results["tfm_jax"]["step_ms"] / 1e3
    results["tfm_jax"].update(
        n_params=jb.n_params, first_step_s=jb.first_step_s,
        compile_s=max(jb.first_step_s - med_step, 0.0), final_loss=jb.last_loss,
        device=str(jb.device))
    ratio = ratio_best = None
    if peer is not None:
        results["torch"] = summary(torch_times, torch_round_ms)
        results["torch"].update(n_params=torch_res["n_params"], threads=torch_res["threads"],
                                sdpa_gqa=bool(peer.USE_SDPA_GQA), compile=False)
        ratio = results["tfm_jax"]["tokens_per_s"] / results["torch"]["tokens_per_s"]
        ratio_best = (results["tfm_jax"]["best_tokens_per_s"]
                      / results["torch"]["best_tokens_per_s"])

    machine = machine_info()
    machine["loadavg_1min"] = {"start": load_before, "end": _loadavg()}
    if peer is not None:
        machine["torch"] = torch.__version__
        machine["torch_threads"] = threads
    overridden = [k for k in ("d_model", "layers", "heads", "kv_heads", "seq", "batch", "vocab",
                              "ffn_hidden") if getattr(args, k) is not None]
    out = {
        "preset": args.preset + (f" + overrides ({', '.join(overridden)})" if overridden else ""),
        "shape": dict(shape, seq_len=seq, batch_size=batch, tokens_per_step=tokens_step,
                      ffn_type="swiglu", norm="rmsnorm (pre)", rope=True, tied=False,
                      dtype="float32"),
        "optimizer": dict(OPTIMIZER, name="adamw", grad_clip=0.0, grad_accum=1),
        "vocab_note": vocab_note,
        "kernels": jb.setup.ops.name, "kernels_note": jb.setup.ops.describe(),
        "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
        "train_flops_per_token": flops_tok,
        "peak": {"jax_fp32_matmul": peak_jax, "torch_fp32_matmul": peak_torch,
                 "machine_fp32_matmul": peak, "n": args.peak_n,
                 "jax_all": peaks["jax"], "torch_all": peaks["torch"]},
        "machine": machine,
        "results": results,
        "ratio": ratio,
        "ratio_best_step": ratio_best,
    }
    print_report(out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json}")
    return out


def print_report(out: dict[str, Any]) -> None:
    s, m, pk, res = out["shape"], out["machine"], out["peak"], out["results"]
    g = lambda x: f"{x / 1e9:.1f} GFLOP/s" if x else "n/a"  # noqa: E731
    print()
    print("=" * 78)
    print(f"Training throughput, fp32 AdamW, preset '{out['preset']}'")
    print(f"shape: d_model {s['d_model']}, {s['n_layers']} layers, {s['n_heads']} heads "
          f"({s['n_kv_heads']} kv, head_dim {s['head_dim']}), SwiGLU ffn {s['ffn_hidden']}, "
          f"vocab {s['vocab_size']}, seq {s['seq_len']}, batch {s['batch_size']} "
          f"({s['tokens_per_step']} tokens/step)")
    if out["vocab_note"]:
        print(out["vocab_note"])
    print(f"tfm_jax kernels: {out['kernels_note']}")
    print(f"params: {res['tfm_jax']['n_params']:,} | train FLOPs/token "
          f"{out['train_flops_per_token'] / 1e6:.2f} M (PaLM convention, both peers agree)")
    proc = m["processor"] or "''"
    print(f"machine: processor {proc} ({m['cpu_model']}), {m['cpu_count']} CPUs | jax "
          f"{m['jax']} ({m['jax_platform']}, 1 of {m['jax_devices_visible']} device(s)) | torch "
          f"{m.get('torch', 'not run')}"
          + (f" ({m['torch_threads']} threads)" if "torch_threads" in m else "")
          + f" | 1-min load avg {m['loadavg_1min']['start']} -> {m['loadavg_1min']['end']}")
    print(f"fp32 matmul peak (n={pk['n']}, max of {len(pk['jax_all'])} measurement(s)): jax "
          f"{g(pk['jax_fp32_matmul'])}, torch {g(pk['torch_fp32_matmul'])} -> machine fp32 "
          f"matmul peak {g(pk['machine_fp32_matmul'])} (MFU denominator)")
    print(f"timing: {out['steps']} timed steps after {out['warmup']} warmup, "
          f"{out['repeats']} interleaved round(s); tokens/s, step ms, MFU: medians over all "
          "timed steps")
    print("-" * 78)
    print(f"{'framework':<10} | {'tokens/s':>10} | {'step ms':>9} | {'MFU':>6} | "
          f"{'best step ms':>12}")
    print(f"{'-' * 10}-+-{'-' * 10}-+-{'-' * 9}-+-{'-' * 6}-+-{'-' * 12}")
    for name, r in res.items():
        print(f"{name:<10} | {r['tokens_per_s']:>10,.0f} | {r['step_ms']:>9.1f} | "
              f"{100 * r['mfu']:>5.1f}% | {r['best_step_ms']:>12.1f}")
    print("-" * 78)
    if out["ratio"] is not None:
        print(f"ratio tfm_jax/torch tokens/s: {out['ratio']:.2f}x (medians; best steps: "
              f"{out['ratio_best_step']:.2f}x)")
    j = res["tfm_jax"]
    print(f"tfm_jax compile ~{j['compile_s']:.2f} s (first step {j['first_step_s']:.2f} s, "
          f"excluded from tokens/s)")
    print("=" * 78)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    return run(parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
