"""Quantization studies on a trained run: error per format x granularity x
strategy on real tensors, per-channel vs per-tensor for QKV vs FFN, EMA beta sensitivity, static
vs dynamic scaling under distribution shift, and the INT8 / INT4 / FP8 inference perplexity.

    tfm-jax train train.steps=300 run.dir=runs/tiny-300                  # a short trained run
    python -m experiments.scripts.quant_study --run-dir runs/tiny-300 --out runs/quant-study

Writes ``results.json``, ``results.md`` (the tables, and the seed's Ch2 claims beside the
measured values) and PNG plots into ``--out`` and prints where they are.

**Tensors.** Every projection that the FP8 recipes quantize (attention q/k/v/o, FFN) is
captured on ``--batches`` training batches of the run (steps 0..N-1 of its data stream): its
input (tokens, in), its kernel (in, out) and the gradient of the mean token loss w.r.t. its
output (tokens, out). They come from the run's own model: the FP8 dot
(:class:`~tfm_jax.quant.fp8.Fp8DotGeneral`) is intercepted as in calibration
(:mod:`tfm_jax.tools.calibrate`: high-precision GEMM), sows its operands and passes its output
through ``Module.perturb``, whose gradient (``jax.grad``) is the output gradient. Needs an
unscanned model (``model.scan_layers=false``, the default).

**Orientation.** Each tensor is laid out with its GEMM contraction axis last (the kernel is
transposed to (out, in)); *per channel* keeps axis 0 (one scale per token for inputs and output
gradients -- the scaling a GEMM can undo per output row -- and per output channel for kernels),
*per block B* uses blocks of B values along the contraction axis (as MX formats do).
Strategies: *dynamic* (exact ``fmt_max / amax`` of the tensor itself), *pow2* (that scale
rounded down to a power of two, the seed's "log-scale"), *delayed* (``fmt_max / max`` of the
amaxes of the previous batches' tensors: only where the amax's shape does not depend on the
batch, i.e. per tensor, and every kernel granularity). Errors are measured on the last batch:
relative error ``||q(x) - x|| / ||x||`` and SNR ``10 log10(||x||^2 / ||q(x) - x||^2)`` dB,
averaged over the projections.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import shutil
import sys
import time
from typing import Any, Optional

import numpy as np

FORMATS = ("float8_e4m3fn", "float8_e5m2", "int8", "int4")
GRANULARITIES = ("per_tensor", "per_channel", "block32", "block128")
STRATEGIES = ("dynamic", "pow2", "delayed")
ROLES = ("input", "kernel", "output_grad")
BETAS = (0.9, 0.99, 0.999, 0.9999)
SHIFT_FACTORS = (1, 2, 4, 8, 16, 32, 64)
GROUPS = {"q/k/v": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",),
          "ffn": ("wi", "wi_0", "wi_1", "wo")}
PPL_ROWS = ("int8_weight", "int8_weight_asym", "int4_weight", "fp8_dynamic", "fp8_delayed",
            "fp8_static (max)", "fp8_static (percentile)", "fp8_static (ema)")


# --------------------------------------------------------------------------------------------
# capture


def capture(cfg: Any, state: Any, batches: list[dict]) -> list[dict[str, dict[str, np.ndarray]]]:
    """Per batch: ``{projection: {"input", "kernel", "output_grad"}}`` (float32 numpy, 2-D)."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from tfm_jax.tools.calibrate import calibration_config, strip_quant_state
    from tfm_jax.quant.fp8 import Fp8DotGeneral, _plain_dot
    from tfm_jax.train import build, input_mask, masked_ce_sum

    if cfg.model.scan_layers:
        raise ValueError("quant_study captures per-layer tensors of an unscanned model; this "
                         "run has model.scan_layers=true (train one with scan_layers=false)")
    setup = build(calibration_config(cfg))
    model = setup.model

    def intercept(next_fun, args, kwargs, context):
        m = context.module
        if not (isinstance(m, Fp8DotGeneral) and context.method_name == "__call__"):
            return next_fun(*args, **kwargs)
        x, kernel, dn = args[:3]
        m.sow("captures", "input", x)
        m.sow("captures", "kernel", kernel)
        y = (m.matmul or _plain_dot)(x, kernel, dn, precision=kwargs.get("precision"))
        return m.perturb("output", y)

    def loss_fn(perturbations, params, model_state, batch, mutable):
        variables = {"params": params, **model_state}
        if perturbations is not None:
            variables["perturbations"] = perturbations
        with nn.intercept_methods(intercept):
            out = model.apply(variables, batch["inputs"], token_mask=input_mask(batch["mask"]),
                              train=False, mutable=mutable or False)
        logits, new = out if mutable else (out, {})
        loss = masked_ce_sum(logits, batch["targets"], batch["mask"]) / jnp.maximum(
            batch["mask"].sum(), 1.0)
        return loss, new

    @jax.jit
    def run(params, model_state, batch):
        _, new = loss_fn(None, params, model_state, batch, ["captures", "perturbations"])
        grads = jax.grad(lambda p: loss_fn(p, params, model_state, batch, [])[0])(
            new["perturbations"])
        return new["captures"], grads

    params = jax.device_put(strip_quant_state(state.params), setup.state_shardings.params)
    model_state = jax.device_put(state.model_state, setup.state_shardings.model_state)
    out = []
    with setup.context():
        for batch in batches:
            caps, grads = jax.device_get(run(params, model_state, setup.shard_batch(batch)))
            rows: dict[str, dict[str, np.ndarray]] = {}
            for tree, names in ((caps, ("input", "kernel")), (grads, ("output",))):
                for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
                    keys = [str(getattr(k, "key", k)) for k in path]
                    leaf = next(k for k in reversed(keys) if k in names)
                    proj = "/".join(keys[:keys.index("fp8")])
                    x = np.asarray(x[0] if isinstance(x, tuple) else x, np.float32)
                    rows.setdefault(proj, {})["output_grad" if leaf == "output" else leaf] = x
            out.append(rows)
    return out


