"""Per-run measurements of the ablation runner: a registry of plain functions.

``MEASUREMENTS[name](ctx) -> dict``. ``ctx`` (:class:`RunContext`) gives the run's config,
directory, variant, seed, the measurement's options from the experiment file (``ctx.options``)
and helpers: :meth:`RunContext.metrics` (the rows of ``metrics.jsonl``),
:meth:`RunContext.final_eval`, :meth:`RunContext.restore` (the trained model: setup + state).
The returned dict maps names to

* numbers -- scalar metrics, averaged over seeds per variant (``perplexity``, ``params``), or
* :class:`Series` -- rows keyed by some fields (``by``: e.g. context and batch) holding values
  (e.g. ``decode_tokens_per_s``), averaged over seeds per variant and key; plotted as lines.

Adding one is one function plus one line::

    def measure_decode(ctx: RunContext) -> dict:
        contexts = ctx.option("contexts", [256, 1024, 4096])
        setup, state = ctx.restore()
        ...
        return {"decode": Series(by=("context", "batch"), rows=[{"context": c, "batch": b,
                                 "decode_tokens_per_s": tps}, ...])}

    MEASUREMENTS["decode"] = measure_decode

and in the experiment file ``measurements: [{name: decode, contexts: [256, 4096], batches: [1,
16]}]``. Measurements run after each run's training (also for runs finished earlier, whose
results are read back from their directory); their results are cached per run in
``measurements.json`` by name and options, so a rerun measures only what is new. A failing
measurement is recorded (``measurement_errors`` in ``results.json``) and the rest go on.

This module imports no jax; the measurements that need it import it when called.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import statistics
from typing import Any, Callable, Optional

from tfm_jax.config import Config, param_counts


@dataclasses.dataclass
class Series:
    """Rows of one measurement keyed by the fields in ``by`` (e.g. ``context``, ``batch``);
    every other numeric field of a row is a value, e.g. ``{"context": 256, "batch": 1,
    "decode_tokens_per_s": 812.0}``."""

    by: tuple[str, ...]
    rows: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {"by": list(self.by), "rows": [dict(r) for r in self.rows]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Series":
        return cls(tuple(d["by"]), [dict(r) for r in d["rows"]])


@dataclasses.dataclass
class RunContext:
    """What a measurement sees of one run. ``train_result`` is the
    :class:`tfm_jax.train.TrainResult` when the run was trained in this invocation (else None:
    read what you need from ``run_dir``)."""

    cfg: Config
    run_dir: pathlib.Path
    variant: str
    seed: int
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    train_result: Any = None
    devices: Optional[list] = None
    cache: dict[str, Any] = dataclasses.field(default_factory=dict)   # shared by a run's measurements

    def option(self, key: str, default: Any = None) -> Any:
        return self.options.get(key, default)

    def check_options(self, allowed: set[str]) -> None:
        """Raise ValueError for an option the measurement does not know."""
        bad = sorted(set(self.options) - set(allowed))
        if bad:
            raise ValueError(f"unknown option(s) {', '.join(bad)}; this measurement takes "
                             f"{', '.join(sorted(allowed)) or 'no options'}")

    def metrics(self) -> list[dict[str, Any]]:
        """Rows of the run's ``metrics.jsonl`` (train rows have ``loss``, eval rows
        ``val_loss``)."""
        if "metrics" not in self.cache:
            from tfm_jax.train.metrics import read_metrics
            self.cache["metrics"] = read_metrics(self.run_dir)
        return self.cache["metrics"]

    def final_eval(self) -> dict[str, Any]:
        """The evaluation at the run's last step (``val_loss``, ``val_ppl``, ``val_tokens``)."""
        if self.train_result is not None and self.train_result.eval:
            return dict(self.train_result.eval)
        steps = self.cfg.train.steps
        rows = [r for r in self.metrics() if "val_loss" in r and r.get("step") == steps]
        if not rows:
            raise ValueError(f"no evaluation at step {steps} in {self.run_dir / 'metrics.jsonl'}")
        return rows[-1]

    def restore(self) -> tuple[Any, Any]:
        """(setup, state) of the run's final checkpoint (built once per run)."""
        if "restored" not in self.cache:
            tr = self.train_result
            if tr is not None:
                self.cache["restored"] = (tr.setup, tr.state)
            else:
                from tfm_jax.platform import backends
                from tfm_jax.train.checkpoint import Checkpointer
                from tfm_jax.train import build

                backends.configure(self.cfg.backend)
                setup = build(self.cfg, self.devices)
                ckpt = Checkpointer(self.run_dir / "checkpoints", read_only=True)
                try:
                    state = setup.restore(ckpt)
                finally:
                    ckpt.close()
                self.cache["restored"] = (setup, state)
        return self.cache["restored"]


