"""GPU check of issue #11: FP8 vs bf16 GEMM throughput, native FP8 GEMMs in the compiled HLO,
and the bf16 vs FP8 train step of a ~1B-parameter shape. Run by ``benchmarks/device_check.sh``.

Three parts, each written to ``OUT/fp8_gpu.json`` and ``OUT/fp8_gpu.txt`` as soon as it is done
(a run cut short by a time limit keeps what finished):

1. **GEMM** at square shapes (default 4096 and 8192): ``bf16 @ bf16 -> bf16`` vs
   ``fp8_direct`` (``lax.dot_general`` on e4m3 bytes, the hardware's rate) and ``fp8_tfm``
   (tfm-jax's own FP8 dot, :func:`tfm_jax.quant.fp8.fp8_dot`, with its quantization), forward
   and forward + both gradients; TFLOP/s from the median of timed calls and the FP8 / plain
   GEMMs each compiled program runs (:func:`tfm_jax.quant.hlo_check.gemm_counts`; the matching
   HLO lines are saved). Then the compiled ``fp8_delayed`` bf16 step of a small model: its GEMMs
   counted per quantized projection (>= 3 FP8 GEMMs and no plain GEMM on every one).
2. **Train step** of the tfm-jax model at a ~1B-parameter shape (d_model 2048, 20 layers, GQA
   16/8, SwiGLU 5632, vocab 32000, seq 2048, batch 4, scanned layers): ``bf16`` (model.dtype
   bfloat16), ``fp8_delayed`` (+ FP8 dots) and ``fp8_delayed_ws`` (+ FP8 weight storage):
   median step time, tokens/s, the step's dot mode and its memory plan (compiled from shapes,
   printed and checked against the card before anything is allocated; remat ``dots``, full
   remat when that does not fit).
3. Targets: tfm-jax's FP8 GEMM >= 1.6x bf16 at 8192^3; 3 FP8 GEMMs for its forward +
   backward and on every quantized projection of the step; FP8 train step >= 1.25x bf16.

Without a GPU it says so and runs a tiny CPU smoke of every part (exit 0): the script is tested
on CPU by ``tests/integration/test_fp8_gpu_script.py``.

    python benchmarks/fp8_gpu.py --out /tmp/fp8   # GPU: full; CPU: smoke
    python benchmarks/fp8_gpu.py --out /tmp/fp8 --smoke
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import statistics
import sys
import time
from typing import Any, Callable, Optional

_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

# remat "dots": the scan saves only the projections' outputs (bf16), never the f32 softmax /
# norm residuals that made the un-rematerialised step need ~66 GiB; step_bench falls back to
# full remat when the compiled plan still does not fit the card.
SHAPE_1B = {"model.d_model": 2048, "model.n_layers": 20, "model.n_heads": 16,
            "model.n_kv_heads": 8, "model.ffn_hidden": 5632, "model.vocab_size": 32000,
            "model.scan_layers": True, "model.remat": "dots", "data.seq_len": 2048,
            "train.batch_size": 4}
# Share of the card's memory a compiled step may plan for (XLA_PYTHON_CLIENT_MEM_FRACTION is
# set to 0.9 by benchmarks/device_check.py: jax's pool is then bytes_limit).
FIT_FRACTION = 0.95
SHAPE_SMOKE = {"model.d_model": 64, "model.n_layers": 2, "model.n_heads": 4,
               "model.n_kv_heads": 2, "model.ffn_hidden": 128, "model.vocab_size": 264,
               "model.scan_layers": True, "data.seq_len": 32, "train.batch_size": 2}
VARIANTS = {"bf16": {"model.dtype": "bfloat16"},
            "fp8_delayed": {"model.dtype": "bfloat16", "quant.recipe": "fp8_delayed"},
            "fp8_delayed_ws": {"model.dtype": "bfloat16", "quant.recipe": "fp8_delayed",
                               "quant.fp8_weight_storage": True}}


def _median_time(fn: Callable[[], Any], reps: int, inner: int) -> float:
    """Median over ``reps`` of the time of ``inner`` back-to-back calls / inner (seconds)."""
    import jax

    jax.block_until_ready(fn())                         # compile + warm up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = None
        for _ in range(inner):
            out = fn()
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def _dot_lines(text: str, limit: int = 6) -> list[str]:
    lines = [ln.strip() for ln in text.splitlines()
             if re.search(r"\bdot\(|custom-call.*(gemm|matmul)|cublas", ln)]
    return [ln[:300] for ln in lines[:limit]]


def _gemm_total(text: str) -> dict[str, int]:
    """FP8 / plain GEMMs of a compiled program, all projections together."""
    from tfm_jax.quant import hlo_check

    counts = hlo_check.gemm_counts(text)
    return {k: sum(c[k] for c in counts.values()) for k in ("fp8", "plain")}


def gemm_bench(n: int, reps: int, inner: int) -> dict[str, Any]:
    """bf16 vs FP8 square GEMM at n: TFLOP/s and the GEMMs of each compiled program.

    * ``bf16``: ``bf16 @ bf16 -> bf16`` (``lax.dot_general``);
    * ``fp8_direct``: ``lax.dot_general`` on e4m3 bytes -> bf16 (the hardware's rate);
    * ``fp8_tfm``: tfm-jax's own FP8 dot (:func:`tfm_jax.quant.fp8.fp8_dot`, dynamic scaling)
      on bf16 inputs -- amax, scale, quantize and the FP8 GEMM, as a train step runs it;
    * ``bf16_train`` / ``fp8_tfm_train``: forward + both gradients (3 GEMMs each).
    ``fp8_over_bf16`` is fp8_tfm / bf16 (the target: >= 1.6x at 8192^3 on H100)."""
    import jax
    import jax.numpy as jnp

    from tfm_jax.quant import fp8

    k1, k2 = jax.random.split(jax.random.key(0))
    a16 = jax.random.normal(k1, (n, n), jnp.bfloat16)
    b16 = jax.random.normal(k2, (n, n), jnp.bfloat16) * 0.02
    a8, b8 = a16.astype(jnp.float8_e4m3fn), (b16 * 50).astype(jnp.float8_e4m3fn)
    dn = (((1,), (0,)), ((), ()))
    specs = (fp8.QSpec("dynamic", "float8_e4m3fn"), fp8.QSpec("dynamic", "float8_e4m3fn"),
             fp8.QSpec("dynamic", "float8_e5m2"))

    def tfm(x, w):
        return fp8.fp8_dot(x, w, ({}, {}, {}), specs, None)[0]

    def bf16(x, w):
        return jax.lax.dot_general(x, w, dn, preferred_element_type=jnp.bfloat16)

    def train(f):
        return jax.grad(lambda x, w: jnp.sum(f(x, w).astype(jnp.float32) ** 2), (0, 1))

    fns = {"bf16": (bf16, (a16, b16), 1), "fp8_direct": (bf16, (a8, b8), 1),
           "fp8_tfm": (tfm, (a16, b16), 1), "bf16_train": (train(bf16), (a16, b16), 3),
           "fp8_tfm_train": (train(tfm), (a16, b16), 3)}
    out: dict[str, Any] = {"n": n}
    for name, (f, args, gemms) in fns.items():
        try:
            jf = jax.jit(f)
            text = jf.lower(*args).compile().as_text()
            sec = _median_time(lambda: jf(*args), reps, inner)
            out[name] = {"seconds": sec, "tflops": gemms * 2 * n ** 3 / sec / 1e12,
                         "dot_mode": fp8.fp8_dot_mode(text), "gemms": _gemm_total(text),
                         "hlo_dots": _dot_lines(text)}
        except Exception as err:  # noqa: BLE001 -- recorded: e.g. an unsupported FP8 dot
            out[name] = {"error": f"{type(err).__name__}: {str(err)[:400]}"}
    for num, den, key in (("fp8_tfm", "bf16", "fp8_over_bf16"),
                          ("fp8_direct", "bf16", "fp8_direct_over_bf16"),
                          ("fp8_tfm_train", "bf16_train", "fp8_train_over_bf16")):
        if out[num].get("tflops") and out[den].get("tflops"):
            out[key] = out[num]["tflops"] / out[den]["tflops"]
    return out


def memory_plan(compiled, device) -> dict[str, Any]:
    """The compiled step's memory analysis against the device's memory: arguments + outputs -
    aliased (donated state) + temporaries = what the step needs at its peak, vs jax's pool
    (``memory_stats()["bytes_limit"]``; None on CPU, where nothing is checked)."""
    stats = compiled.memory_analysis()
    get = lambda k: int(getattr(stats, k, 0) or 0) if stats is not None else 0  # noqa: E731
    plan = {k.removesuffix("_size_in_bytes"): get(k) for k in
            ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
             "temp_size_in_bytes")}
    plan["total"] = plan["argument"] + plan["output"] - plan["alias"] + plan["temp"]
    try:
        limit = (device.memory_stats() or {}).get("bytes_limit")
    except Exception:   # noqa: BLE001 -- CPU devices may not report
        limit = None
    plan["limit"] = int(limit) if limit else None
    plan["fits"] = None if not limit else plan["total"] <= FIT_FRACTION * limit
    return plan


def describe_plan(plan: dict[str, Any]) -> str:
    gib = lambda b: f"{b / 2**30:.2f} GiB"   # noqa: E731
    text = (f"memory plan: arguments {gib(plan['argument'])} + outputs {gib(plan['output'])} - "
            f"donated {gib(plan['alias'])} + temporaries {gib(plan['temp'])} = "
            f"{gib(plan['total'])}")
    if plan["limit"]:
        text += (f" of {gib(plan['limit'])} ({plan['total'] / plan['limit']:.0%}; "
                 f"{'fits' if plan['fits'] else 'does NOT fit'} under {FIT_FRACTION:.0%})")
    return text


def projection_gemms(shape: Optional[dict] = None) -> dict[str, Any]:
    """The compiled ``fp8_delayed`` bf16 train step (compiled, not run): its GEMMs counted per
    quantized projection (:func:`tfm_jax.quant.hlo_check.gemm_counts`) and the verdict -- every
    projection >= 3 FP8 GEMMs and no plain GEMM (:func:`~tfm_jax.quant.hlo_check.fp8_gemm_verdict`)."""
    import jax

    from tfm_jax.config import load_config
    from tfm_jax.quant import hlo_check
    from tfm_jax.train import build

    shape = {**SHAPE_SMOKE, "model.d_model": 256, "model.ffn_hidden": 512,
             "data.seq_len": 128, "train.batch_size": 8, **(shape or {})}
    overrides = {**shape, **VARIANTS["fp8_delayed"], "run.progress": False,
                 "run.tensorboard": False, "mesh.data": 1}
    cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    setup = build(cfg, jax.devices()[:1])
    with setup.context():
        text = setup.train_step.lower(setup.abstract_state(),
                                      setup.abstract_batch()).compile().as_text()
    counts = hlo_check.gemm_counts(text)
    ok, bad = hlo_check.fp8_gemm_verdict(counts)
    return {"shape": shape, "counts": counts, "every_projection_fp8": ok, "not_fp8": bad}


def step_bench(shape: dict, variant: str, steps: int, *, extra: Optional[dict] = None,
               devices: Optional[list] = None, say: Callable[[str], None] = print
               ) -> dict[str, Any]:
    """Median step time of the tfm-jax train step for one variant at ``shape`` (``extra``:
    more overrides, e.g. MoE or mesh settings; ``devices``: default the first device), its
    model FLOPs/token and MFU against :func:`tfm_jax.platform.backends.peak_flops_info`.

    The step is compiled from shapes first and its memory plan (:func:`memory_plan`) printed
    and checked against the card before any state exists: a plan that does not fit is compiled
    again with full remat, and if that does not fit either nothing runs (``error`` says why)."""
    import jax
    import numpy as np

    from tfm_jax.platform import backends
    from tfm_jax.train import memory
    from tfm_jax.config import load_config
    from tfm_jax.model import count_params, train_flops_per_token
    from tfm_jax.quant import fp8
    from tfm_jax.train import build

    devices = jax.devices()[:1] if devices is None else devices
    overrides = {**shape, **VARIANTS.get(variant, {}), "train.steps": 1000,
                 "train.warmup_steps": 10, "run.progress": False, "run.tensorboard": False,
                 "mesh.data": 1, **(extra or {})}
    cfg = load_config(None, [f"{k}={json.dumps(v) if isinstance(v, bool) else v}"
                             for k, v in overrides.items()])
    b, t = cfg.train.batch_size, cfg.data.seq_len
    out: dict[str, Any] = {"params": count_params(cfg.model, cfg.moe)["total"],
                           "flops_per_token": train_flops_per_token(cfg.model, t, cfg.moe)}

    def compile_plan(cfg):
        setup = build(cfg, devices)
        shapes = {k: jax.ShapeDtypeStruct((b, t), np.float32 if k == "mask" else np.int32,
                                          sharding=setup.batch_sharding)
                  for k in ("inputs", "targets", "mask")}
        with setup.context():
            compiled = setup.train_step.lower(setup.abstract_state(), shapes).compile()
        plan = memory_plan(compiled, devices[0])
        say(f"{variant} (remat {cfg.model.remat}) " + describe_plan(plan))
        return setup, compiled, plan

    setup, compiled, plan = compile_plan(cfg)
    if plan["fits"] is False and cfg.model.remat != "full":
        cfg = load_config(None, [f"{k}={json.dumps(v) if isinstance(v, bool) else v}"
                                 for k, v in {**overrides, "model.remat": "full"}.items()])
        setup, compiled, plan = compile_plan(cfg)
        out["remat_fallback"] = "full"
    out["remat"], out["memory_plan"] = cfg.model.remat, plan
    out["temp_bytes"] = plan["temp"]
    if plan["fits"] is False:
        raise MemoryError("the compiled step does not fit the card: " + describe_plan(plan))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.model.vocab_size, (b, t + 1)).astype(np.int32)
    batch = setup.shard_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                               "mask": np.ones((b, t), np.float32)})
    with setup.context():
        state = setup.init_state()
        out["state_bytes"] = memory.state_bytes(state)["total"]
        out["dot_mode"] = fp8.fp8_dot_mode(compiled.as_text())
        state, m = compiled(state, batch)        # first step (the jit cache would compile again)
        jax.block_until_ready(m["loss"])
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            state, m = compiled(state, batch)
            jax.block_until_ready(m["loss"])
            times.append(time.perf_counter() - t0)
    out["step_s"] = statistics.median(times)
    out["tokens_per_s"] = b * t / out["step_s"]
    out["loss"] = float(m["loss"])
    peak, out["peak_source"] = backends.peak_flops_info(cfg, n_devices=len(devices))
    out["peak_flops"] = peak
    out["mfu"] = out["flops_per_token"] * out["tokens_per_s"] / peak
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output folder (JSON + text)")
    p.add_argument("--sizes", default="4096,8192", help="GEMM sizes on GPU")
    p.add_argument("--steps", type=int, default=10, help="timed train steps per variant")
    p.add_argument("--smoke", action="store_true", help="tiny sizes even on a GPU")
    p.add_argument("--skip-step", action="store_true", help="GEMMs only")
    args = p.parse_args(argv)
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    import jax

    platform = jax.devices()[0].platform
    gpu = platform == "gpu" and not args.smoke
    res: dict[str, Any] = {"platform": platform, "device": str(jax.devices()[0].device_kind),
                           "jax": jax.__version__, "mode": "full" if gpu else "cpu-smoke"}
    lines: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)
        (out_dir / "fp8_gpu.json").write_text(json.dumps(res, indent=1))
        (out_dir / "fp8_gpu.txt").write_text("\n".join(lines) + "\n")

    if gpu:
        say(f"GPU: {res['device']} (jax {jax.__version__})")
    else:
        say(f"no GPU ({platform}{', --smoke' if args.smoke else ''}): tiny CPU smoke of every "
            "part; FP8 dots are emulated, timings mean nothing")
    sizes = [int(s) for s in args.sizes.split(",")] if gpu else [128]
    res["gemm"] = []
    for n in sizes:
        r = gemm_bench(n, reps=5 if gpu else 2, inner=10 if gpu else 1)
        res["gemm"].append(r)
        parts = [f"{k} " + (f"{r[k]['tflops']:.1f} TFLOP/s ({r[k]['gemms']['fp8']} FP8 / "
                            f"{r[k]['gemms']['plain']} plain GEMMs)"
                            if "tflops" in r[k] else r[k]["error"][:80])
                 for k in ("bf16", "fp8_direct", "fp8_tfm", "bf16_train", "fp8_tfm_train")]
        say(f"GEMM {n}^3: " + "; ".join(parts)
            + (f"; tfm-jax fp8/bf16 {r['fp8_over_bf16']:.2f}x" if "fp8_over_bf16" in r else "")
            + (f" (train {r['fp8_train_over_bf16']:.2f}x)" if "fp8_train_over_bf16" in r
               else ""))
    try:
        res["projection_gemms"] = projection_gemms()
        pg = res["projection_gemms"]
        say("FP8 GEMMs per quantized projection (compiled fp8_delayed bf16 step): "
            + ", ".join(f"{p} {c['fp8']}/{c['fp8'] + c['plain']}"
                        for p, c in sorted(pg["counts"].items()))
            + f" -> {'every projection FP8' if pg['every_projection_fp8'] else 'NOT all FP8'}")
    except Exception as err:  # noqa: BLE001 -- recorded
        res["projection_gemms"] = {"error": f"{type(err).__name__}: {str(err)[:400]}"}
        say(f"FP8 GEMM count: {res['projection_gemms']['error'][:200]}")
    if not args.skip_step:
        shape = SHAPE_1B if gpu else SHAPE_SMOKE
        res["step"] = {"shape": shape}
        for v in VARIANTS:
            try:
                r = step_bench(shape, v, args.steps if gpu else 2, say=say)
            except Exception as err:  # noqa: BLE001 -- recorded, next variant
                r = {"error": f"{type(err).__name__}: {str(err)[:400]}"}
            res["step"][v] = r
            say(f"step {v}: " + (f"{r['step_s'] * 1e3:.1f} ms, {r['tokens_per_s']:,.0f} tok/s, "
                                 f"{r['params']:,} params, dots {r['dot_mode']}, state "
                                 f"{r['state_bytes'] / 2**30:.2f} GiB"
                                 if "step_s" in r else r["error"][:200]))
        bf = res["step"]["bf16"].get("step_s")
        for v in ("fp8_delayed", "fp8_delayed_ws"):
            if bf and res["step"][v].get("step_s"):
                res["step"][f"{v}_speedup"] = bf / res["step"][v]["step_s"]
                say(f"step speed-up {v} vs bf16: {res['step'][f'{v}_speedup']:.2f}x")
    if gpu:
        big = [r for r in res["gemm"] if r["n"] == max(sizes)][0]
        res["targets"] = {
            "gemm_fp8_ge_1.6x_bf16": (big.get("fp8_over_bf16") or 0) >= 1.6,
            "gemm_fp8_train_3_fp8_gemms": big.get("fp8_tfm_train", {}).get(
                "gemms", {}).get("fp8") == 3,
            "every_projection_3_fp8_gemms": bool(res.get("projection_gemms", {}).get(
                "every_projection_fp8")),
            "step_fp8_ge_1.25x_bf16": (res.get("step", {}).get("fp8_delayed_speedup") or 0)
            >= 1.25}
        say(f"targets: {res['targets']}")
    say(f"wrote {out_dir / 'fp8_gpu.json'} and {out_dir / 'fp8_gpu.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
