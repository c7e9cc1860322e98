"""Static FP8 calibration (``tfm-jax calibrate``) and FP8 inference of a run trained without FP8.

**Calibration** (:func:`calibrate_run`): N training batches (steps 0..N-1 of the run's data
stream) go through the run's own model with every quantizable projection's dot replaced by the
FP8 dot (:class:`~tfm_jax.quant.fp8.Fp8DotGeneral`, recipe ``fp8_dynamic``, so the params tree
is the fp32 one) -- and that dot intercepted (``nn.intercept_methods``) so it runs the run's
*high-precision* GEMM (as Transformer Engine calibrates: statistics in high precision) while it
sows, through the telemetry route (:mod:`tfm_jax.core.telemetry`), per projection and batch:
``calib_input_amax`` (max |x|), ``calib_input_percentile`` (the ``percentile``-th percentile of
|x|) and ``calib_kernel_amax`` (per tensor, or per output channel with
``quant.kernel_granularity=per_channel``). The forward is therefore exactly the fp32 model's.
:func:`reduce_scales` turns the per-batch statistics into multiplicative scales
``fmt_max / amax / 2**margin`` (:func:`~tfm_jax.quant.scaling.compute_scale`):

* ``max``: amax = the max over the N batches;
* ``percentile``: amax = the mean over the batches of each batch's percentile of |x| (clips
  the rare outliers beyond it: they saturate);
* ``ema``: the seed's EMA of the scale, ``s_b = beta * s_(b-1) + (1 - beta) * fmt_max /
  amax_b`` from ``s_0 = fmt_max / amax_0`` (:func:`~tfm_jax.quant.scaling.ema_scale`).

The method applies to the *inputs*; kernels are fixed weights, their scale is always their exact
amax. The scales are written with :func:`~tfm_jax.quant.fp8.write_calibration` (the file
``quant.recipe=fp8_static`` loads; default ``<run dir>/calibration-<method>.json``).

**FP8 inference of a run trained with another recipe** (:func:`restore_with_recipe`; ``tfm-jax
eval --run-dir DIR quant.recipe=fp8_static quant.calibration=FILE``, or ``fp8_dynamic`` /
``fp8_delayed``): the run's checkpoint is restored with its own config, its trained parameters
are copied into the params tree of the requested recipe, whose FP8 state comes from that
recipe: the calibration file (``fp8_static``), nothing (``fp8_dynamic``), or, for
``fp8_delayed``, the amax histories the state would hold after ``calib_batches`` steps: each
batch's amax recorded by :func:`~tfm_jax.quant.scaling.update_amax_history` (so the scale used
is ``fmt_max / max(history)``, exactly the ``max`` calibration of the same batches). A run
trained with an FP8 recipe can be calibrated and evaluated the same way: its own FP8 state is
dropped (the calibration forward runs in high precision) and replaced by the requested one.

Run-level code (it restores checkpoints and builds the model), so it imports the training
modules inside its functions: importing this module stays light.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Iterable, Optional

import numpy as np

from tfm_jax.config import Config, ConfigError

METHODS = ("max", "percentile", "ema")
STAT_NAMES = ("calib_input_amax", "calib_input_percentile", "calib_kernel_amax")


# --------------------------------------------------------------------------------------------
# statistics: one calibration forward per batch


@dataclasses.dataclass
class CalibrationStats:
    """Per-batch statistics of every FP8 dot's operands, keyed by projection path (the params
    path before ``/fp8``, e.g. ``layers_0/attn/q_proj``). Arrays are float64 with a leading
    batch axis (N, *layer) -- ``*layer`` is (L,) for a ``scan_layers`` model, () otherwise --
    and, for kernels, the amax shape of the kernel scale ((1, out) per channel)."""

    input_amax: dict[str, np.ndarray]
    input_percentile: dict[str, np.ndarray]
    kernel_amax: dict[str, np.ndarray]
    percentile: float
    losses: list[float]          # mean loss per batch (the high-precision forward's)

    @property
    def batches(self) -> int:
        return len(self.losses)


def calibration_config(cfg: Config) -> Config:
    """``cfg`` with the projections on the FP8 dot in ``fp8_dynamic`` mode (no state: the
    params tree is the fp32 one), telemetry off (only the calibration statistics are sown)."""
    return cfg.replace(**{"quant.recipe": "fp8_dynamic", "quant.calibration": None,
                          "quant.telemetry": False})


def strip_quant_state(params: Any) -> Any:
    """``params`` without the FP8 state sub-trees (every ``fp8`` entry of a nested dict)."""
    from tfm_jax.core.roles import QUANT_MODULES

    if isinstance(params, dict) or hasattr(params, "items"):
        return {k: strip_quant_state(v) for k, v in params.items() if k not in QUANT_MODULES}
    return params


def _interceptor(percentile: float):
    """Replaces the FP8 dot's forward by the run's GEMM on the unquantized operands and sows
    the operands' statistics at the dot's path (``<proj>/fp8/calib_*``)."""
    import jax
    import jax.numpy as jnp

    from tfm_jax.core import telemetry
    from tfm_jax.quant.fp8 import Fp8DotGeneral, _plain_dot
    from tfm_jax.quant.scaling import compute_amax

    def intercept(next_fun, args, kwargs, context):
        m = context.module
        if not (isinstance(m, Fp8DotGeneral) and context.method_name == "__call__"):
            return next_fun(*args, **kwargs)
        x, kernel, dimension_numbers = args[:3]
        xa = jnp.abs(jax.lax.stop_gradient(x).astype(jnp.float32))
        k_axis = (1,) if m.kernel_granularity == "per_channel" else None
        telemetry.sow(m, "calib_input_amax", jnp.max(xa), "max")
        telemetry.sow(m, "calib_input_percentile", jnp.percentile(xa, percentile), "max")
        telemetry.sow(m, "calib_kernel_amax", compute_amax(kernel, axis=k_axis), "max")
        mm = m.matmul or _plain_dot
        return mm(x, kernel, dimension_numbers, precision=kwargs.get("precision"))

    return intercept


def collect_stats(setup: Any, params: Any, model_state: Any, batches: Iterable[dict], *,
                  percentile: float = 99.99) -> CalibrationStats:
    """Run the calibration forward (module doc) of ``setup`` (built from
    :func:`calibration_config`) on each host batch; return the per-batch statistics."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from tfm_jax.core import telemetry
    from tfm_jax.train import input_mask, masked_ce_sum

    if not 0.0 < percentile <= 100.0:
        raise ConfigError(f"calibrate: --percentile {percentile}; give a percentile in (0, 100]"
                          " (e.g. 99.99)")
    model = setup.model

    def fwd(params, model_state, batch):
        with nn.intercept_methods(_interceptor(percentile)):
            logits, state = model.apply(
                {"params": params, **model_state}, batch["inputs"],
                token_mask=input_mask(batch["mask"]), train=False,
                mutable=list(telemetry.COLLECTIONS))
        loss = masked_ce_sum(logits, batch["targets"], batch["mask"]) / jnp.maximum(
            batch["mask"].sum(), 1.0)
        return loss, telemetry.split(state)[1]

    fwd = jax.jit(fwd)
    rows: dict[str, dict[str, list]] = {n: {} for n in STAT_NAMES}
    losses = []
    with setup.context():
        for batch in batches:
            loss, sown = fwd(params, model_state, setup.shard_batch(batch))
            losses.append(float(loss))
            for col in sown.values():
                for path, x in jax.tree_util.tree_flatten_with_path(jax.device_get(col))[0]:
                    names = [str(getattr(k, "key", k)) for k in path]
                    if names[-1] in rows and names[-2] == "fp8":
                        proj = "/".join(names[:-2])
                        rows[names[-1]].setdefault(proj, []).append(np.asarray(x, np.float64))
    if not losses:
        raise ConfigError("calibrate: no batches were given")
    if not rows["calib_input_amax"]:
        raise ConfigError("calibrate: the model has no FP8-quantizable projection (nothing was "
                          "intercepted)")
    stack = {n: {p: np.stack(v) for p, v in d.items()} for n, d in rows.items()}
    return CalibrationStats(stack["calib_input_amax"], stack["calib_input_percentile"],
                            {p: v[0] for p, v in stack["calib_kernel_amax"].items()},
                            float(percentile), losses)