Measurement = Callable[[RunContext], dict[str, Any]]
MEASUREMENTS: dict[str, Measurement] = {}


def register(name: str, fn: Optional[Measurement] = None):
    """``register("x", fn)`` or ``@register("x")``; same as ``MEASUREMENTS["x"] = fn``."""
    if fn is None:
        return lambda f: register(name, f)
    MEASUREMENTS[name] = fn
    return fn


# --------------------------------------------------------------------------------------------
# Built-in measurements.


@register("val_loss")
def measure_val_loss(ctx: RunContext) -> dict[str, Any]:
    """``val_loss`` (nats/token), ``perplexity`` and ``val_bpb`` (bits per byte, the quality
    metric across tokenizers) of the final evaluation, and
    ``final_train_loss`` (the last logged train loss). For runs started from another run
    (``init_from``): also ``init_val_loss`` / ``init_perplexity``, the evaluation right after
    conversion, before the first step (``convert.json``). Always measured."""
    ctx.check_options(set())
    ev = ctx.final_eval()
    out: dict[str, Any] = {"val_loss": float(ev["val_loss"]), "perplexity": float(ev["val_ppl"])}
    if "val_bpb" in ev:     # bits per UTF-8 byte: comparable across tokenizers
        out["val_bpb"] = float(ev["val_bpb"])
    train = [r for r in ctx.metrics() if r.get("loss") is not None]
    if train:
        out["final_train_loss"] = float(train[-1]["loss"])
    conv = ctx.run_dir / "convert.json"
    if conv.is_file():
        init = json.loads(conv.read_text()).get("eval") or {}
        if "val_loss" in init:
            out["init_val_loss"] = float(init["val_loss"])
            out["init_perplexity"] = float(init["val_ppl"])
    return out


MEASUREMENTS["perplexity"] = measure_val_loss
MEASUREMENTS["val_bpb"] = measure_val_loss


@register("params")
def measure_params(ctx: RunContext) -> dict[str, Any]:
    """Parameter counts from the config (:func:`tfm_jax.config.param_counts`): ``params``
    (total), ``params_embedding``, ``params_non_embedding``, ``params_matmul``; with MoE
    layers also ``params_active`` (what one token uses: top_k experts, router, shared)."""
    ctx.check_options(set())
    c = param_counts(ctx.cfg.model, ctx.cfg.moe)
    out = {"params": c["total"], "params_embedding": c["embedding"],
           "params_non_embedding": c["total"] - c["embedding"], "params_matmul": c["matmul"]}
    if "active" in c:
        out["params_active"] = c["active"]
    return out


@register("kv_bytes")
def measure_kv_bytes(ctx: RunContext) -> dict[str, Any]:
    """KV-cache bytes at the model's shape (:func:`tfm_jax.config.sizing.kv_cache_bytes`).

    Options: ``contexts`` (default ``[data.seq_len]``), ``batch`` (1), ``dtype`` (the model's).
    Gives ``kv_bytes_per_token`` (all layers), ``kv_bytes`` (at the first context and the
    batch), and the series ``kv_bytes_by_context`` (by context, batch: ``kv_bytes``)."""
    from tfm_jax.config.sizing import kv_cache_bytes

    ctx.check_options({"contexts", "batch", "dtype"})
    contexts = list(ctx.option("contexts", [ctx.cfg.data.seq_len]))
    batch = int(ctx.option("batch", 1))
    dtype = ctx.option("dtype", ctx.cfg.model.dtype)
    rows = []
    for c in contexts:
        r = kv_cache_bytes(ctx.cfg, int(c), batch, dtype)
        rows.append({"context": int(c), "batch": batch, "kv_bytes": r["total_with_scales"]})
    first = kv_cache_bytes(ctx.cfg, int(contexts[0]), batch, dtype)
    return {"kv_bytes_per_token": first["bytes_per_token"],
            "kv_bytes": first["total_with_scales"],
            "kv_bytes_by_context": Series(("context", "batch"), rows)}


