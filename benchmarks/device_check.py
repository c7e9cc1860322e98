"""Device check of issue #13: one short run on a lent H100/H200 that records, as JSON under
``--out`` (``$OUT`` from ``benchmarks/device_check.sh``):

=========  ==================================================================================
env        python/jax/jaxlib/flax/optax/orbax versions, ``jax.devices()``, device kind, the PJRT
           plugins jax can discover (``jax_plugins`` modules with their libraries, entry points,
           ``$PJRT_NAMES_AND_LIBRARY_PATHS``)
plugin     the CUDA PJRT plugin's library registered *by path* through jax's own variable
           ``PJRT_NAMES_AND_LIBRARY_PATHS`` in a fresh process (and through tfm-jax's
           ``$TFM_JAX_PJRT_PLUGIN`` where this version has it): the devices it reports
tests      a GPU-relevant pytest subset (FP8 numerics, attention cores incl. cuDNN, quant
           formats, ops, layers) on the GPU; tests that need the 8 fake CPU devices skip
mfu        bf16 train step of a ~1.07B-parameter shape (``fp8_gpu.SHAPE_1B``, remat ``dots``; its
           compiled memory plan printed and checked against the card first): step time,
           tokens/s, MFU against the card's bf16 dense peak (:func:`tfm_jax.platform.backends.
           peak_flops_info`: H100/H200 989 TFLOP/s); default attention, then cuDNN attention,
           then the ``fp8_delayed`` step (its speed-up over bf16, issue #11's step check)
precision  ``benchmarks/mixed_precision.py``: final loss of a short tiny-model run per policy
           (f32, bf16 compute, bf16 parameters with master weights / stochastic rounding) vs f32
fp8        ``benchmarks/fp8_gpu.py --skip-step``: FP8 (tfm-jax's own dot) vs bf16 GEMM TFLOP/s,
           and the FP8 GEMMs counted per quantized projection of a compiled fp8_delayed step
           (>= 3 each, no plain GEMM)
moe        MoE train step times of the three dispatch paths (dense reference, shard_map
           all_to_all, implicit sharding) on all local devices
decode     ``benchmarks/decode.py`` decode throughput (tokens/s, KV cache, no torch peer)
serve      ``benchmarks/serve_load.py --engine`` (the scheduler, no HTTP): continuous vs static
           batching under Poisson arrivals with log-uniform outputs, and MHA / GQA / MQA at one
           KV memory budget, at a model size where a decode step is memory-bound
=========  ==================================================================================

Each part runs in its own process (so no parent holds the GPU's memory) under its own time cap;
a part that crashes or runs past its cap is recorded as such (with what it wrote so far) and the
next one starts. The whole run stays under ``--budget`` seconds (default 495: about 8 minutes
with start-up and the wheel install). ``--dry`` runs every part at tiny size on CPU
(tested by ``tests/integration/test_device_check.py``); without a GPU the full mode says so and runs dry.

    OUT=/tmp/dc bash benchmarks/device_check.sh            # the device machine
    python benchmarks/device_check.py --out /tmp/dc --dry  # CPU, tiny
    python benchmarks/device_check.py --out /tmp/dc --parts env,mfu
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Optional

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PARTS = ("env", "plugin", "tests", "mfu", "precision", "fp8", "moe", "decode", "serve")
# Seconds per part on the GPU (sum 505, the default --budget 495 trims the last); each is also
# cut to what is left of the budget. --dry gives every cap and the budget DRY_SLACK times more
# (a loaded 2-core CPU compiles slowly).
BUDGET_S = 495
DRY_SLACK = 5
CAPS_S = {"env": 20, "plugin": 30, "tests": 80, "mfu": 150, "precision": 45, "fp8": 55,
          "moe": 40, "decode": 30, "serve": 45}
# Sized to finish in its cap (five files did not fit in 70 s): the FP8 numerics and the FP8
# GEMM count (gpu-marked), the attention cores (cuDNN as the GPU default included), the
# mixed-precision policy.
GPU_TEST_FILES = ("tests/unit/quant/test_fp8.py", "tests/unit/quant/test_hlo_check.py",
                  "tests/unit/layers/test_flash.py", "tests/unit/train/test_precision.py",
                  "tests/unit/serve/test_paged_kernel.py")
# The bf16-vs-f32 loss of a short run (benchmarks/mixed_precision.py): the tiny model on the
# built-in corpus, on the GPU; --dry: a 1-layer model, 3 steps.
PRECISION_ARGS = ["--steps", "150", "--policies", "f32,bf16-compute,bf16-master,bf16-stochastic",
                  "train.eval_batches=8"]
PRECISION_ARGS_DRY = ["--steps", "3", "--policies", "f32,bf16-master", "model.d_model=32",
                      "model.n_layers=1", "data.seq_len=32", "train.batch_size=4",
                      "train.eval_batches=1"]
MEM_FRACTION = "0.90"          # XLA_PYTHON_CLIENT_MEM_FRACTION of the GPU parts
DRY_TEST_FILES = ("tests/unit/quant/test_quant_formats.py::test_format_limits_come_from_ml_dtypes",)
MFU_TARGET = 0.45
MOE_SHAPE = {"model.d_model": 1024, "model.n_layers": 4, "model.n_heads": 8,
             "model.n_kv_heads": 8, "model.ffn_hidden": 2816, "model.vocab_size": 32000,
             "model.scan_layers": True, "data.seq_len": 1024, "train.batch_size": 8,
             "moe.n_experts": 8, "moe.top_k": 2}
MOE_SHAPE_DRY = {"model.d_model": 32, "model.n_layers": 2, "model.n_heads": 4,
                 "model.n_kv_heads": 2, "model.ffn_hidden": 64, "model.vocab_size": 264,
                 "model.scan_layers": True, "data.seq_len": 16, "train.batch_size": 8,
                 "moe.n_experts": 4, "moe.top_k": 2}
DRY_MOE_DEVICES = 4            # fake CPU devices of the dry MoE part (a real all_to_all)
DECODE_ARGS = ["--d-model", "2048", "--layers", "16", "--heads", "16", "--kv-heads", "8",
               "--ffn-hidden", "5632", "--vocab", "32000", "--batch", "8", "--context", "1024",
               "--new-tokens", "64", "--no-torch"]
DECODE_ARGS_DRY = ["--d-model", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2",
                   "--ffn-hidden", "128", "--context", "16", "--new-tokens", "4", "--no-torch"]
# serve_load --engine: d_model 1024, 8 layers, 16 heads, fp32; the KV budget (160 MiB) holds 4
# MHA sequences of max_len (160 pages of 1 MiB), GQA (8 KV heads) 2x and MQA 16x the pages
SERVE_ARGS = ["--engine", "--d-model", "1024", "--layers", "8", "--heads", "16",
              "--max-len", "576", "--output-dist", "log-uniform", "--output-len", "8", "512",
              "--kv-heads", "4", "--slots", "32", "--clients", "32", "--rate", "400",
              "--requests", "128", "--kv-memory", str(160 << 20)]
SERVE_ARGS_DRY = ["--engine", "--d-model", "32", "--layers", "2", "--heads", "4",
                  "--max-len", "48", "--output-dist", "log-uniform", "--output-len", "2", "16",
                  "--prompt-len", "2", "8", "--page-size", "8", "--slots", "4", "--clients",
                  "4", "--requests", "8"]


# ----------------------------------------------------------------------------- the parts
# Each runs in its own process: part(dry, save) -> dict; save(partial) keeps what is done so
# far on disk, so a part killed at its cap still reports it.


def _plugins() -> dict[str, Any]:
    """The PJRT plugins jax would discover: ``jax_plugins`` namespace modules (with the shared
    libraries beside them), ``jax_plugins`` entry points, and ``$PJRT_NAMES_AND_LIBRARY_PATHS``."""
    import importlib.util
    import pkgutil
    from importlib.metadata import entry_points

    out: dict[str, Any] = {"modules": [], "entry_points": [],
                           "PJRT_NAMES_AND_LIBRARY_PATHS":
                               os.environ.get("PJRT_NAMES_AND_LIBRARY_PATHS")}
    try:
        import jax_plugins
        names = [m.name for m in pkgutil.iter_modules(jax_plugins.__path__, "jax_plugins.")]
    except ImportError:
        names = []
    for name in names:
        spec = importlib.util.find_spec(name)
        where = (list(spec.submodule_search_locations or []) if spec else [])
        if spec and spec.origin and not where:
            where = [str(pathlib.Path(spec.origin).parent)]
        libs = sorted(str(p) for d in where for p in pathlib.Path(d).glob("*.so"))
        out["modules"].append({"module": name, "paths": where, "libraries": libs})
    out["entry_points"] = [{"name": e.name, "value": e.value}
                           for e in entry_points(group="jax_plugins")]
    return out


def part_env(dry: bool, save: Callable[[dict], None]) -> dict[str, Any]:
    import platform as py_platform

    import flax
    import jax
    import jaxlib
    import optax
    import orbax.checkpoint as ocp

    res: dict[str, Any] = {"python": py_platform.python_version(), "jax": jax.__version__,
                           "jaxlib": jaxlib.__version__, "flax": flax.__version__,
                           "optax": optax.__version__,
                           "orbax": getattr(ocp, "__version__", "?"), "plugins": _plugins()}
    save(res)
    devs = jax.devices()
    res.update(platform=devs[0].platform, device_kind=devs[0].device_kind,
               devices=[str(d) for d in devs], device_count=len(devs),
               default_backend=jax.default_backend())
    return res


def _cuda_plugin_library(plugins: dict[str, Any]) -> Optional[str]:
    for m in plugins["modules"]:
        if "cuda" in m["module"]:
            libs = [p for p in m["libraries"] if "plugin" in pathlib.Path(p).name] or m["libraries"]
            if libs:
                return libs[0]
    return None


_DEVICES_SNIPPET = ("import json, jax; d = jax.devices(); print('DEVICES ' + json.dumps("
                    "{'platform': d[0].platform, 'kind': d[0].device_kind, "
                    "'devices': [str(x) for x in d]}), flush=True); "
                    "print('COMPUTE', float(jax.numpy.arange(4.0).sum()))")


def _run_python(code_or_args: list[str], env: dict[str, str], timeout: int,
                keep_stdout: bool = False) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, *code_or_args], env=env, capture_output=True,
                           text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "timeout_s": timeout}
    out: dict[str, Any] = {"rc": p.returncode, "seconds": round(time.perf_counter() - t0, 1)}
    m = re.search(r"^DEVICES (.*)$", p.stdout, re.M)
    if m:
        out.update(json.loads(m.group(1)))
    m = re.search(r"^COMPUTE (\S+)$", p.stdout, re.M)
    if m:                          # a tiny computation ran there: arange(4).sum() == 6
        out["compute_ok"] = float(m.group(1)) == 6.0
    out["status"] = "ok" if p.returncode == 0 else "error"
    if p.returncode != 0:
        out["output_tail"] = (p.stdout + p.stderr)[-1500:]
    elif keep_stdout:
        out["stdout"] = p.stdout[-6000:]
    return out


def part_plugin(dry: bool, save: Callable[[dict], None]) -> dict[str, Any]:
    lib = _cuda_plugin_library(_plugins())
    if lib is None:
        return {"status": "skipped", "reason": "no CUDA PJRT plugin among the jax_plugins "
                "modules (jax[cuda] not installed here)"}
    res: dict[str, Any] = {"library": lib}
    base = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS",)}
    # jax's own mechanism: a plugin named by the variable, and only that platform initialised
    env = {**base, "PJRT_NAMES_AND_LIBRARY_PATHS": f"cuda_by_path:{lib}",
           "JAX_PLATFORMS": "cuda_by_path"}
    res["jax_variable"] = _run_python(["-c", _DEVICES_SNIPPET], env, 20)
    save(res)
    try:
        from tfm_jax.platform import backends
        has_tfm = hasattr(backends, "register_pjrt_plugin")
    except Exception:  # noqa: BLE001 -- recorded below as "not available"
        has_tfm = False
    if has_tfm:       # tfm-jax's backend.pjrt_plugin path (read for backend.platform=gpu)
        env = {**base, "TFM_JAX_PJRT_PLUGIN": lib, "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
        r = _run_python(["-m", "tfm_jax", "env", "--json", "--no-measure",
                         "backend.platform=gpu"], env, 22, keep_stdout=True)
        res["tfm_jax_env_var"] = r
    else:
        res["tfm_jax_env_var"] = {"status": "skipped",
                                  "reason": "tfm_jax.platform.backends has no register_pjrt_plugin"}
    res["status"] = res["jax_variable"]["status"]
    return res


def _parse_pytest(text: str) -> dict[str, Any]:
    """Counts and failing ids from ``pytest -v -rfE`` output (complete or cut short)."""
    results = re.findall(r"^(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", text,
                         re.M)
    counts: dict[str, int] = {}
    for _, r in results:
        counts[r.lower()] = counts.get(r.lower(), 0) + 1
    failed = [t for t, r in results if r in ("FAILED", "ERROR")]
    summary = re.findall(r"^(?:FAILED|ERROR) (\S+) - (.*)$", text, re.M)
    return {"counts": counts, "failed": failed,
            "failure_lines": [f"{t}: {m[:300]}" for t, m in summary][:20]}


def part_tests(dry: bool, save: Callable[[dict], None], cap: int = 80) -> dict[str, Any]:
    files = DRY_TEST_FILES if dry else GPU_TEST_FILES
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu" if dry else "cuda"      # conftest would pick cpu otherwise
    if not dry:    # f32 comparisons against numpy: no TF32 in the reference-checking tests
        env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"
    cmd = [sys.executable, "-m", "pytest", "-v", "-rfE", "--tb=line", "-p", "no:cacheprovider",
           *files]
    res: dict[str, Any] = {"files": list(files), "platform": env["JAX_PLATFORMS"],
                           "matmul_precision": env.get("JAX_DEFAULT_MATMUL_PRECISION",
                                                       "default")}
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=cap, cwd=ROOT)
        text, res["rc"] = p.stdout + p.stderr, p.returncode
        res["status"] = "ok" if p.returncode == 0 else "failures"
    except subprocess.TimeoutExpired as err:
        text = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        res["status"] = f"cut at {cap} s (counts are the tests finished by then)"
    res["seconds"] = round(time.perf_counter() - t0, 1)
    res.update(_parse_pytest(text))
    print(text[-4000:])
    return res


def part_mfu(dry: bool, save: Callable[[dict], None]) -> dict[str, Any]:
    from benchmarks import fp8_gpu

    shape = fp8_gpu.SHAPE_SMOKE if dry else fp8_gpu.SHAPE_1B
    res: dict[str, Any] = {"shape": shape, "target_mfu": MFU_TARGET}
    variants = {"bf16": ("bf16", {}), "bf16_cudnn": ("bf16", {"backend.attention": "cudnn"}),
                "fp8_delayed": ("fp8_delayed", {})}     # last: the FP8 step vs bf16 (issue #11)
    for name, (variant, extra) in variants.items():
        if dry and name == "bf16_cudnn":
            res[name] = {"status": "skipped", "reason": "cuDNN attention needs a GPU"}
            continue
        try:
            r = fp8_gpu.step_bench(shape, variant, 2 if dry else 8, extra=extra)
            r["status"] = "ok"
        except Exception as err:  # noqa: BLE001 -- recorded, next variant
            r = {"status": "error", "error": f"{type(err).__name__}: {str(err)[:600]}"}
        res[name] = r
        print(f"mfu {name}: " + (f"{r['step_s'] * 1e3:.1f} ms/step, {r['tokens_per_s']:,.0f} "
                                 f"tok/s, MFU {r['mfu']:.1%} ({r['peak_source']})"
                                 if "mfu" in r else r.get("error", r.get("reason", ""))),
              flush=True)
        save(res)
    if res["bf16"].get("step_s") and res["fp8_delayed"].get("step_s"):
        res["fp8_delayed_speedup"] = res["bf16"]["step_s"] / res["fp8_delayed"]["step_s"]
    best = max((res[v].get("mfu", 0.0) for v in ("bf16", "bf16_cudnn")), default=0.0)
    res["best_mfu"] = best
    res["meets_target"] = None if dry else best >= MFU_TARGET
    return res


def part_precision(dry: bool, save: Callable[[dict], None]) -> dict[str, Any]:
    from benchmarks import mixed_precision

    out = mixed_precision.main(PRECISION_ARGS_DRY if dry else PRECISION_ARGS)
    return {"steps": out["steps"], "config": out["config"], "results": out["results"]}


def part_fp8(dry: bool, save: Callable[[dict], None]) -> dict[str, Any]:
    from benchmarks import fp8_gpu

    with tempfile.TemporaryDirectory() as tmp:
        args = ["--out", tmp, "--skip-step"] + (["--smoke"] if dry else [])
        rc = fp8_gpu.main(args)
        res = json.loads((pathlib.Path(tmp) / "fp8_gpu.json").read_text())
    res["rc"] = rc
    return res


def part_moe(dry: bool, save: Callable[[dict], None]) -> dict[str, Any]:
    import jax

    from benchmarks import fp8_gpu

    devices = jax.devices()
    shape = MOE_SHAPE_DRY if dry else MOE_SHAPE
    res: dict[str, Any] = {"shape": shape, "devices": len(devices),
                           "note": "dense = every expert on every token (the single-device "
                           "reference); all_to_all = shard_map + lax.all_to_all over "
                           "mesh.expert; implicit = sharding constraints only"}
    for dispatch in ("dense", "all_to_all", "implicit"):
        extra = {"moe.dispatch": dispatch, "mesh.data": 1, "mesh.expert": len(devices)}
        try:
            r = fp8_gpu.step_bench(shape, "bf16", 2 if dry else 6, extra=extra, devices=devices)
            r = {k: r[k] for k in ("step_s", "tokens_per_s", "params", "flops_per_token", "mfu",
                                   "loss")}
            r["status"] = "ok"
        except Exception as err:  # noqa: BLE001 -- recorded, next dispatch
            r = {"status": "error", "error": f"{type(err).__name__}: {str(err)[:600]}"}
        res[dispatch] = r
        print(f"moe {dispatch}: " + (f"{r['step_s'] * 1e3:.1f} ms/step" if "step_s" in r
                                     else r["error"]), flush=True)
        save(res)
    return res


def part_decode(dry: bool, save: Callable[[dict], None]) -> dict[str, Any]:
    from benchmarks import decode

    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "decode.json"
        decode.main((DECODE_ARGS_DRY if dry else DECODE_ARGS) + ["--json", str(path)])
        return json.loads(path.read_text())


def part_serve(dry: bool, save: Callable[[dict], None]) -> dict[str, Any]:
    from benchmarks import serve_load

    res: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for scenario in ("batching", "kv-heads"):
            path = pathlib.Path(tmp) / f"{scenario}.json"
            serve_load.main((SERVE_ARGS_DRY if dry else SERVE_ARGS)
                            + ["--scenario", scenario, "--json", str(path)])
            res[scenario] = json.loads(path.read_text())
            save(res)
    return res


PART_FNS = {"env": part_env, "plugin": part_plugin, "tests": part_tests, "mfu": part_mfu,
            "precision": part_precision, "fp8": part_fp8, "moe": part_moe,
            "decode": part_decode, "serve": part_serve}


def _child(part: str, dry: bool, json_path: str, cap: int) -> int:
    path = pathlib.Path(json_path)

    def save(res: dict) -> None:
        path.write_text(json.dumps(res, indent=1, default=str))

    fn = PART_FNS[part]
    res = fn(dry, save, cap=max(cap - 5, 5)) if part == "tests" else fn(dry, save)
    save(res)
    return 0


# ----------------------------------------------------------------------------- the driver


def _part_env(part: str, dry: bool) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                     else "")
    env["PYTHONUNBUFFERED"] = "1"
    if dry:
        env["JAX_PLATFORMS"] = "cpu"
        flags = env.get("XLA_FLAGS", "")
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags).strip()
        if part == "moe":
            flags += f" --xla_force_host_platform_device_count={DRY_MOE_DEVICES}"
        env["XLA_FLAGS"] = flags.strip()
    elif part in ("decode", "mfu", "precision", "fp8", "moe", "serve"):
        env.setdefault("JAX_PLATFORMS", "cuda")   # benchmarks/decode.py defaults to cpu
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", MEM_FRACTION)
    return env


def run_part(part: str, dry: bool, cap: int, log) -> dict[str, Any]:
    """Run one part in its own process group under ``cap`` seconds; its JSON (or what it saved
    before it died / was killed) plus status, seconds and cap."""
    with tempfile.TemporaryDirectory() as tmp:
        json_path = pathlib.Path(tmp) / f"{part}.json"
        cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--child", part,
               "--json", str(json_path), "--cap", str(cap)] + (["--dry"] if dry else [])
        log.write(f"\n===== {part} (cap {cap} s) =====\n")
        log.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=_part_env(part, dry), stdout=log,
                                stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        try:
            rc: Optional[int] = proc.wait(timeout=cap)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)       # the part and anything it started
            proc.wait()
            rc = None
        seconds = round(time.perf_counter() - t0, 1)
        res = json.loads(json_path.read_text()) if json_path.is_file() else {}
    info = {"seconds": seconds, "cap_s": cap}
    if rc is None:
        info["part_status"] = f"killed at its {cap} s cap (results: what it saved before)"
    elif rc != 0:
        info["part_status"] = f"crashed (exit {rc}; see device_check.log)"
    else:
        info["part_status"] = "done"
    log.write(f"===== {part}: {info['part_status']} in {seconds} s\n")
    log.flush()
    return {**info, **res}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="output folder: device_check.json, device_check.log")
    p.add_argument("--dry", action="store_true", help="every part at tiny size on CPU")
    p.add_argument("--parts", default=",".join(PARTS), help=f"subset of {','.join(PARTS)}")
    p.add_argument("--budget", type=int, default=None, help="seconds for all parts together "
                   f"(default {BUDGET_S}; --dry: x{DRY_SLACK})")
    p.add_argument("--child", choices=PARTS, help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    p.add_argument("--cap", type=int, default=60, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return _child(args.child, args.dry, args.json, args.cap)
    if not args.out:
        p.error("--out is required")
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    bad = [s for s in parts if s not in PARTS]
    if bad:
        p.error(f"--parts: unknown {bad}; choose from {','.join(PARTS)}")
    if "env" in parts:
        parts.remove("env")
    parts.insert(0, "env")          # always first: it tells whether there is a GPU
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dry = args.dry
    budget = args.budget or (BUDGET_S * DRY_SLACK if dry else BUDGET_S)
    res: dict[str, Any] = {"mode": "dry (CPU, tiny sizes; timings mean nothing)" if dry
                           else "gpu", "started": time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                                time.gmtime()),
                           "budget_s": budget, "parts": {}}
    start = time.perf_counter()

    def write() -> None:
        (out / "device_check.json").write_text(json.dumps(res, indent=1, default=str))

    with open(out / "device_check.log", "a") as log:
        for part in parts:
            left = budget - (time.perf_counter() - start)
            cap = int(min(CAPS_S[part] * (DRY_SLACK if dry else 1), left))
            if cap < 10:
                res["parts"][part] = {"part_status": f"not run: {left:.0f} s of the budget left"}
                write()
                continue
            r = run_part(part, dry, cap, log)
            res["parts"][part] = r
            if part == "env" and not dry and r.get("platform") != "gpu":
                res["mode"] = (f"no GPU (platform {r.get('platform')}): the remaining parts "
                               "ran dry (CPU, tiny sizes)")
                dry = True
            write()
            print(f"{part:7s} {r['part_status']:12.12s} {r['seconds']:6.1f} s  "
                  + _headline(part, r), flush=True)
    res["seconds"] = round(time.perf_counter() - start, 1)
    res["device"] = res["parts"].get("env", {}).get("device_kind")
    write()
    print(f"wrote {out / 'device_check.json'} and {out / 'device_check.log'} "
          f"({res['seconds']} s)")
    return 0


def _headline(part: str, r: dict[str, Any]) -> str:
    """One line per part for the console."""
    if part == "env":
        return f"{r.get('device_kind')} x{r.get('device_count')} jax {r.get('jax')}"
    if part == "plugin":
        jv = r.get("jax_variable", {})
        return (f"{r.get('status')}: {jv.get('platform', '')} {jv.get('kind', '')} "
                f"{r.get('library', r.get('reason', ''))}")
    if part == "tests":
        return f"{r.get('counts')} {r.get('status', '')}"
    if part == "mfu":
        return "; ".join(f"{v} MFU {r[v]['mfu']:.1%}" for v in ("bf16", "bf16_cudnn", "fp8_delayed")
                         if isinstance(r.get(v), dict) and "mfu" in r[v])
    if part == "precision":
        return "; ".join(f"{k} {v['train_loss']:.3f} ({v.get('train_vs_f32_pct', 0):+.2f}%)"
                         for k, v in r.get("results", {}).items() if "train_loss" in v)
    if part == "fp8":
        return "; ".join(f"{g['n']}: fp8/bf16 {g.get('fp8_over_bf16', 0):.2f}x "
                         f"({g.get('fp8_tfm', {}).get('gemms')})" for g in r.get("gemm", [])) + (
            f"; every projection FP8: {r.get('projection_gemms', {}).get('every_projection_fp8')}")
    if part == "moe":
        return "; ".join(f"{d} {r[d]['step_s'] * 1e3:.1f} ms" for d in
                         ("dense", "all_to_all", "implicit")
                         if isinstance(r.get(d), dict) and "step_s" in r[d])
    if part == "decode" and isinstance(r.get("tfm_jax"), dict):
        return (f"{r['tfm_jax'].get('tokens_per_s', 0):,.0f} tok/s (batch {r.get('batch')}, "
                f"context {r.get('context')})")
    if part == "serve" and isinstance(r.get("batching"), dict):
        ratio = r["batching"].get("continuous_over_static", {}).get("median")
        kv = {row["scenario"]: row["tokens_per_s"] for row in
              r.get("kv-heads", {}).get("rows", [])}
        return (f"continuous/static {ratio}x; " if ratio else "") + "; ".join(
            f"{k} {v:,.0f} tok/s" for k, v in kv.items())
    return ""


if __name__ == "__main__":
    sys.exit(main())
