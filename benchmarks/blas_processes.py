"""Train-step tokens/s of every CPU route and the PyTorch peer, one fresh process per run.

The routes: the native kernels (``backend.cpu_kernels=native``) on each BLAS (``--blas``:
``openblas``, ``mkl``), and XLA:CPU alone (``backend.cpu_kernels=xla``) with each of the
``XLA_FLAGS`` variants in :data:`XLA_ROUTES` (``--xla``: XLA's default emitters, its YNNPACK /
XNNPACK / oneDNN library fusions, ...). ``benchmarks/blas_compare.py`` switches BLAS inside one
process (same compiled executables); this measures what a user gets: a new process per run, as
``tfm-jax train`` starts, rounds interleaved (openblas, mkl, xla, ..., torch, openblas, ...) so
the shared machine's drift hits all alike, and every ratio is to the peer of the same rounds.
Each tfm_jax run is the real jitted train step of :func:`tfm_jax.train.build` (clipping, AdamW,
the non-finite guard) on the built-in corpus at the reference shape; the peer is
``benchmarks/torch_peer.py`` at the same shape (vocab 264, the byte tokenizer's padded size).

    python -m benchmarks.blas_processes --rounds 3          # needs .[torch]; mkl if installed
    python -m benchmarks.blas_processes --blas openblas mkl --xla default no-ynn ynn-all \\
        --torch default passive --rounds 3 --markdown
    python -m benchmarks.blas_processes --probe             # which XLA routes this jaxlib has
    PYTHONPATH=. python -m benchmarks.blas_processes --python /other/venv/bin/python  # other jax

An ``XLA_FLAGS`` flag a jaxlib does not know aborts the process; such a route is reported as
not run (``--probe`` checks each route once, and whether its library fusion shows in the
compiled HLO of a small dense layer).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

SHAPE = ("model.d_model=256 model.n_layers=4 model.n_heads=8 model.n_kv_heads=2 "
         "model.ffn_hidden=768 data.seq_len=256 train.batch_size=8 train.steps=1000 "
         "train.warmup_steps=5").split()

# XLA:CPU's own routes, as XLA_FLAGS (names from jaxlib 0.10.2's `XLA_FLAGS=--help`; the
# *_fusion_type lists take dot, eltwise, reduce, individual_dot; a '+'/'-' prefix edits the
# default list). In jaxlib 0.10.2 the default YNN list is individual_dot: each dot is a
# YNNPACK fusion ("default"); an empty list gives XLA's own dot emitter ("no-ynn"). With this
# pip jaxlib the XNNPACK and oneDNN fusion flags are accepted but change nothing in the
# compiled HLO (`--probe` shows it), so those routes time the same program as no-ynn/default.
XLA_ROUTES = {
    "default": "",
    "no-ynn": "--xla_cpu_experimental_ynn_fusion_type=",
    "ynn-all": "--xla_cpu_experimental_ynn_fusion_type=+dot,+eltwise,+reduce",
    "xnn": "--xla_cpu_experimental_ynn_fusion_type= "
           "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce",
    "xnn-graph": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "onednn": "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_use_onednn=true",
    "onednn-fusion": "--xla_cpu_experimental_ynn_fusion_type= "
                     "--xla_cpu_experimental_onednn_fusion_type=dot,eltwise,reduce",
    "no-xnnpack": "--xla_cpu_use_xnnpack=false",
    "vec512": "--xla_cpu_prefer_vector_width=512",
}

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
print(json.dumps({"kernels": s.ops.describe(), "step_ms": 1e3 * ms, "loss": float(m["loss"]),
                  "tokens_per_s": cfg.train.batch_size * cfg.data.seq_len / ms}))
"""

# A dense layer's forward + backward, compiled: which library fusions the route's flags produce.
_PROBE = r"""
import collections, re, jax, jax.numpy as jnp
def f(x, w1, w2):
    return jnp.sum(jax.nn.silu(x @ w1) @ w2)
x, w1, w2 = jnp.ones((256, 256)), jnp.ones((256, 768)), jnp.ones((768, 256))
txt = jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(x, w1, w2).compile().as_text()
kinds = collections.Counter(re.findall(r'"kind":"(__[a-z_]+)"', txt))
kinds["other fusions"] = len(re.findall(r"= [^=]*fusion\(.*kind=k(?:Loop|Input|Output)", txt))
print(dict(kinds))
"""


