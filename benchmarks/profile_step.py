"""Where the milliseconds of a tfm_jax train step go (XLA:CPU, one device, fp32).

Three views of the same step, at the benchmark's reference shape unless told otherwise:

1. **Phases** -- forward only, forward+backward, +AdamW, and the framework's full step (which adds
   grad-norm, clipping, the non-finite guard and metrics); with ``--torch`` the PyTorch peer's
   forward, forward+backward and full step at the same shape, timed in the same run, so the gap is
   located in forward or backward.
2. **Ablations** -- the same model with one sub-layer replaced by ``x * w`` (a scalar weight):
   the time that disappears is what that sub-layer costs inside the real step, overlap and cache
   effects included (isolated micro-benchmarks of a sub-layer mislead on CPU).
3. **Trace** (``--trace``) -- a jax.profiler trace of three steps; every XLA op is mapped back to the
   model module it came from (HLO ``op_name`` metadata) and split into forward/backward and
   GEMM/elementwise. Caveat: XLA:CPU runs some dots asynchronously on its own thread pool, so op
   durations can overlap and their sum exceed the wall time.

    python -m benchmarks.profile_step                       # phases + ablations, reference shape
    python -m benchmarks.profile_step --preset large --steps 5
    python -m benchmarks.profile_step --trace --top 25
    python -m benchmarks.profile_step --torch --no-ablations   # phases of both frameworks
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import pathlib
import re
import sys
import tempfile
import time
from typing import Any, Callable, Optional

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen as nn  # noqa: E402

import tfm_jax.model as model_lib  # noqa: E402
from benchmarks import train_throughput as tt  # noqa: E402
from tfm_jax.train import build, masked_ce_sum  # noqa: E402


KERNELS = {"choice": "auto"}   # backend.cpu_kernels of every setup (--kernels)


def timeit(fn: Callable[[], Any], steps: int) -> dict[str, float]:
    jax.block_until_ready(fn())
    ts = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return {"median_ms": 1e3 * float(np.median(ts)), "min_ms": 1e3 * float(np.min(ts))}


class _ScaleOnly(nn.Module):
    """Stand-in sub-layer: ``x * w`` with one scalar parameter (keeps the residual path)."""

    @nn.compact
    def __call__(self, x, *args, **kwargs):
        return x * self.param("w", nn.initializers.ones, ())


def _stand_in(*args, name=None, **kwargs):
    return _ScaleOnly(name=name)


def setup_for(shape: dict[str, int], seq: int, batch: int, steps: int):
    cfg, _ = tt.make_jax_config(shape, seq, batch, steps + 10)
    cfg = cfg.replace(**{"backend.cpu_kernels": KERNELS["choice"]})
    setup = build(cfg, devices=jax.devices()[:1])
    rng = np.random.default_rng(0)
    high = min(shape["vocab_size"], 256)
    b = {"inputs": rng.integers(0, high, (batch, seq)).astype(np.int32),
         "targets": rng.integers(0, high, (batch, seq)).astype(np.int32),
         "mask": np.ones((batch, seq), np.float32)}
    return cfg, setup, b


def phases(shape, seq, batch, steps) -> dict[str, dict[str, float]]:
    cfg, setup, b = setup_for(shape, seq, batch, steps)
    out = {}
    with setup.context():
        state = setup.init_state()
        batch_arr = setup.shard_batch(b)
        model, tx = setup.model, setup.tx

        def loss(p):
            logits = model.apply({"params": p}, batch_arr["inputs"])
            return masked_ce_sum(logits, batch_arr["targets"], batch_arr["mask"]) / b["mask"].sum()

        def with_adam(p, o):
            l, g = jax.value_and_grad(loss)(p)
            u, o = tx.update(g, o, p)
            return jax.tree.map(jnp.add, p, u), o, l

        params, opt = state.params, state.opt_state
        f_fwd, f_bwd, f_opt = jax.jit(loss), jax.jit(jax.value_and_grad(loss)), jax.jit(with_adam)
        out["forward"] = timeit(lambda: f_fwd(params), steps)
        out["forward+backward"] = timeit(lambda: f_bwd(params), steps)
        out["forward+backward+adamw"] = timeit(lambda: f_opt(params, opt), steps)
        holder = {"s": state}

        def full():
            holder["s"], m = setup.train_step(holder["s"], batch_arr)
            return m["loss"]
        out["full train step"] = timeit(full, steps)
    return out


def torch_phases(shape, seq, batch, steps) -> dict[str, dict[str, float]]:
    """The PyTorch peer's phases at the same shape (fp32, all CPU threads, AdamW as the peer)."""
    import torch

    from benchmarks import torch_peer

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    model = torch_peer.TorchLM(**shape)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, min(shape["vocab_size"], 256), (batch, seq + 1), generator=g)
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()

    def fwd():
        with torch.no_grad():
            return model(x, y)[1]

    def fwd_bwd():
        loss = model(x, y)[1]
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss

    def step():
        loss = model(x, y)[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return {"torch forward": timeit(fwd, steps), "torch forward+backward": timeit(fwd_bwd, steps),
            "torch full step (AdamW)": timeit(step, steps)}


def ablations(shape, seq, batch, steps) -> dict[str, dict[str, float]]:
    """fwd+bwd of the model with sub-layers swapped for ``x * w``."""
    variants = {"full model": {}, "FFN -> x*w": {"FeedForward": _stand_in},
                "attention -> x*w": {"Attention": _stand_in},
                "both -> x*w (embed, norms, head, loss)": {"FeedForward": _stand_in,
                                                           "Attention": _stand_in}}
    out = {}
    for label, swaps in variants.items():
        saved = {k: getattr(model_lib, k) for k in swaps}
        try:
            for k, v in swaps.items():
                setattr(model_lib, k, v)
            cfg, setup, b = setup_for(shape, seq, batch, steps)
            model = model_lib.TransformerLM(cfg.model, ops=setup.ops)
            tokens = jnp.asarray(b["inputs"])
            params = model.init(jax.random.key(0), tokens)["params"]

            def loss(p, model=model, tokens=tokens):
                logits = model.apply({"params": p}, tokens)
                return masked_ce_sum(logits, tokens, jnp.ones(tokens.shape)) / tokens.size

            f = jax.jit(jax.value_and_grad(loss))
            out[label] = timeit(lambda: f(params), steps)
        finally:
            for k, v in saved.items():
                setattr(model_lib, k, v)
    return out


def trace(shape, seq, batch, top: int) -> dict[str, Any]:
    """Per-module forward/backward GEMM/elementwise time from a profiler trace of 3 steps."""
    cfg, setup, b = setup_for(shape, seq, batch, 5)
    with setup.context():
        state = setup.init_state()
        batch_arr = setup.shard_batch(b)
        hlo = setup.train_step.lower(state, batch_arr).compile().as_text()
        for _ in range(3):
            state, m = setup.train_step(state, batch_arr)
        jax.block_until_ready(m["loss"])
        logdir = tempfile.mkdtemp(prefix="tfm_jax_trace_")
        jax.profiler.start_trace(logdir)
        for _ in range(3):
            state, m = setup.train_step(state, batch_arr)
        jax.block_until_ready(m["loss"])
        jax.profiler.stop_trace()
    meta = dict(re.findall(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{op_name="([^"]+)"', hlo,
                           re.M))
    calls = dict(re.findall(r'^\s*(?:ROOT )?%?([\w.\-]+) = \S+ fusion\(.*?calls=%?([\w.\-]+)',
                            hlo, re.M))
    bodies = dict(re.findall(r'^%?([\w.\-]+) (?:\(.*?\) -> .*?)?\{\n(.*?)\n\}', hlo, re.M | re.S))
    targets = dict(re.findall(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?custom_call_target="([^"]+)"',
                              hlo, re.M))
    f = sorted(pathlib.Path(logdir).rglob("*.trace.json.gz"))[-1]
    events = [e for e in json.load(gzip.open(f))["traceEvents"] if e.get("ph") == "X"]
    per_op = collections.defaultdict(float)
    for e in events:
        per_op[e["name"]] += e["dur"] / 3e3          # ms per step
    groups = collections.defaultdict(float)
    for op, ms in per_op.items():
        if op not in meta:
            continue
        src = meta[op].split("/", 1)[-1]
        phase = "bwd" if src.startswith("transpose(") else "fwd" if "jvp(" in src else "update"
        src = re.sub(r"layers_\d+", "L", re.sub(r"transpose\(|jvp\(|\)", "", src))
        parts = src.split("/")
        module = "/".join(parts[1:3]) if len(parts) > 2 else src
        is_dot = (op.startswith("dot") or " dot(" in bodies.get(calls.get(op, ""), "")
                  or targets.get(op) == "tfm_gemm")
        kind = ("native attn" if targets.get(op, "").startswith("tfm_attn") else
                "GEMM" if is_dot else "elementwise")
        groups[(phase, kind, module)] += ms
    rows = sorted(groups.items(), key=lambda kv: -kv[1])[:top]
    return {"logdir": logdir, "rows": [{"phase": k[0], "kind": k[1], "module": k[2], "ms": v}
                                       for k, v in rows]}


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(tt.PRESETS), default="reference")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--trace", action="store_true")
    p.add_argument("--no-ablations", action="store_true")
    p.add_argument("--kernels", choices=["auto", "native", "xla"], default="auto",
                   help="backend.cpu_kernels (xla: profile the XLA-only path)")
    p.add_argument("--torch", action="store_true",
                   help="also time the PyTorch peer's phases at the same shape")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--json")
    a = p.parse_args(argv)
    KERNELS["choice"] = a.kernels
    shape, seq, batch = tt.resolve_shape(tt.parse_args(["--preset", a.preset]))
    out: dict[str, Any] = {"preset": a.preset, "shape": shape, "seq": seq, "batch": batch}
    print(f"preset {a.preset}: {shape}, seq {seq}, batch {batch}; ms per step (median / min of "
          f"{a.steps})")
    # The peer first: timed after tfm_jax's phases, torch's step measured up to 1.5x slower in
    # this process (cause not pinned down: not thread affinity, not MKL's threading layer).
    peer = torch_phases(shape, seq, batch, a.steps) if a.torch else {}
    out["phases"] = {**phases(shape, seq, batch, a.steps), **peer}
    for k, v in out["phases"].items():
        print(f"  {k:<42} {v['median_ms']:8.1f} / {v['min_ms']:8.1f}")
    if not a.no_ablations:
        out["ablations"] = ablations(shape, seq, batch, a.steps)
        print("forward+backward with sub-layers replaced by x*w:")
        for k, v in out["ablations"].items():
            print(f"  {k:<42} {v['median_ms']:8.1f} / {v['min_ms']:8.1f}")
    if a.trace:
        out["trace"] = trace(shape, seq, batch, a.top)
        print(f"trace ({out['trace']['logdir']}), ms per step by phase / kind / module:")
        for r in out["trace"]["rows"]:
            print(f"  {r['ms']:8.2f}  {r['phase']:<6} {r['kind']:<11} {r['module']}")
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