# --------------------------------------------------------------------------------------------
# error of one quantization


def orient(x: np.ndarray, role: str) -> np.ndarray:
    """The tensor with its contraction axis last (kernels (in, out) -> (out, in))."""
    return np.ascontiguousarray(x.T) if role == "kernel" else x


def gran_args(gran: str) -> dict:
    if gran == "per_tensor":
        return {"axis": None}
    if gran == "per_channel":
        return {"axis": 0}
    return {"block": int(gran.removeprefix("block"))}


def amax_of(x: np.ndarray, gran: str) -> np.ndarray:
    from tfm_jax.quant.scaling import compute_amax

    return np.asarray(compute_amax(x, **gran_args(gran)))


def quant_error(x: np.ndarray, fmt: str, gran: str, scale: Optional[np.ndarray] = None) -> dict:
    """Relative error, SNR (dB) and saturated fraction (``|x| * scale > fmt_max`` beyond float32
    rounding) of ``dequantize(quantize(x))`` with the given multiplicative scale (None: dynamic
    exact)."""
    from tfm_jax.quant import dequantize, fmt_max, quantize
    from tfm_jax.quant.scaling import broadcast_scale

    q, s = quantize(x, fmt, scale=scale, **gran_args(gran))
    err = np.asarray(dequantize(q, s), np.float64) - x.astype(np.float64)
    sig = float(np.sum(np.square(x, dtype=np.float64)))
    noise = float(np.sum(err * err))
    xs = x.astype(np.float64) * np.asarray(broadcast_scale(s, x.shape), np.float64)
    # saturated: clipped by more than float32 rounding (the amax itself lands on fmt_max)
    return {"rel_err": math.sqrt(noise / sig) if sig else 0.0,
            "snr_db": 10 * math.log10(sig / noise) if noise and sig else float("inf"),
            "saturated": float(np.mean(np.abs(xs) > fmt_max(fmt) * (1 + 1e-6)))}


def strategy_scale(strategy: str, x: np.ndarray, history: list[np.ndarray], fmt: str,
                   gran: str, role: str) -> Optional[np.ndarray]:
    """The scale a strategy uses for ``x`` (None: dynamic exact); raises ``LookupError`` where
    it does not apply (delayed: per tensor, or a kernel -- a per-token or per-block amax of
    an activation belongs to other tokens in the previous batches)."""
    from tfm_jax.quant.scaling import compute_scale, round_scale_pow2

    if strategy == "dynamic":
        return None
    if strategy == "pow2":
        return np.asarray(round_scale_pow2(compute_scale(amax_of(x, gran), fmt)))
    if not history or not (gran == "per_tensor" or role == "kernel"):
        raise LookupError(strategy)
    return np.asarray(compute_scale(np.max(np.stack(history), axis=0), fmt))


def _group(proj: str) -> str:
    name = proj.split("/")[-1]
    return next((g for g, names in GROUPS.items() if name in names), "other")


def study_errors(caps: list[dict], formats=FORMATS, granularities=GRANULARITIES) -> list[dict]:
    """Rows (role, format, granularity, strategy, projection group): mean relative error and
    SNR over the projections, on the last batch (delayed: history of the earlier batches)."""
    last = caps[-1]
    acc: dict[tuple, list[dict]] = {}
    for proj, tensors in last.items():
        for role in ROLES:
            x = orient(tensors[role], role)
            for gran in granularities:
                try:
                    amax_of(x, gran)
                except ValueError:            # block does not divide the contraction axis
                    continue
                hist = [amax_of(orient(c[proj][role], role), gran) for c in caps[:-1]]
                for fmt in formats:
                    for strategy in STRATEGIES:
                        try:
                            s = strategy_scale(strategy, x, hist, fmt, gran, role)
                        except LookupError:
                            continue
                        e = quant_error(x, fmt, gran, s)
                        for group in ("all", _group(proj)):
                            acc.setdefault((role, fmt, gran, strategy, group), []).append(e)
    rows = []
    for (role, fmt, gran, strategy, group), es in sorted(acc.items()):
        rows.append({"role": role, "format": fmt, "granularity": gran, "strategy": strategy,
                     "group": group, "n": len(es),
                     "rel_err": float(np.mean([e["rel_err"] for e in es])),
                     "snr_db": float(np.mean([e["snr_db"] for e in es])),
                     "saturated": float(np.mean([e["saturated"] for e in es]))})
    return rows