@register("train_tokens_per_s")
def measure_train_speed(ctx: RunContext) -> dict[str, Any]:
    """Training throughput from the run's ``metrics.jsonl``: the median over its log windows of
    ``tokens_per_s`` (the first step, which compiles, is never in a window; the median keeps
    one slow window -- a checkpoint, a busy machine -- from moving it) and of ``mfu``.
    Option ``stat``: ``median`` (default) or ``mean``."""
    ctx.check_options({"stat"})
    stat = ctx.option("stat", "median")
    if stat not in ("median", "mean"):
        raise ValueError(f"stat={stat!r}: use median or mean")
    f = statistics.median if stat == "median" else statistics.fmean
    rows = [r for r in ctx.metrics() if r.get("tokens_per_s")]
    if not rows:
        raise ValueError(f"no tokens_per_s rows in {ctx.run_dir / 'metrics.jsonl'}")
    out = {"train_tokens_per_s": f([float(r["tokens_per_s"]) for r in rows])}
    mfu = [float(r["mfu"]) for r in rows if r.get("mfu") is not None]
    if mfu:
        out["train_mfu"] = f(mfu)
    return out


@register("flops")
def measure_flops(ctx: RunContext) -> dict[str, Any]:
    """``train_flops_per_token`` at the run's sequence length
    (:func:`tfm_jax.model.train_flops_per_token`: PaLM convention, 6 x matmul parameters + the
    attention score/value products over the full T x T square; MoE: the active experts)."""
    from tfm_jax.model import train_flops_per_token

    ctx.check_options(set())
    return {"train_flops_per_token": train_flops_per_token(ctx.cfg.model, ctx.cfg.data.seq_len,
                                                           ctx.cfg.moe)}