# --------------------------------------------------------------------------------------------
# statistics -> scales


def reduce_amax(per_batch: np.ndarray, method: str) -> np.ndarray:
    """Per-batch input statistics (N, ...) -> the amax a static scale assumes: ``max`` over
    the batches (of the amaxes), or the ``mean`` (of the percentiles); see the module doc."""
    per_batch = np.asarray(per_batch, np.float64)
    return per_batch.max(axis=0) if method == "max" else per_batch.mean(axis=0)


def reduce_scales(stats: CalibrationStats, method: str, *, fmt: str = "float8_e4m3fn",
                  margin: int = 0, ema_beta: float = 0.999,
                  scale_set: str = "any") -> dict[str, dict[str, np.ndarray]]:
    """``{projection: {"input_scale", "kernel_scale"}}`` (float32 arrays, multiplicative)
    from the statistics by ``method`` (module doc), rounded down to ``scale_set``
    (``quant.scale_set``: the hardware's scales, e.g. Gaudi2's powers of 16)."""
    import jax.numpy as jnp

    from tfm_jax.quant.scaling import compute_scale, ema_scale, round_scale_for

    if method not in METHODS:
        raise ConfigError(f"calibrate: --method {method!r}; valid: {', '.join(METHODS)}")
    if not 0.0 <= ema_beta <= 1.0:
        raise ConfigError(f"calibrate: --ema-beta {ema_beta}; give a value in [0, 1] (the seed "
                          "uses 0.999)")
    out = {}
    for proj, amaxes in stats.input_amax.items():
        if method == "max":
            s = compute_scale(reduce_amax(amaxes, "max"), fmt, margin=margin)
        elif method == "percentile":
            s = compute_scale(reduce_amax(stats.input_percentile[proj], "mean"), fmt,
                              margin=margin)
        else:
            s = compute_scale(amaxes[0], fmt, margin=margin)
            for a in amaxes[1:]:
                s = ema_scale(s, jnp.asarray(a, jnp.float32), fmt, ema_beta, margin=margin)
        k = compute_scale(stats.kernel_amax[proj], fmt, margin=margin)
        out[proj] = {"input_scale": np.asarray(round_scale_for(s, scale_set), np.float32),
                     "kernel_scale": np.asarray(round_scale_for(k, scale_set), np.float32)}
    return out