def reversed_formula(caps: list[dict], fmt: str = "float8_e4m3fn") -> dict:
    """The seed's warning: ``amax / fmt_max`` used as the multiplier (a plain cast): fraction
    of non-zero inputs flushed to 0, of values that become NaN/inf, and the relative error."""
    from tfm_jax.quant import fmt_dtype, fmt_max

    flushed, nonfinite, errs, amaxes = [], [], [], []
    for tensors in caps[-1].values():
        x = tensors["input"].astype(np.float32)
        amaxes.append(float(np.abs(x).max()))
        s = np.float32(amaxes[-1] / fmt_max(fmt))
        with np.errstate(over="ignore", invalid="ignore"):
            q = (x * s).astype(fmt_dtype(fmt)).astype(np.float32)
            back = q / s
        nz = x != 0
        flushed.append(float(np.mean((q == 0)[nz])))
        nonfinite.append(float(np.mean(~np.isfinite(q))))
        errs.append(float(np.linalg.norm(np.nan_to_num(back - x)) / np.linalg.norm(x)))
    return {"format": fmt, "max_amax": max(amaxes), "flushed": float(np.mean(flushed)),
            "nonfinite": float(np.mean(nonfinite)), "rel_err": float(np.mean(errs))}


# --------------------------------------------------------------------------------------------
# EMA beta and distribution shift


def drift(t: int, steps: int, top: float = 8.0) -> float:
    """Amax drift factor at step t: up from 1 to ``top`` over the first half (geometric),
    back down over the second."""
    half = steps / 2
    u = t / half if t <= half else (steps - t) / half
    return float(top ** u)


def study_ema(caps: list[dict], projs: list[str], steps: int = 200,
              fmt: str = "float8_e4m3fn") -> dict:
    """Error per step of EMA-smoothed scales (the seed's ``s_t = beta s_(t-1) + (1 - beta)
    fmt_max / amax_t``, then x_t quantized with s_t) for each beta, beside dynamic and delayed
    (history 16, max), on ``x_t = input of batch (t mod N) * drift(t)``."""
    import jax.numpy as jnp

    from tfm_jax.quant.scaling import compute_amax, compute_scale, ema_scale

    curves: dict[str, dict[str, list[float]]] = {}
    for proj in projs:
        xs = [c[proj]["input"] for c in caps]
        scales = {f"beta={b}": None for b in BETAS}
        hist: list[float] = []
        for t in range(steps):
            x = (xs[t % len(xs)] * np.float32(drift(t, steps))).astype(np.float32)
            amax = compute_amax(x)
            for b in BETAS:
                k = f"beta={b}"
                s = scales[k]
                scales[k] = (compute_scale(amax, fmt) if s is None else
                             ema_scale(s, amax, fmt, b))
            variants = dict(scales)
            variants["dynamic"] = None
            variants["delayed (16, max)"] = (compute_scale(jnp.float32(max(hist[-16:])), fmt)
                                             if hist else compute_scale(amax, fmt))
            hist.append(float(amax))
            for name, s in variants.items():
                e = quant_error(x, fmt, "per_tensor", None if s is None else np.asarray(s))
                c = curves.setdefault(name, {"rel_err": [0.0] * steps,
                                             "saturated": [0.0] * steps})
                c["rel_err"][t] += e["rel_err"] / len(projs)
                c["saturated"][t] += e["saturated"] / len(projs)
    summary = {name: {"mean_rel_err": float(np.mean(c["rel_err"])),
                      "max_rel_err": float(np.max(c["rel_err"])),
                      "mean_saturated": float(np.mean(c["saturated"])),
                      "steps_saturating_over_1pct": int(np.sum(np.asarray(c["saturated"])
                                                               > 0.01))}
               for name, c in curves.items()}
    return {"format": fmt, "steps": steps, "projections": projs,
            "drift": [drift(t, steps) for t in range(steps)], "curves": curves,
            "summary": summary}