@register("loss_curve")
def measure_loss_curve(ctx: RunContext) -> dict[str, Any]:
    """Shape of the train loss curve from ``metrics.jsonl`` (each logged loss is the mean over
    its ``train.log_every`` steps).

    Options: ``at`` (steps, default a quarter and half of ``train.steps``): ``train_loss_step<N>``
    = the first logged loss at a step >= N (how far training got by then: "converges faster");
    steps beyond the run's ``train.steps`` are left out (a shorter variant has none).
    Always: ``train_loss_roughness`` = mean |difference| of consecutive logged losses over the
    second half of training (step-to-step noise once the trend is slow: "smoother curve")."""
    ctx.check_options({"at"})
    steps = ctx.cfg.train.steps
    at = [int(s) for s in ctx.option("at", [steps // 4, steps // 2])]
    rows = [(r["step"], float(r["loss"])) for r in ctx.metrics() if r.get("loss") is not None]
    if not rows:
        raise ValueError(f"no train losses in {ctx.run_dir / 'metrics.jsonl'}")
    out: dict[str, Any] = {}
    for s in at:
        if s > steps:
            continue
        hit = [loss for step, loss in rows if step >= s]
        if not hit:
            raise ValueError(f"at={s}: no train loss logged at or after step {s}")
        out[f"train_loss_step{s}"] = hit[0]
    late = [loss for step, loss in rows if step > steps // 2]
    if len(late) >= 2:
        out["train_loss_roughness"] = statistics.fmean(
            abs(b - a) for a, b in zip(late, late[1:]))
    return out


@register("decode")
def measure_decode(ctx: RunContext) -> dict[str, Any]:
    """Greedy decode speed of the trained model through the KV cache
    (:func:`tfm_jax.generate.decode_speed`: the compiled decode loop of ``tfm-jax generate``,
    prefill and compilation excluded), on random prompts.

    Options: ``contexts`` (prompt lengths, default ``[data.seq_len]``), ``batches`` (default
    ``[1]``), ``new_tokens`` (default 32), ``kv_cache`` (default the run's ``quant.kv_cache``),
    ``repeats`` (default 3: every point is measured ``repeats`` times, the points interleaved
    round-robin so a load change hits them alike). Gives the series ``decode`` (by context,
    batch): ``decode_tokens_per_s`` and ``decode_step_ms`` = the median of the repeats, with
    their spread ``decode_tokens_per_s_min`` / ``_max``. Decoding is timing: use ``once:
    true`` and a quiet machine."""
    import statistics

    from tfm_jax.generate import decode_speed

    ctx.check_options({"contexts", "batches", "new_tokens", "kv_cache", "repeats"})
    contexts = [int(c) for c in ctx.option("contexts", [ctx.cfg.data.seq_len])]
    batches = [int(b) for b in ctx.option("batches", [1])]
    new_tokens = int(ctx.option("new_tokens", 32))
    repeats = int(ctx.option("repeats", 3))
    if repeats < 1:
        raise ValueError(f"repeats={repeats}: at least 1")
    kv_cache = ctx.option("kv_cache", ctx.cfg.quant.kv_cache)
    setup, state = ctx.restore()
    variables = {"params": state.params, **state.model_state}
    points = [(c, b) for c in contexts for b in batches]
    timed: dict[tuple[int, int], list[dict[str, float]]] = {p: [] for p in points}
    with setup.context():
        for _ in range(repeats):
            for c, b in points:
                timed[(c, b)].append(decode_speed(
                    setup.model, variables, batch=b, context=c, new_tokens=new_tokens,
                    kv_cache=kv_cache, kv_scale=ctx.cfg.quant.kv_scale))
    rows = []
    for (c, b), rs in timed.items():
        tps = [r["tokens_per_s"] for r in rs]
        rows.append({"context": c, "batch": b, "decode_tokens_per_s": statistics.median(tps),
                     "decode_tokens_per_s_min": min(tps), "decode_tokens_per_s_max": max(tps),
                     "decode_step_ms": statistics.median(r["step_ms"] for r in rs),
                     "decode_repeats": len(rs)})
    return {"decode": Series(("context", "batch"), rows)}


@register("memory")
def measure_memory(ctx: RunContext) -> dict[str, Any]:
    """Persistent train-state bytes from the (abstract) state pytree and the compiled train
    step's peak per device (:mod:`tfm_jax.train.memory`): ``state_bytes`` (total), ``param_bytes``,
    ``weight_bytes_fp8`` / ``weight_bytes_float`` (params by storage), ``fp8_state_bytes``,
    ``opt_moment_bytes`` (moments + their block scales), ``peak_bytes`` (the step's
    ``arguments + outputs - aliased + temporaries``; skipped with option ``peak: false``)."""
    from tfm_jax.train import memory

    ctx.check_options({"peak"})
    setup = ctx.restore()[0] if ctx.train_result is not None else None
    if setup is None:
        from tfm_jax.platform import backends
        from tfm_jax.train import build

        backends.configure(ctx.cfg.backend)
        setup = build(ctx.cfg, ctx.devices)
    abstract = setup.abstract_state()
    b = memory.state_bytes(abstract)
    by = b["params_by_dtype"]
    out: dict[str, Any] = {
        "state_bytes": b["total"], "param_bytes": b["params"],
        "weight_bytes_fp8": sum(v for k, v in by.items() if k.startswith("float8")),
        "weight_bytes_float": sum(v for k, v in by.items() if not k.startswith("float8")),
        "fp8_state_bytes": b["fp8_state"],
        "opt_moment_bytes": b["opt_moments"] + b["opt_moment_scales"]}
    if ctx.option("peak", True):
        out["peak_bytes"] = memory.peak_memory(setup, abstract)["peak_estimate"]
    return {k: v for k, v in out.items() if v is not None}


@register("divergence")
def measure_divergence(ctx: RunContext) -> dict[str, Any]:
    """Whether the run diverged: ``nonfinite_steps`` (steps whose loss or gradients were
    NaN/inf -- skipped, ``train.on_nonfinite=skip``), ``reloads`` (``on_nonfinite=reload``),
    ``diverged`` = 1 if any of those or a non-finite final validation loss, else 0 (summed over
    seeds this is the divergence count: the mean times the number of seeds).

    Option ``max_val_loss``: also count a run as diverged when its final validation loss is
    above this number, or above the data's unigram cross-entropy with ``unigram`` (a model
    worse than byte counts has failed to train; the threshold is reported as
    ``divergence_threshold``)."""
    import math

    ctx.check_options({"max_val_loss"})
    rows = ctx.metrics()
    skipped = max([int(r.get("skipped") or 0) for r in rows if "loss" in r] or [0])
    reloads = sum(1 for r in rows if "reload" in r)
    try:
        val = float(ctx.final_eval()["val_loss"])
    except ValueError:
        val = float("nan")
    limit = ctx.option("max_val_loss")
    out: dict[str, Any] = {"nonfinite_steps": skipped, "reloads": reloads}
    if limit == "unigram":
        from tfm_jax import data as data_lib
        d = ctx.cfg.data
        tok = data_lib.load_tokenizer(None if d.tokenizer == "none" else d.tokenizer)
        corpus = data_lib.corpus_for(d, tok)
        limit = data_lib.unigram_entropy(corpus.train, corpus.val, vocab_size=tok.vocab_size)
    elif limit is not None and not isinstance(limit, (int, float)):
        raise ValueError(f"max_val_loss={limit!r}: give a number (nats/token) or 'unigram'")
    too_high = limit is not None and math.isfinite(val) and val > float(limit)
    if limit is not None:
        out["divergence_threshold"] = float(limit)
    out["diverged"] = int(skipped > 0 or reloads > 0 or not math.isfinite(val) or too_high)
    return out


@register("step_time")
def measure_step_time(ctx: RunContext) -> dict[str, Any]:
    """``step_ms``: median over log windows of the optimizer-step time, tokens per step /
    ``tokens_per_s`` (compilation, evaluation and checkpoints excluded, as for
    ``train_tokens_per_s``). Timing: compare runs of one invocation on a quiet machine."""
    ctx.check_options(set())
    tokens = ctx.cfg.train.batch_size * ctx.cfg.data.seq_len
    rows = [float(r["tokens_per_s"]) for r in ctx.metrics() if r.get("tokens_per_s")]
    if not rows:
        raise ValueError(f"no tokens_per_s rows in {ctx.run_dir / 'metrics.jsonl'}")
    return {"step_ms": 1e3 * tokens / statistics.median(rows)}


@register("loss_series")
def measure_loss_series(ctx: RunContext) -> dict[str, Any]:
    """The train loss curve as a series (by ``step``: ``train_loss``, each the mean over its
    log window), and the validation evaluations (by ``step``: ``val_loss_curve``), for plots
    of loss against step per variant. Option ``every`` (default 1): keep every n-th row."""
    ctx.check_options({"every"})
    every = max(1, int(ctx.option("every", 1)))
    rows = [r for r in ctx.metrics() if r.get("loss") is not None][::every]
    evals = [r for r in ctx.metrics() if r.get("val_loss") is not None]
    return {"loss_curve": Series(("step",), [{"step": int(r["step"]),
                                              "train_loss": float(r["loss"])} for r in rows]),
            "val_curve": Series(("step",), [{"step": int(r["step"]),
                                             "val_loss_curve": float(r["val_loss"])}
                                            for r in evals])}


@register("collectives")
def measure_collectives(ctx: RunContext) -> dict[str, Any]:
    """What the compiler emits for the run's train step (:func:`tfm_jax.tools.inspect.
    inspect_train_step`, compiled again, abstract state): per collective kind ``<kind>_count``
    and ``<kind>_bytes`` per step (``all_to_all``, ``all_reduce``, ``all_gather``,
    ``reduce_scatter``, ``collective_permute``; 0 when absent) and ``collective_bytes`` (all
    kinds). Independent of the seed: use ``once: true``."""
    from tfm_jax.tools.inspect import inspect_train_step

    ctx.check_options(set())
    rep = inspect_train_step(ctx.cfg, ctx.devices)
    out: dict[str, Any] = {}
    total = 0
    for kind in ("all-to-all", "all-reduce", "all-gather", "reduce-scatter",
                 "collective-permute"):
        c = rep["collectives"].get(kind, {})
        key = kind.replace("-", "_")
        out[f"{key}_count"] = int(c.get("count", 0))
        out[f"{key}_bytes"] = int(c.get("bytes", 0))
        total += out[f"{key}_bytes"]
    out["collective_bytes"] = total
    return out


@register("moe_routing")
def measure_moe_routing(ctx: RunContext) -> dict[str, Any]:
    """MoE routing telemetry from ``metrics.jsonl`` (sown by :class:`tfm_jax.layers.moe.
    MoEFeedForward` at every log step, means over each log window): over the last ``last``
    train rows (option, default 5) and the MoE layers: ``moe_drop_fraction`` (dropped / routed
    assignments), ``moe_load_max`` (busiest expert's load / mean: 1 = balanced),
    ``moe_router_entropy`` (nats; log E = uniform), ``moe_aux_loss`` (weighted load-balancing
    loss, summed over layers); the series ``moe_layers`` (by layer: ``drop_fraction``,
    ``load_max``, ``router_entropy``) and ``moe_steps`` (by step: the layer means of
    ``drop_fraction_t``, ``load_max_t``)."""
    import re

    ctx.check_options({"last"})
    if not ctx.cfg.moe.n_experts:      # a dense variant beside MoE ones: nothing to measure
        return {}
    last = int(ctx.option("last", 5))
    rows = [r for r in ctx.metrics() if r.get("loss") is not None]
    pat = re.compile(r"^layers_(\d+)/(?:block_\d+/)?ffn/(moe/(drop_fraction|load_max|"
                     r"router_entropy)|load_balance_loss)$")

    def per_layer(row):
        out: dict[tuple[int, str], float] = {}
        for k, v in row.items():
            m = pat.match(k)
            if m and v is not None:
                out[(int(m.group(1)), m.group(3) or "aux_loss")] = float(v)
        return out

    parsed = [(int(r["step"]), per_layer(r)) for r in rows]
    parsed = [(s, p) for s, p in parsed if p]
    if not parsed:
        raise ValueError(f"no MoE telemetry in {ctx.run_dir / 'metrics.jsonl'} (moe.n_experts "
                         "= 0?)")
    tail = [p for _, p in parsed[-last:]]
    layers = sorted({layer for p in tail for layer, _ in p})
    mean = lambda xs: statistics.fmean(xs) if xs else float("nan")  # noqa: E731

    def stat(name, layer=None):
        return mean([v for p in tail for (ly, n), v in p.items()
                     if n == name and (layer is None or ly == layer)])

    out: dict[str, Any] = {
        "moe_drop_fraction": stat("drop_fraction"), "moe_load_max": stat("load_max"),
        "moe_router_entropy": stat("router_entropy"),
        "moe_aux_loss": mean([sum(v for (_, n), v in p.items() if n == "aux_loss")
                              for p in tail]),
        "moe_layers": Series(("layer",), [
            {"layer": ly, "drop_fraction": stat("drop_fraction", ly),
             "load_max": stat("load_max", ly), "router_entropy": stat("router_entropy", ly)}
            for ly in layers]),
        "moe_steps": Series(("step",), [
            {"step": s, "drop_fraction_t": mean([v for (_, n), v in p.items()
                                                  if n == "drop_fraction"]),
             "load_max_t": mean([v for (_, n), v in p.items() if n == "load_max"])}
            for s, p in parsed]),
    }
    return out