def history_from_amaxes(amaxes: np.ndarray, length: int) -> np.ndarray:
    """The delayed-scaling amax history (length, ...) after recording each of ``amaxes``
    (N, ...) in order with :func:`~tfm_jax.quant.scaling.update_amax_history`, from zeros."""
    import jax.numpy as jnp

    from tfm_jax.quant.scaling import init_amax_history, update_amax_history

    amaxes = np.asarray(amaxes, np.float32)
    h = init_amax_history(length, amaxes.shape[1:])
    for a in amaxes:
        h = update_amax_history(h, jnp.asarray(a))
    return np.asarray(h)


def fill_delayed_state(params: Any, stats: CalibrationStats, quant_cfg: Any) -> Any:
    """``params`` (of an ``fp8_delayed`` model) with every ``input``/``kernel`` amax history
    holding the calibration batches' amaxes and the scale that history gives (module doc)."""
    import jax
    import jax.numpy as jnp

    from tfm_jax.quant.scaling import amax_from_history, compute_scale

    n = stats.batches
    seen = set()

    def fill(path, leaf):
        names = [str(getattr(k, "key", k)) for k in path]
        if len(names) < 3 or names[-2] != "fp8":
            return leaf
        role, _, what = names[-1].partition("_")
        if role == "output":             # output_grad state: unused at inference
            return leaf
        proj = "/".join(names[:-2])
        src = stats.input_amax if role == "input" else {
            p: np.broadcast_to(k, (n,) + k.shape) for p, k in stats.kernel_amax.items()}
        if proj not in src:
            raise ValueError(f"fp8_delayed state {proj}/fp8/{names[-1]} has no calibration "
                             "statistics (the calibration model and the evaluated one differ)")
        seen.add(proj)
        hist = history_from_amaxes(src[proj], quant_cfg.amax_history)     # (H, *layer, ...)
        if what == "amax_history":
            value = hist
        else:
            value = np.asarray(compute_scale(amax_from_history(jnp.asarray(hist),
                                                               quant_cfg.amax_compute),
                                             quant_cfg.fwd_format, margin=quant_cfg.margin))
        if value.shape != leaf.shape and what == "amax_history" and value.ndim >= 2:
            value = np.moveaxis(value, 0, 1)                  # scan_layers: (L, H, ...)
        if value.size != leaf.size:
            raise ValueError(f"calibration statistics for {proj}/fp8/{names[-1]} have shape "
                             f"{value.shape}; the model's is {tuple(leaf.shape)}")
        return jnp.asarray(value.reshape(leaf.shape), leaf.dtype)

    out = jax.tree_util.tree_map_with_path(fill, params)
    if not seen:
        raise ValueError("fill_delayed_state: the params hold no fp8_delayed state")
    return out