def study_shift(caps: list[dict], formats=("float8_e4m3fn", "int8")) -> list[dict]:
    """Static scale (max amax of the earlier batches' inputs, per tensor) vs dynamic, on the
    last batch's inputs scaled by each of :data:`SHIFT_FACTORS`; mean over projections."""
    from tfm_jax.quant.scaling import compute_scale

    rows = []
    for fmt in formats:
        for f in SHIFT_FACTORS:
            acc = {"static": [], "dynamic": []}
            for proj, tensors in caps[-1].items():
                calib = caps[:-1] or caps
                amax = max(float(np.abs(c[proj]["input"]).max()) for c in calib)
                s = np.asarray(compute_scale(np.float32(amax), fmt))
                x = (tensors["input"] * np.float32(f)).astype(np.float32)
                acc["static"].append(quant_error(x, fmt, "per_tensor", s))
                acc["dynamic"].append(quant_error(x, fmt, "per_tensor", None))
            for name, es in acc.items():
                rows.append({"format": fmt, "factor": f, "scaling": name,
                             "rel_err": float(np.mean([e["rel_err"] for e in es])),
                             "snr_db": float(np.mean([e["snr_db"] for e in es])),
                             "saturated": float(np.mean([e["saturated"] for e in es]))})
    return rows


# --------------------------------------------------------------------------------------------
# inference perplexity


def study_ppl(run_dir: pathlib.Path, out: pathlib.Path, calib_batches: int,
              corpus: Any) -> dict:
    """fp32 vs weight-only INT8 / INT8 asym / INT4 (``tfm-jax quantize``) vs FP8 dynamic /
    delayed / static (three calibration methods) validation perplexity."""
    from tfm_jax.tools.convert import load_run_config
    from tfm_jax.tools.calibrate import calibrate_run, restore_checkpoint, restore_with_recipe
    from tfm_jax.tools.quantize import quantize_run
    from tfm_jax.train import evaluate

    cfg = load_run_config(run_dir)
    setup, state = restore_checkpoint(cfg)
    base = evaluate(setup, state, corpus.val)
    del state
    rows = {"fp32": base}
    for recipe in PPL_ROWS[:3]:
        shutil.rmtree(out / "ptq" / recipe, ignore_errors=True)     # this study's own output
        res = quantize_run(run_dir, recipe, out / "ptq" / recipe, corpus=corpus)
        rows[recipe] = res.eval["quantized"]
    for recipe in ("fp8_dynamic", "fp8_delayed"):
        s, st = restore_with_recipe(cfg.replace(**{"quant.recipe": recipe}),
                                    calib_batches=calib_batches, corpus=corpus)
        rows[recipe] = evaluate(s, st, corpus.val)
    for method in ("max", "percentile", "ema"):
        cal = calibrate_run(run_dir, calib_batches, method, out=out / f"calibration-{method}.json",
                            corpus=corpus)
        s, st = restore_with_recipe(cfg.replace(**{"quant.recipe": "fp8_static",
                                                   "quant.calibration": str(cal.path)}),
                                    corpus=corpus)
        rows[f"fp8_static ({method})"] = evaluate(s, st, corpus.val)
    for r in rows.values():
        r["ppl_delta_pct"] = 100.0 * (r["val_ppl"] / base["val_ppl"] - 1.0)
    return {"calib_batches": calib_batches, "val_tokens": base["val_tokens"], "rows": rows}


# --------------------------------------------------------------------------------------------
# report