def _env(xla_flags: str = "") -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags}
    env.pop("TFM_JAX_CPU_BLAS", None)
    return env


def _last_json(text: str) -> dict:
    start = text.rfind("\n{") + 1
    return json.loads(text[start:])


def _error(out: subprocess.CompletedProcess) -> str:
    lines = (out.stderr or out.stdout or "").strip().splitlines()
    return next((ln for ln in reversed(lines) if "Unknown flag" in ln or "unknown" in ln.lower()),
                lines[-1] if lines else f"exit status {out.returncode}")[:300]


def run_tfm(overrides: list[str], steps: int, xla_flags: str = "",
            python: str = sys.executable) -> dict:
    out = subprocess.run([python, "-c", _STEP, str(steps), *SHAPE, *overrides],
                         capture_output=True, text=True, env=_env(xla_flags))
    if out.returncode:
        return {"error": _error(out)}
    return json.loads(out.stdout.strip().splitlines()[-1])


# The peer's runs: torch_peer.py as is, and with OpenMP threads that sleep instead of spinning
# while they wait (on a machine with other load the spinning default loses most of its time:
# 440 vs 3,191 tokens/s measured back to back at load ~3.5 on 2 cores).
PEERS = {"default": {}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"}}


def run_torch(steps: int, env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.torch_peer", "--vocab", "264",
                          "--steps", str(steps), "--warmup", "3"], capture_output=True, text=True,
                         env={**_env(), **(env or {})})
    if out.returncode:
        return {"error": _error(out)}
    return _last_json(out.stdout)


def variants(blas: list[str], xla: list[str]) -> dict[str, tuple[list[str], str]]:
    """{name: (config overrides, XLA_FLAGS)} of the tfm_jax runs."""
    out = {f"native+{b}": (["backend.cpu_kernels=native", f"backend.cpu_blas={b}"], "")
           for b in blas}
    for r in xla:
        flags = XLA_ROUTES.get(r, r if r.startswith("--") else None)
        if flags is None:
            raise SystemExit(f"--xla {r}: not one of {', '.join(XLA_ROUTES)} (or --flags)")
        out[f"xla:{r}"] = (["backend.cpu_kernels=xla"], flags)
    return out


def probe(routes: list[str], python: str = sys.executable) -> int:
    for r in routes:
        out = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True,
                             env=_env(XLA_ROUTES.get(r, r)))
        res = out.stdout.strip() if out.returncode == 0 else f"FAILS: {_error(out)}"
        print(f"{r:14s} {XLA_ROUTES.get(r, r)!r:70s} {res}", flush=True)
    return 0