# --------------------------------------------------------------------------------------------
# run level


def _load_run(run_dir: pathlib.Path, overrides: Optional[list[str]] = None) -> Config:
    from tfm_jax.tools.convert import load_run_config

    if not run_dir.is_dir():
        raise FileNotFoundError(f"calibrate: --run-dir {run_dir} does not exist; give the "
                                "directory of a run trained with 'tfm-jax train'")
    return load_run_config(run_dir, overrides)


def restore_checkpoint(cfg: Config, devices: Optional[list] = None):
    """(setup, state) of ``cfg``'s run directory, restored with its own recipe."""
    from tfm_jax.platform import backends
    from tfm_jax.train.checkpoint import restore_latest
    from tfm_jax.train import build

    backends.configure(cfg.backend)
    setup = build(cfg, devices)
    state = restore_latest(cfg.run_dir / "checkpoints", setup.abstract_state(),
                           what="calibrate", fix="train the run first ('tfm-jax train')")
    return setup, state


def calibration_batches(cfg: Config, corpus: Any, n: int) -> Iterable[dict]:
    """Training batches 0..n-1 of the run's data stream (its seed, batch size, packing)."""
    from tfm_jax import data as data_lib

    rows = data_lib.process_rows(cfg.train.batch_size)
    for step in range(n):
        yield data_lib.train_batch(corpus.train, corpus.train_doc_starts, step=step,
                                   seed=cfg.train.seed, batch_size=cfg.train.batch_size,
                                   seq_len=cfg.data.seq_len,    # (segments: stream windows)
                                   packing=cfg.data.packing in (True, "concat", "segments"),
                                   rows=rows)


def run_stats(cfg: Config, src_state: Any, n_batches: int, *, percentile: float = 99.99,
              corpus: Any = None, devices: Optional[list] = None) -> CalibrationStats:
    """The calibration statistics of a restored run (``src_state``) over its first
    ``n_batches`` batches; ``cfg``: the run's config (its ``quant.kernel_granularity`` decides
    the kernel statistics' shape)."""
    from tfm_jax import data as data_lib
    from tfm_jax.train import build

    if n_batches < 1:
        raise ConfigError(f"calibrate: --batches {n_batches}; calibrate over at least 1 batch")
    cal_setup = build(calibration_config(cfg), devices)
    corpus = corpus or data_lib.load_corpus(cfg.data.path, cfg.data.val_fraction,
                                            cfg.data.cache_dir, include=cfg.data.include)
    return collect_stats(cal_setup, strip_quant_state(src_state.params), src_state.model_state,
                         calibration_batches(cfg, corpus, n_batches), percentile=percentile)


