"""Train-step tokens/s with each installed BLAS and the PyTorch peer, one fresh process per run.

``benchmarks/blas_compare.py`` switches BLAS inside one process (same compiled executables);
this measures what a user gets: a new process per run, as ``tfm-jax train`` starts, rounds
interleaved (builtin, openblas, mkl, torch, builtin, ...) so the shared machine's drift hits all
alike.
Each tfm_jax run is the real jitted train step of :func:`tfm_jax.train.build` (clipping, AdamW,
the non-finite guard) on the built-in corpus at the reference shape; the peer is
``benchmarks/torch_peer.py`` at the same shape (vocab 264, the byte tokenizer's padded size).

    python -m benchmarks.blas_processes --rounds 3          # needs .[torch]; mkl if installed
    python -m benchmarks.blas_processes --blas builtin openblas mkl --rounds 3 --steps 30
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

SHAPE = ("model.d_model=256 model.n_layers=4 model.n_heads=8 model.n_kv_heads=2 "
         "model.ffn_hidden=768 data.seq_len=256 train.batch_size=8 train.steps=1000 "
         "train.warmup_steps=5").split()

_STEP = r"""
import json, sys, time
import jax, numpy as np
from tfm_jax import data as data_lib
from tfm_jax.config import load_config
from tfm_jax.train import build
cfg = load_config(overrides=sys.argv[2:])
corpus = data_lib.load_corpus(None, 0.05, None)
s = build(cfg, jax.devices()[:1])
steps, ts = int(sys.argv[1]), []
with s.context():
    st = s.init_state()
    for step in range(steps + 3):
        b = data_lib.train_batch(corpus.train, corpus.train_doc_starts, step=step, seed=0,
                                 batch_size=cfg.train.batch_size, seq_len=cfg.data.seq_len,
                                 packing=True, rows=data_lib.process_rows(cfg.train.batch_size))
        t0 = time.perf_counter()
        st, m = s.train_step(st, s.shard_batch(b))
        jax.block_until_ready(m["loss"])
        ts.append(time.perf_counter() - t0)
ms = float(np.median(ts[3:]))
print(json.dumps({"kernels": s.ops.describe(), "step_ms": 1e3 * ms,
                  "tokens_per_s": cfg.train.batch_size * cfg.data.seq_len / ms}))
"""


def _last_json(text: str) -> dict:
    start = text.rfind("\n{") + 1
    return json.loads(text[start:])


def run_tfm(blas: str, steps: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _STEP, str(steps), *SHAPE,
                          f"backend.cpu_blas={blas}"], capture_output=True, text=True)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_torch(steps: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.torch_peer", "--vocab", "264",
                          "--steps", str(steps), "--warmup", "3"], capture_output=True, text=True)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1]}
    return _last_json(out.stdout)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="timed steps per process")
    p.add_argument("--blas", nargs="+", default=["builtin", "openblas", "mkl"],
                   help="backend.cpu_blas values to run (one process each per round)")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    runs: dict[str, list[float]] = {k: [] for k in (*a.blas, "torch")}
    notes: dict[str, str] = {}
    for r in range(a.rounds):
        for name in runs:
            res = run_torch(a.steps) if name == "torch" else run_tfm(name, a.steps)
            if "error" in res:
                notes[name] = res["error"]
                print(f"[round {r + 1}] {name:9s} not run: {res['error']}", flush=True)
                continue
            runs[name].append(res["tokens_per_s"])
            notes.setdefault(name, res.get("kernels", f"torch {res.get('torch_version', '')}"))
            print(f"[round {r + 1}] {name:9s} {res['tokens_per_s']:8,.0f} tokens/s", flush=True)
    med = {k: statistics.median(v) for k, v in runs.items() if v}
    print("\nmedian tokens/s over separate processes (reference shape):")
    for k, v in med.items():
        ratio = f"{v / med['torch']:.2f}x the peer" if "torch" in med else ""
        print(f"  {k:9s} {v:8,.0f}  {ratio:16s} {notes.get(k, '')}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"runs": runs, "median": med, "notes": notes}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