def _versions(python: str = sys.executable) -> str:
    out = subprocess.run([python, "-c", "import jax, jaxlib, numpy, platform; print("
                          "jax.__version__,"
                          " jaxlib.__version__, numpy.__version__, platform.python_version())"],
                         capture_output=True, text=True, env=_env())
    jax_v, jaxlib_v, np_v, py_v = (out.stdout.split() + ["?"] * 4)[:4]
    try:
        model = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                     if ln.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor()
    return (f"{model}, {os.cpu_count()} cpus, Python {py_v}, jax {jax_v}, "
            f"jaxlib {jaxlib_v}, numpy {np_v}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=20, help="timed steps per process")
    p.add_argument("--blas", nargs="*", default=["openblas", "mkl"],
                   help="backend.cpu_blas values to run natively (one process each per round)")
    p.add_argument("--xla", nargs="*", default=["default"],
                   help=f"XLA:CPU routes to run (backend.cpu_kernels=xla): {', '.join(XLA_ROUTES)}"
                        " or a literal '--xla_cpu_...' flag string")
    p.add_argument("--torch", nargs="*", default=["default"], choices=sorted(PEERS),
                   help="peer runs: default = torch_peer.py as is; passive = with "
                        "OMP_WAIT_POLICY=PASSIVE (on a machine with other load, torch's spinning "
                        "OpenMP threads otherwise lose most of their time); none of them: "
                        "--torch with no value")
    p.add_argument("--peer", default=None,
                   help="the run the ratios divide by (default: the first --torch run)")
    p.add_argument("--python", default=sys.executable,
                   help="interpreter of the tfm_jax runs (e.g. another venv's, for another jax; "
                        "the peer keeps this one's torch)")
    p.add_argument("--probe", action="store_true",
                   help="only check which --xla routes this jaxlib accepts, and what they fuse")
    p.add_argument("--markdown", action="store_true", help="also print a markdown table")
    p.add_argument("--json", help="also write the results here")
    a = p.parse_args(argv)
    if a.probe:
        return probe(a.xla if a.xla != ["default"] else list(XLA_ROUTES), a.python)
    tfm = variants(a.blas, a.xla)
    peers = {("torch" if t == "default" else f"torch:{t}"): PEERS[t] for t in a.torch}
    names = [*tfm, *peers]
    peer = a.peer or next(iter(peers), None)
    ref = next(iter(tfm), None)                  # the second ratio: to the first tfm_jax run
    runs: dict[str, list[float]] = {k: [] for k in names}
    ratios: dict[str, list[float]] = {k: [] for k in names}
    to_ref: dict[str, list[float]] = {k: [] for k in names}
    notes: dict[str, str] = {}
    load: list[float] = []
    machine = _versions(a.python)
    print(machine, flush=True)
    for r in range(a.rounds):
        this: dict[str, float] = {}
        for name in names:
            load.append(os.getloadavg()[0])
            res = (run_torch(a.steps, peers[name]) if name in peers
                   else run_tfm(tfm[name][0], a.steps, tfm[name][1], a.python))
            if "error" in res:
                notes[name] = f"not run: {res['error']}"
                print(f"[round {r + 1}] {name:16s} not run: {res['error']}", flush=True)
                continue
            this[name] = res["tokens_per_s"]
            runs[name].append(res["tokens_per_s"])
            notes.setdefault(name, res.get("kernels", f"torch {res.get('torch_version', '')}"))
            print(f"[round {r + 1}] {name:16s} {res['tokens_per_s']:8,.0f} tokens/s "
                  f"(load {load[-1]:.1f})", flush=True)
        for k, v in this.items():                # ratios within the same round
            if peer in this:
                ratios[k].append(v / this[peer])
            if ref in this:
                to_ref[k].append(v / this[ref])
    med = {k: statistics.median(v) for k, v in runs.items() if v}
    ratio = {k: statistics.median(v) for k, v in ratios.items() if v}
    rref = {k: statistics.median(v) for k, v in to_ref.items() if v}
    lo, hi = (min(load), max(load)) if load else (0.0, 0.0)
    print(f"\nmedian tokens/s over separate processes (reference shape), {a.rounds} interleaved "
          f"rounds x {a.steps} steps; ratios = median over rounds of (tokens/s / the same "
          f"round's {peer} | {ref}); 1-min load {lo:.1f}-{hi:.1f}:")
    for k in names:
        if k in med:
            rr = (f"{ratio[k]:.2f}x {peer} ({'/'.join(f'{x:.2f}' for x in ratios[k])})"
                  if k in ratio else "")
            r2 = f"{rref[k]:.2f}x {ref}" if k in rref else ""
            print(f"  {k:16s} {med[k]:8,.0f}  {rr:36s} {r2:26s} {notes.get(k, '')}")
        else:
            print(f"  {k:16s} {notes.get(k, 'not run')}")
    if a.markdown:
        print(f"\n{machine}; 1-min load {lo:.1f}-{hi:.1f}\n")
        print(f"| route | XLA_FLAGS / env | median tokens/s | × {peer} (per round) | × {ref} |")
        print("|---|---|---:|---:|---:|")
        for k in names:
            how = tfm[k][1] if k in tfm else " ".join(f"{e}={v}" for e, v in peers[k].items())
            if k in med:
                per = " / ".join(f"{x:.2f}" for x in ratios[k])
                print(f"| {k} | `{how}` | {med[k]:,.0f} | "
                      f"{ratio.get(k, float('nan')):.2f}× ({per}) | "
                      f"{rref.get(k, float('nan')):.2f}× |")
            else:
                print(f"| {k} | `{how}` | not run | {notes.get(k, '')} | |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": machine, "runs": runs, "median": med, "peer": peer,
                       "ratios": ratios, "median_ratio": ratio, "ref": ref,
                       "ratios_to_ref": to_ref, "median_ratio_to_ref": rref, "notes": notes,
                       "load": load, "xla_flags": {k: v[1] for k, v in tfm.items()}},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