def _check_source(cfg: Config, what: str) -> None:
    from tfm_jax.tools.quantize import is_quantized_run

    if is_quantized_run(cfg):
        raise ConfigError(f"{what}: {cfg.run_dir} is a weight-only quantized run (quant.recipe="
                          f"{cfg.quant.recipe}); use the full-precision run it came from")


@dataclasses.dataclass
class CalibrationResult:
    path: pathlib.Path
    method: str
    stats: CalibrationStats
    scales: dict[str, dict[str, np.ndarray]]
    trained_recipe: str
    fwd_format: str


def default_out(run_dir: pathlib.Path, method: str) -> pathlib.Path:
    return run_dir / f"calibration-{method}.json"


def calibrate_run(run_dir: pathlib.Path | str, batches: int, method: str = "max", *,
                  percentile: float = 99.99, ema_beta: float = 0.999,
                  out: Optional[pathlib.Path | str] = None,
                  overrides: Optional[list[str]] = None, corpus: Any = None,
                  devices: Optional[list] = None) -> CalibrationResult:
    """Calibrate the latest checkpoint of ``run_dir`` over its first ``batches`` training
    batches and write the ``fp8_static`` scales (module doc). ``overrides``: ``quant.*`` keys
    only (``fwd_format``, ``margin``, ``kernel_granularity``, ``scale_set``): they shape the
    scales (a run trained under ``backend.emulate=gaudi2`` has Gaudi2's already)."""
    from tfm_jax.quant.fp8 import write_calibration

    run_dir = pathlib.Path(run_dir)
    if method not in METHODS:
        raise ConfigError(f"calibrate: --method {method!r}; valid: {', '.join(METHODS)}")
    if batches < 1:
        raise ConfigError(f"calibrate: --batches {batches}; calibrate over at least 1 batch")
    if not 0.0 < percentile <= 100.0:
        raise ConfigError(f"calibrate: --percentile {percentile}; give a percentile in (0, 100]"
                          " (e.g. 99.99)")
    if not 0.0 <= ema_beta <= 1.0:
        raise ConfigError(f"calibrate: --ema-beta {ema_beta}; give a value in [0, 1] (the seed "
                          "uses 0.999)")
    bad = [o for o in overrides or [] if not o.startswith("quant.")
           or o.split("=")[0] in ("quant.recipe", "quant.calibration")]
    if bad:
        raise ConfigError(f"calibrate: overrides {bad}: only quant.* keys (fwd_format, margin, "
                          "kernel_granularity, scale_set) shape a calibration; the model is the "
                          "run's")
    trained = _load_run(run_dir)
    _check_source(trained, "calibrate")
    wanted = _load_run(run_dir, overrides) if overrides else trained
    q = wanted.quant
    _, src_state = restore_checkpoint(trained, devices)
    stats = run_stats(wanted, src_state, batches, percentile=percentile, corpus=corpus,
                      devices=devices)
    scales = reduce_scales(stats, method, fmt=q.fwd_format, margin=q.margin, ema_beta=ema_beta,
                           scale_set=q.scale_set)
    path = pathlib.Path(out) if out is not None else default_out(run_dir, method)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_calibration(path, scales, fwd_format=q.fwd_format, scale_set=q.scale_set)
    return CalibrationResult(path, method, stats, scales, trained.quant.recipe, q.fwd_format)


def summary(res: CalibrationResult, run_dir: pathlib.Path | str, cfg_note: str = "") -> str:
    """The lines ``tfm-jax calibrate`` prints."""
    ins = np.concatenate([np.ravel(v["input_scale"]) for v in res.scales.values()])
    ks = np.concatenate([np.ravel(v["kernel_scale"]) for v in res.scales.values()])
    lines = [f"calibrated {len(res.scales)} projections over {res.stats.batches} training "
             f"batches, method {res.method} ({res.fwd_format}; high-precision forward, mean "
             f"loss {np.mean(res.stats.losses):.4f})",
             f"  input scales  {ins.min():.4g} .. {ins.max():.4g}   kernel scales "
             f"{ks.min():.4g} .. {ks.max():.4g}   (multiplicative: fmt_max / amax)",
             f"calibration file: {res.path}"]
    if res.trained_recipe != "none":
        lines.append(f"note: {run_dir} was trained with quant.recipe={res.trained_recipe}; the "
                     "calibration used its weights in high precision (its own FP8 state is "
                     "ignored here and replaced by these scales in the eval below)")
    lines.append(f"evaluate FP8 inference: tfm-jax eval --run-dir {run_dir} "
                 f"quant.recipe=fp8_static quant.calibration={res.path}{cfg_note}")
    return "\n".join(lines)