def plots(res: dict, out: pathlib.Path) -> list[pathlib.Path]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    files = []
    err = [r for r in res["errors"] if r["group"] == "all"]
    fig, axs = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    for ax, role in zip(axs, ROLES):
        width = 0.8 / len(FORMATS)
        for i, fmt in enumerate(FORMATS):
            ys = [next((r["snr_db"] for r in err if r["role"] == role and r["format"] == fmt
                        and r["granularity"] == g and r["strategy"] == "dynamic"), np.nan)
                  for g in GRANULARITIES]
            ax.bar(np.arange(len(GRANULARITIES)) + i * width, ys, width, label=fmt)
        ax.set_xticks(np.arange(len(GRANULARITIES)) + 0.4 - width / 2, GRANULARITIES)
        ax.set_title(f"{role} (dynamic exact scale)")
        ax.grid(axis="y", alpha=0.3)
    axs[0].set_ylabel("SNR (dB), mean over projections")
    axs[0].legend(fontsize=8)
    fig.tight_layout()
    files.append(out / "snr_format_granularity.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    fig, axs = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    for ax, role in zip(axs, ROLES):
        width = 0.8 / len(STRATEGIES)
        for i, st in enumerate(STRATEGIES):
            ys = [next((r["snr_db"] for r in err if r["role"] == role and r["format"] == fmt
                        and r["granularity"] == "per_tensor" and r["strategy"] == st), np.nan)
                  for fmt in FORMATS]
            ax.bar(np.arange(len(FORMATS)) + i * width, ys, width, label=st)
        ax.set_xticks(np.arange(len(FORMATS)) + 0.4 - width / 2,
                      [f.replace("float8_", "") for f in FORMATS])
        ax.set_title(f"{role}, per tensor")
        ax.grid(axis="y", alpha=0.3)
    axs[0].set_ylabel("SNR (dB)")
    axs[0].legend(fontsize=8)
    fig.tight_layout()
    files.append(out / "snr_strategy.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    gains = res["qkv_vs_ffn"]
    fig, ax = plt.subplots(figsize=(8, 4))
    keys = sorted({(g["role"], g["format"]) for g in gains})
    groups = list(GROUPS)
    width = 0.8 / len(groups)
    for i, grp in enumerate(groups):
        ys = [next((g["gain_db"] for g in gains if (g["role"], g["format"]) == k
                    and g["group"] == grp), np.nan) for k in keys]
        ax.bar(np.arange(len(keys)) + i * width, ys, width, label=grp)
    ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2,
                  [f"{r}\n{f.replace('float8_', '')}" for r, f in keys], fontsize=8)
    ax.set_ylabel("SNR gain per channel - per tensor (dB)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    files.append(out / "per_channel_gain.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    ema = res["ema"]
    fig, axs = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    for name, c in ema["curves"].items():
        axs[0].plot(c["rel_err"], label=name, lw=1.2)
        axs[1].plot(c["saturated"], label=name, lw=1.2)
    axs[0].set_yscale("log")
    axs[0].set_ylabel("relative error (e4m3)")
    axs[1].set_ylabel("fraction saturated")
    axs[1].set_xlabel("step (amax drifts x1 -> x8 -> x1)")
    tw = axs[0].twinx()
    tw.plot(ema["drift"], color="gray", ls=":", lw=1)
    tw.set_ylabel("drift factor", color="gray")
    axs[0].legend(fontsize=8, ncol=3)
    fig.tight_layout()
    files.append(out / "ema_beta.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    shift = res["shift"]
    fig, axs = plt.subplots(1, 2, figsize=(11, 4))
    for fmt in sorted({r["format"] for r in shift}):
        for sc, ls in (("static", "-"), ("dynamic", "--")):
            rs = [r for r in shift if r["format"] == fmt and r["scaling"] == sc]
            f = [r["factor"] for r in rs]
            axs[0].plot(f, [r["rel_err"] for r in rs], ls, marker="o", label=f"{fmt} {sc}")
            axs[1].plot(f, [r["saturated"] for r in rs], ls, marker="o", label=f"{fmt} {sc}")
    for ax in axs:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("input scale factor (static scale calibrated at 1)")
        ax.grid(alpha=0.3)
    axs[0].set_yscale("log")
    axs[0].set_ylabel("relative error")
    axs[1].set_ylabel("fraction saturated")
    axs[0].legend(fontsize=8)
    fig.tight_layout()
    files.append(out / "static_vs_dynamic_shift.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)
    return files


def qkv_vs_ffn(errors: list[dict]) -> list[dict]:
    """SNR gain of per channel over per tensor (dynamic) by projection group, role, format."""
    out = []
    for r in errors:
        if r["granularity"] != "per_channel" or r["strategy"] != "dynamic" or r["group"] == "all":
            continue
        pt = next(x for x in errors if x["granularity"] == "per_tensor"
                  and x["strategy"] == "dynamic" and x["group"] == r["group"]
                  and x["role"] == r["role"] and x["format"] == r["format"])
        out.append({"group": r["group"], "role": r["role"], "format": r["format"],
                    "per_tensor_snr_db": pt["snr_db"], "per_channel_snr_db": r["snr_db"],
                    "gain_db": r["snr_db"] - pt["snr_db"]})
    return out


def _fmt(x: float, nd: int = 2) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def claims(res: dict) -> list[dict]:
    """The seed's Ch2 claims beside what this study measured (verdicts follow the numbers)."""
    rows = []
    rev = res["reversed"]
    rows.append({"claim": "Ch2.2: scale = FP8_MAX/amax compresses; written reversed "
                 "(amax/FP8_MAX) it overflows",
                 "measured": "reversed multiplier on real inputs (largest amax "
                 f"{rev.get('max_amax', float('nan')):.3g}): {100 * rev['flushed']:.1f} % of "
                 f"non-zeros flushed to 0, {100 * rev['nonfinite']:.2f} % non-finite, rel. error "
                 f"{rev['rel_err']:.3f}; the largest value becomes amax²/448, so it overflows "
                 "(NaN for e4m3fn) only when amax > 448 (shown in tests/unit/quant/test_quant_formats.py)",
                 "verdict": "direction right; the failure on small tensors is underflow, "
                 "overflow needs amax > FP8_MAX", "where": "CPU, tiny run"})
    err = [r for r in res["errors"] if r["group"] == "all"]

    def snr(role, fmt, gran, st):
        return next((r["snr_db"] for r in err if (r["role"], r["format"], r["granularity"],
                                                  r["strategy"]) == (role, fmt, gran, st)),
                    float("nan"))
    d = [snr(r, "float8_e4m3fn", "per_tensor", "dynamic") - snr(r, "float8_e4m3fn",
                                                                 "per_tensor", "pow2")
         for r in ROLES]
    di = [snr(r, "int8", "per_tensor", "dynamic") - snr(r, "int8", "per_tensor", "pow2")
          for r in ROLES]
    rows.append({"claim": "Ch2.2: log-scale (power-of-two) scales avoid floating error",
                 "measured": "SNR exact − pow2 (per tensor, input/kernel/grad): e4m3 "
                 + "/".join(f"{x:+.2f}" for x in d) + " dB, int8 "
                 + "/".join(f"{x:+.2f}" for x in di) + " dB",
                 "verdict": "pow2 is exact to apply but costs up to one binade of range: no "
                 "accuracy gain (≈0 dB for e4m3, a loss for int8)", "where": "CPU, tiny run"})
    ema = res["ema"]["summary"]
    ok = [k for k, v in ema.items() if k.startswith("beta") and
          v["steps_saturating_over_1pct"] == 0]
    bad = [k for k, v in ema.items() if k.startswith("beta") and k not in ok]
    top = max(res["ema"]["drift"])
    rate = 100 * (top ** (2 / res["ema"]["steps"]) - 1)
    rows.append({"claim": "Ch2.2/2.4: EMA smoothing of the scale (β=0.999) prevents jitter",
                 "measured": "; ".join(f"{k}: mean rel. err {v['mean_rel_err']:.4f}, "
                                       f"saturated {100 * v['mean_saturated']:.2f} %"
                                       for k, v in ema.items()),
                 "verdict": f"it smooths, and so lags: with the amax drifting {rate:.1f} %/step "
                 f"{', '.join(bad) or 'no β'} saturate on the rise "
                 f"(β=0.999: {100 * ema.get('beta=0.999', {}).get('mean_saturated', 0):.1f} % "
                 f"of values on average), {', '.join(ok) or 'none'} track it; dynamic and "
                 "delayed (max of 16) never saturate here", "where": "CPU, tiny run "
                 "(real inputs, synthetic drift)"})
    g = {(x["group"], x["role"], x["format"]): x["gain_db"] for x in res["qkv_vs_ffn"]}

    def gain(grp, fmt, role="kernel"):
        return g.get((grp, role, fmt), float("nan"))
    parts = [f"{grp} {fmt.replace('float8_', '')} {gain(grp, fmt):+.2f}"
             for fmt in ("float8_e4m3fn", "int8", "int4") for grp in ("q/k/v", "ffn")]
    diff = max(abs(gain("q/k/v", f) - gain("ffn", f)) for f in ("float8_e4m3fn", "int8",
                                                                 "int4"))
    rows.append({"claim": "Ch2.2: per-channel scales: QKV accuracy up, FFN fine per tensor",
                 "measured": "kernel SNR gain per channel − per tensor (dB): " + ", ".join(parts),
                 "verdict": ("no QKV-specific gain: " if diff < 1.0 else "partly: ")
                 + f"per-channel kernels gain ≈{gain('q/k/v', 'int8'):.1f} dB for int8 and "
                 f"≈{gain('q/k/v', 'float8_e4m3fn'):.1f} dB for e4m3 (a float format's error is "
                 f"relative: a scale only moves the range), q/k/v and FFN within {diff:.1f} dB "
                 "of each other", "where": "CPU, tiny run"})
    shift = [r for r in res["shift"] if r["format"] == "float8_e4m3fn"]
    collapse = next((r["factor"] for r in shift if r["scaling"] == "static"
                     and r["saturated"] > 0.01), None)
    rows.append({"claim": "Ch2.3: static scaling: a distribution shift collapses accuracy "
                 "(recalibrate)", "measured": "e4m3 static, inputs ×f: "
                 + ", ".join(f"×{r['factor']} err {r['rel_err']:.3f} sat "
                             f"{100 * r['saturated']:.1f} %" for r in shift
                             if r["scaling"] == "static")
                 + f"; dynamic stays at {shift[0]['rel_err']:.3f}",
                 "verdict": f"> 1 % saturated from ×{collapse}" if collapse else
                 "not reached within ×64", "where": "CPU, tiny run"})
    ov = res.get("overhead")
    if ov:
        ratios = ", ".join(f"{'x'.join(map(str, r['shape']))}: "
                           f"{100 * r['amax_scale_over_gemm']:.1f} %" for r in ov["rows"])
        rows.append({"claim": "Ch2.3: dynamic scaling costs ≈2 % latency (amax computation)",
                     "measured": f"amax+scale / GEMM (N×K×M): {ratios}",
                     "verdict": "shape-dependent: large for small GEMMs, ≈2 % only for large "
                     "ones; on CPU the GEMM is slow, so a GPU's ratio is higher, not lower",
                     "where": f"{ov.get('device', 'CPU')}, wall clock under load"})
    rows.append({"claim": "Ch2.3: static scaling: zero runtime overhead, throughput ↑3.2× "
                 "(HPU, MLPerf)", "measured": "not measurable here (no FP8 GEMM on CPU); the "
                 "static recipe computes no amax at all (by construction)",
                 "verdict": "not measurable here", "where": "—"})
    ppl = res.get("ppl")
    if ppl:
        r = ppl["rows"]
        dyn = r["fp8_dynamic"]
        rows.append({"claim": "Ch2.3: dynamic scaling loses < 0.5 PPL (H100)",
                     "measured": f"fp8_dynamic ppl {dyn['val_ppl']:.3f} vs fp32 "
                     f"{r['fp32']['val_ppl']:.3f} ({dyn['val_ppl'] - r['fp32']['val_ppl']:+.3f}"
                     f" ppl, {dyn['ppl_delta_pct']:+.2f} %)",
                     "verdict": "a CPU stand-in (emulated e4m3, one run) within 0.5 PPL; the "
                     "claim is about an H100", "where": "CPU, tiny run"})
    return rows


def markdown(res: dict) -> str:
    from tfm_jax.ablate.report import provenance_text

    lines = [f"# Quantization study: {res['run_dir']}", "",
             f"Tensors from {res['batches']} training batches (errors on the last; delayed "
             "scales from the earlier ones). Command: `" + res["command"] + "`", ""]
    if res.get("provenance"):
        lines += [f"Run: {res.get('scale', '?')}. Provenance: "
                  f"{provenance_text(res['provenance'])}", ""]
    ppl = res.get("ppl")
    if ppl:
        lines += ["## Inference perplexity", "",
                  f"Validation {ppl['val_tokens']:,} tokens; FP8 calibration / delayed history "
                  f"from {ppl['calib_batches']} training batches; FP8 = e4m3 per tensor, "
                  "projections only (embedding and LM head high precision).", "",
                  "| recipe | val loss | perplexity | Δ perplexity |", "|---|---|---|---|"]
        for name, r in ppl["rows"].items():
            lines.append(f"| {name} | {r['val_loss']:.5f} | {r['val_ppl']:.4f} | "
                         + ("—" if name == "fp32" else f"{r['ppl_delta_pct']:+.3f} %") + " |")
        lines.append("")
    lines += ["## Error per format × granularity × strategy (mean over projections)", "",
              "| role | format | granularity | dynamic SNR dB | pow2 SNR dB | delayed SNR dB |"
              " dynamic rel. err |", "|---|---|---|---|---|---|---|"]
    err = {(r["role"], r["format"], r["granularity"], r["strategy"]): r
           for r in res["errors"] if r["group"] == "all"}
    for role in ROLES:
        for fmt in FORMATS:
            for gran in GRANULARITIES:
                if (role, fmt, gran, "dynamic") not in err:
                    continue
                cell = [_fmt(err.get((role, fmt, gran, s), {}).get("snr_db", float("nan")), 1)
                        for s in STRATEGIES]
                lines.append(f"| {role} | {fmt} | {gran} | " + " | ".join(cell) + " | "
                             f"{err[(role, fmt, gran, 'dynamic')]['rel_err']:.4f} |")
    lines += ["", "## Per channel vs per tensor by projection group (dynamic)", "",
              "| group | role | format | per tensor SNR dB | per channel SNR dB | gain dB |",
              "|---|---|---|---|---|---|"]
    for g in sorted(res["qkv_vs_ffn"], key=lambda g: (g["role"], g["format"], g["group"])):
        lines.append(f"| {g['group']} | {g['role']} | {g['format']} | "
                     f"{g['per_tensor_snr_db']:.1f} | {g['per_channel_snr_db']:.1f} | "
                     f"{g['gain_db']:+.2f} |")
    ema = res["ema"]
    lines += ["", f"## EMA β sensitivity ({ema['format']}, {ema['steps']} steps, amax drifting "
              "×1 → ×8 → ×1; projections " + ", ".join(ema["projections"]) + ")", "",
              "| scale | mean rel. err | max rel. err | mean saturated | steps > 1 % saturated |",
              "|---|---|---|---|---|"]
    for k, v in ema["summary"].items():
        lines.append(f"| {k} | {v['mean_rel_err']:.4f} | {v['max_rel_err']:.4f} | "
                     f"{100 * v['mean_saturated']:.3f} % | {v['steps_saturating_over_1pct']} |")
    lines += ["", "## Static vs dynamic under distribution shift (inputs × factor, per tensor)",
              "", "| format | factor | static rel. err | static saturated | dynamic rel. err |",
              "|---|---|---|---|---|"]
    sh = {(r["format"], r["factor"], r["scaling"]): r for r in res["shift"]}
    for (fmt, f, sc), r in sh.items():
        if sc == "static":
            lines.append(f"| {fmt} | ×{f} | {r['rel_err']:.4f} | {100 * r['saturated']:.2f} % | "
                         f"{sh[(fmt, f, 'dynamic')]['rel_err']:.4f} |")
    rev = res["reversed"]
    lines += ["", f"Reversed formula (`amax / FP8_MAX` as the multiplier, plain cast, "
              f"{rev['format']}): {100 * rev['flushed']:.1f} % of non-zero inputs flushed to 0, "
              f"{100 * rev['nonfinite']:.2f} % non-finite, rel. error {rev['rel_err']:.3f}.", "",
              "## Seed Ch2 claims", "",
              "What the numbers say about each claim; the verdicts, under stated rules, are in "
              "CLAIMS.md (`tfm-jax claims`).", "", "| claim | measured | reading | where |",
              "|---|---|---|---|"]
    for c in res["claims"]:
        lines.append(f"| {c['claim']} | {c['measured']} | {c['verdict']} | {c['where']} |")
    lines += ["", "Plots: " + ", ".join(f"`{pathlib.Path(p).name}`" for p in res["plots"]), ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# main


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", required=True, help="a run directory written by tfm-jax train")
    p.add_argument("--out", required=True, help="output folder (results.json, results.md, PNGs)")
    p.add_argument("--batches", type=int, default=8,
                   help="training batches captured (the last is measured; default 8)")
    p.add_argument("--calib-batches", type=int, default=16,
                   help="batches for FP8 calibration and the delayed histories (default 16)")
    p.add_argument("--ema-steps", type=int, default=200, help="steps of the EMA drift study")
    p.add_argument("--no-ppl", action="store_true",
                   help="skip the perplexity table (quantized runs, FP8 evals)")
    p.add_argument("--overhead-json", default=None,
                   help="results of benchmarks/fp8_scaling_overhead.py (--json) for the "
                   "claims table")
    p.add_argument("--report-only", action="store_true",
                   help="re-write results.md, the claims and the plots from --out/results.json")
    return p.parse_args(argv)


def run(args: argparse.Namespace, argv: Optional[list[str]] = None) -> dict[str, Any]:
    import jax

    from tfm_jax import data as data_lib
    from tfm_jax.ablate.provenance import load_average, provenance
    from tfm_jax.ablate.report import scale_of
    from tfm_jax.tools.calibrate import calibration_batches, restore_checkpoint
    from tfm_jax.tools.convert import load_run_config

    if args.batches < 2:
        raise SystemExit("quant_study: --batches must be >= 2 (the last batch is measured, the "
                         "earlier ones give the delayed / static scales)")
    run_dir, out = pathlib.Path(args.run_dir), pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    overhead = (json.loads(pathlib.Path(args.overhead_json).read_text())
                if args.overhead_json else None)
    if args.report_only:
        res = json.loads((out / "results.json").read_text())
        if overhead:
            res["overhead"] = overhead
        return _report(res, out)
    t0 = time.perf_counter()
    command = "python -m experiments.scripts.quant_study " + " ".join(argv or [])
    prov = provenance(command, jax.devices()[:1])
    cfg = load_run_config(run_dir)
    corpus = data_lib.load_corpus(cfg.data.path, cfg.data.val_fraction, cfg.data.cache_dir,
                                  include=cfg.data.include)
    _, state = restore_checkpoint(cfg)
    caps = capture(cfg, state, list(calibration_batches(cfg, corpus, args.batches)))
    del state
    projs = sorted(caps[-1])
    errors = study_errors(caps)
    ema_projs = [projs[0], projs[-1]]
    res: dict[str, Any] = {
        "run_dir": str(run_dir), "batches": args.batches, "command": command,
        "scale": scale_of([cfg]), "provenance": prov,
        "projections": projs, "errors": errors, "qkv_vs_ffn": qkv_vs_ffn(errors),
        "ema": study_ema(caps, ema_projs, args.ema_steps), "shift": study_shift(caps),
        "reversed": reversed_formula(caps)}
    if not args.no_ppl:
        res["ppl"] = study_ppl(run_dir, out, args.calib_batches, corpus)
    if overhead:
        res["overhead"] = overhead
    res["seconds"] = time.perf_counter() - t0
    prov["load_end"] = load_average()
    return _report(res, out)


def _report(res: dict, out: pathlib.Path) -> dict:
    res["claims"] = claims(res)
    res["plots"] = [str(p) for p in plots(res, out)]
    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / "results.md").write_text(markdown(res))
    return res


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else list(argv)
    res = run(parse_args(argv), argv)
    out = pathlib.Path(res["plots"][0]).parent
    print(f"quant study of {res['run_dir']} ({res['seconds']:.0f} s):\n"
          f"  results  {out / 'results.json'}\n  table    {out / 'results.md'}\n"
          + "".join(f"  plot     {p}\n" for p in res["plots"]), end="")
    if "ppl" in res:
        for name, r in res["ppl"]["rows"].items():
            print(f"  {name:<24} ppl {r['val_ppl']:.4f}  "
                  + ("" if name == "fp32" else f"{r['ppl_delta_pct']:+.3f} %"))
    return res


if __name__ == "__main__":
    main()