def needs_recipe_change(cfg: Config) -> bool:
    """Whether evaluating ``cfg`` (a run's config with overrides) means running its checkpoint
    under another FP8 recipe (or another calibration file) than it was trained with."""
    saved = pathlib.Path(cfg.run_dir) / "config.yaml"
    if not cfg.quant.fp8 or not saved.is_file():
        return False
    from tfm_jax.tools.convert import load_run_config

    trained = load_run_config(cfg.run_dir).quant
    return (trained.recipe != cfg.quant.recipe
            or (cfg.quant.recipe == "fp8_static" and trained.calibration != cfg.quant.calibration)
            or trained.kernel_granularity != cfg.quant.kernel_granularity)


def restore_with_recipe(cfg: Config, *, calib_batches: int = 16, corpus: Any = None,
                        devices: Optional[list] = None):
    """(setup, state) for evaluating ``cfg``'s run under ``cfg.quant`` (an FP8 recipe) though
    its checkpoint was trained with another (module doc). ``calib_batches``: the training
    batches whose amaxes fill the ``fp8_delayed`` histories."""
    import jax

    from tfm_jax.core import roles as param_roles
    from tfm_jax.train import TrainState, build

    trained = _load_run(pathlib.Path(cfg.run_dir))
    _check_source(trained, "eval")
    if not cfg.quant.fp8:
        raise ConfigError(f"quant.recipe={cfg.quant.recipe} is not an FP8 recipe")
    _, src_state = restore_checkpoint(trained, devices)
    setup = build(cfg, devices)
    fresh = setup.init_state()                # FP8 state: init or the calibration file
    src = {jax.tree_util.keystr(p, simple=True, separator="/"): x
           for p, x in jax.tree_util.tree_flatten_with_path(src_state.params)[0]
           if not param_roles.overwritten(p)}
    used = set()

    def take(path, leaf):
        if param_roles.overwritten(path):
            return leaf
        key = jax.tree_util.keystr(path, simple=True, separator="/")
        if key not in src or src[key].shape != leaf.shape:
            raise ValueError(f"parameter {key} of quant.recipe={cfg.quant.recipe} is not in the "
                             f"run's checkpoint (trained with {trained.quant.recipe}) with shape "
                             f"{tuple(leaf.shape)}: only quant.* may differ from the run")
        used.add(key)
        return src[key]

    params = jax.tree_util.tree_map_with_path(take, fresh.params)
    if set(src) - used:
        raise ValueError(f"the run's parameters {sorted(set(src) - used)[:4]} have no place "
                         f"under quant.recipe={cfg.quant.recipe}")
    if cfg.quant.recipe == "fp8_delayed":
        stats = run_stats(cfg, src_state, calib_batches, corpus=corpus, devices=devices)
        params = fill_delayed_state(params, stats, cfg.quant)
    params = jax.device_put(params, setup.state_shardings.params)
    state = TrainState(src_state.step, params, src_state.model_state, fresh.opt_state)
    return setup, state


__all__ = ["METHODS", "CalibrationResult", "CalibrationStats", "calibrate_run",
           "calibration_batches", "calibration_config", "collect_stats", "default_out",
           "fill_delayed_state", "history_from_amaxes", "needs_recipe_change", "reduce_amax",
           "reduce_scales", "restore_checkpoint", "restore_with_recipe", "run_stats",
           "strip_quant_state", "summary"]
