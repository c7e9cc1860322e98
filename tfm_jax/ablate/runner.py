"""Run an experiment: every (variant, seed) as a normal training run, then measure, aggregate,
judge the claims, write ``results.json``, ``results.md`` and PNG plots.

Resumable. Each run lives in ``<out>/<variant>/seed<k>`` (a normal run directory):

* finished (a checkpoint at ``train.steps`` and the final evaluation in ``metrics.jsonl``):
  skipped, its results read back from the directory;
* interrupted (an earlier checkpoint): continued with ``train(..., resume=True)``, exactly as
  ``tfm-jax train --resume`` (bitwise the same result as an uninterrupted run);
* new: trained from step 0 -- or, for a variant with ``init_from``, first converted from the
  source variant's finished run at the same seed (:func:`tfm_jax.tools.convert.convert_run`), then
  trained from that step-0 checkpoint.

A run whose directory holds a different config (the experiment file was edited) is not reused:
it fails, naming the differences, until its directory is removed. A failing run (invalid
override, non-finite loss, any error) is recorded with its error and the others go on; the
command then exits 1. SIGINT/SIGTERM stop the experiment after the running step's checkpoint;
the same command continues it.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import platform
import sys
import time
import traceback
from typing import Any, Optional

import yaml
from tqdm.auto import tqdm

from tfm_jax.core import interrupts, rundir
from tfm_jax.ablate import plots as plots_lib
from tfm_jax.ablate.measurements import MEASUREMENTS, RunContext, Series
from tfm_jax.ablate.provenance import load_average, provenance
from tfm_jax.ablate.report import aggregate, judge_claim, markdown, scale_of, seed_plan
from tfm_jax.ablate.spec import Experiment, MeasurementSpec, load_experiment
from tfm_jax.config import Config, ConfigError, validate

IGNORED_KEYS = ("run.progress", "run.tensorboard")   # may differ between invocations
MEASUREMENT_CACHE = "measurements.json"


@dataclasses.dataclass
class ExperimentResult:
    results: dict[str, Any]
    out_dir: pathlib.Path
    failed: int
    files: dict[str, Any]


# --------------------------------------------------------------------------------------------
# Run directories.


def checkpoint_steps(run_dir: pathlib.Path) -> list[int]:
    """Steps of the complete checkpoints (orbax renames ``<step>.orbax-checkpoint-tmp-*`` to
    ``<step>`` only when a save is complete)."""
    d = run_dir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def _final_eval_logged(run_dir: pathlib.Path, steps: int) -> bool:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return False
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("step") == steps and "val_loss" in row:
            return True
    return False


def run_state(cfg: Config) -> tuple[str, Optional[int]]:
    """(``new`` | ``partial`` | ``finished``, latest checkpoint step)."""
    steps = checkpoint_steps(cfg.run_dir)
    if not steps:
        return "new", None
    last = steps[-1]
    if last >= cfg.train.steps and _final_eval_logged(cfg.run_dir, cfg.train.steps):
        return "finished", last
    return "partial", last


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(cfg: Config) -> list[str]:
    """``key: saved -> now`` for the keys where the run directory's config.yaml differs."""
    path = cfg.run_dir / "config.yaml"
    if not path.is_file():
        return []
    raw = yaml.safe_load(path.read_text()) or {}
    try:     # through the schema, so a key added since the run compares as its default
        raw = validate(raw).to_dict()
    except ConfigError:
        pass
    saved = _flat(raw)
    now = _flat(cfg.to_dict())
    keys = [k for k in {**saved, **now} if k not in IGNORED_KEYS]
    return [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in keys
            if saved.get(k) != now.get(k)]


def _curves(run_dir: pathlib.Path) -> dict[str, list[list[float]]]:
    from tfm_jax.train.metrics import read_metrics

    try:
        rows = read_metrics(run_dir)
    except (OSError, ValueError):
        return {"train": [], "val": []}
    return {"train": [[r["step"], r["loss"]] for r in rows if r.get("loss") is not None],
            "val": [[r["step"], r["val_loss"]] for r in rows if "val_loss" in r]}


def _write_json(path: pathlib.Path, obj: Any) -> None:
    rundir.atomic_write(path, json.dumps(obj, indent=2, default=str) + "\n")


# --------------------------------------------------------------------------------------------
# Measurements.


def measure(ctx: RunContext, specs: list[MeasurementSpec], skip_once: bool
            ) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    """(scalars, series, errors) of the measurements; cached in the run's measurements.json."""
    cache_path = ctx.run_dir / MEASUREMENT_CACHE
    try:
        cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    except ValueError:
        cache = {}
    scalars: dict[str, Any] = {}
    series: dict[str, Any] = {}
    errors: dict[str, str] = {}
    done = set()
    for spec in specs:
        fn = MEASUREMENTS[spec.name]
        if fn in done or (spec.once and skip_once):
            continue
        done.add(fn)
        key = spec.key()
        if key not in cache:
            try:
                out = fn(dataclasses.replace(ctx, options=spec.options))
                entry: dict[str, Any] = {"scalars": {}, "series": {}}
                for k, v in out.items():
                    if isinstance(v, Series):
                        entry["series"][k] = v.to_json()
                    elif isinstance(v, (int, float)) and not isinstance(v, bool):
                        entry["scalars"][k] = v
                    else:
                        raise TypeError(f"returned {k}={v!r}: values must be numbers or Series")
                cache[key] = entry
            except Exception as err:  # noqa: BLE001 -- recorded; the other measurements go on
                errors[spec.name] = f"{type(err).__name__}: {err}"
                continue
        scalars.update(cache[key]["scalars"])
        series.update(cache[key]["series"])
    _write_json(cache_path, cache)
    return scalars, series, errors


# --------------------------------------------------------------------------------------------
# The experiment.


def describe_machine(devices: Optional[list] = None) -> str:
    """``cpu (Intel(R) Xeon(R) ..., 2 cores), 1 device(s), jax 0.10.2``."""
    import jax

    devs = list(devices or jax.devices())
    d = devs[0]
    kind = getattr(d, "device_kind", d.platform)
    if d.platform == "cpu":
        model = platform.processor() or "CPU"
        try:
            for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        kind = f"{model}, {os.cpu_count()} cores"
    return f"{d.platform} ({kind}), {len(devs)} device(s), jax {jax.__version__}"


def describe_scale(cfg: Config) -> str:
    m, t = cfg.model, cfg.train
    return (f"d_model {m.d_model}, {m.n_layers} layers, {t.steps} steps of {t.batch_size} x "
            f"{cfg.data.seq_len} tokens")


def short_where(devices: Optional[list], cfg: Optional[Config], n_seeds: int,
                configs: Optional[list[Config]] = None) -> str:
    """The claims table's default 'where measured', from ALL variants' configs:
    ``d128 L4/12/24, 300 steps, byte-level, CPU x1, 3 seeds`` (a key that differs between
    variants lists its values)."""
    import jax

    devs = list(devices or jax.devices())
    dev = f"{devs[0].platform.upper()} x{len(devs)}"
    if devs[0].platform != "cpu":
        dev = f"{getattr(devs[0], 'device_kind', devs[0].platform)} x{len(devs)}"
    cfgs = list(configs or ([cfg] if cfg is not None else []))
    parts = [scale_of(cfgs)] if cfgs else []
    return ", ".join(parts + [dev, f"{n_seeds} seed{'s' if n_seeds > 1 else ''}"])


class _Runner:
    def __init__(self, exp: Experiment, devices: Optional[list], command: str):
        self.exp, self.devices, self.command = exp, devices, command
        self.out = exp.out
        self.records: dict[tuple[str, int], dict[str, Any]] = {}
        self.corpora: dict[tuple, Any] = {}
        self.once_done: set[str] = set()
        self.warnings: list[str] = []
        self.provenance = provenance(command, devices)
        self.fingerprints: dict[str, dict] = {}     # corpus digest -> fingerprint, of the runs

    def corpus(self, cfg: Config):
        from tfm_jax import data as data_lib

        d = cfg.data    # variants may differ in source and tokenizer
        key = (d.path, d.val_fraction, d.cache_dir, tuple(d.include or ()), d.tokenizer,
               d.text_field, repr(d.mixture))
        if key not in self.corpora:
            tok = data_lib.load_tokenizer(None if d.tokenizer == "none" else d.tokenizer)
            self.corpora[key] = data_lib.corpus_for(d, tok)
        return self.corpora[key]

    def variant_config(self, variant: str, seed: int) -> Config:
        var = self.exp.variants[variant]
        extra = {}
        if var.init_from is not None and var.init_from.convert.kv_heads is not None:
            extra["model.n_kv_heads"] = var.init_from.convert.kv_heads
        return self.exp.config(variant, seed, extra)

    def one(self, variant: str, seed: int) -> dict[str, Any]:
        """Train (or read back) one run and measure it; never raises except on interrupts."""
        from tfm_jax import train as train_lib

        rec: dict[str, Any] = {"variant": variant, "seed": seed,
                               "run_dir": str(self.exp.run_dir(variant, seed)),
                               "status": "failed", "metrics": {}, "series": {}}
        t0 = time.perf_counter()
        try:
            cfg = self.variant_config(variant, seed)
            state, last = run_state(cfg)
            diff = config_differences(cfg) if state != "new" else []
            if diff:
                raise ConfigError(
                    f"{cfg.run_dir} holds a run of a different config ({'; '.join(diff[:4])}"
                    f"{'; ...' if len(diff) > 4 else ''}); remove that directory to rerun it, or "
                    "give the experiment another name (or out_dir)")
            result = None
            var = self.exp.variants[variant]
            if state == "finished":
                rec["outcome"] = f"finished earlier (step {last}), read back"
            else:
                if state == "new" and var.init_from is not None:
                    trip = self.convert_from(var.init_from, seed, cfg)
                    if trip is not None:
                        rec["hf_round_trip"] = trip
                    state, last = "partial", 0
                (cfg.run_dir / MEASUREMENT_CACHE).unlink(missing_ok=True)
                result = train_lib.train(cfg, resume=state == "partial", devices=self.devices,
                                         corpus=self.corpus(cfg))
                rec["outcome"] = (f"resumed at step {last}, trained to {result.final_step}"
                                  if state == "partial" and last
                                  else f"trained {result.final_step} steps")
                if var.init_from is not None:
                    rec["outcome"] += f" from converted {var.init_from.run}/seed{seed}"
            rec["steps"] = cfg.train.steps
            from tfm_jax import data as data_lib

            fp = data_lib.run_corpus(cfg.run_dir)       # what the run recorded it trained on
            if fp is not None:
                rec["corpus_digest"] = fp["digest"]
                self.fingerprints[fp["digest"]] = fp
            rec["train_s"] = time.perf_counter() - t0 if result is not None else None
            t1 = time.perf_counter()
            ctx = RunContext(cfg, cfg.run_dir, variant, seed, train_result=result,
                             devices=self.devices)
            rec["metrics"], rec["series"], errs = measure(
                ctx, self.exp.measurements, skip_once=variant in self.once_done)
            self.once_done.add(variant)
            rec["measure_s"] = time.perf_counter() - t1
            if errs:
                rec["measurement_errors"] = errs
                for name, e in errs.items():
                    self.warnings.append(f"{variant}/seed{seed}: measurement {name} failed: {e}")
            rec["curves"] = _curves(cfg.run_dir)
            val = rec["curves"].setdefault("val", [])
            if "val_loss" in rec["metrics"] and (not val or val[-1][0] < cfg.train.steps):
                # a short run (eval_every past its end): the final evaluation closes the curve
                val.append([cfg.train.steps, rec["metrics"]["val_loss"]])
            if var.init_from is not None:
                # plotted after the source run: steps continue from its last one, and the
                # evaluation right after conversion is the first validation point
                off = rec["step_offset"] = self.variant_config(var.init_from.run,
                                                               seed).train.steps
                rec["curves"] = {k: [[st + off, x] for st, x in c]
                                 for k, c in rec["curves"].items()}
                if "init_val_loss" in rec["metrics"]:
                    rec["curves"]["val"].insert(0, [off, rec["metrics"]["init_val_loss"]])
            rec["status"] = "ok"
        except (train_lib.Interrupted, KeyboardInterrupt):
            rec["status"] = "interrupted"
            rec["outcome"] = "interrupted (checkpoint saved); rerun the same command to continue"
            rec["wall_s"] = time.perf_counter() - t0
            self.records[(variant, seed)] = rec
            raise
        except ConfigError as err:
            rec["error"] = str(err)
        except Exception as err:  # noqa: BLE001 -- recorded; the other runs go on
            rec["error"] = f"{type(err).__name__}: {err}"
            rec["traceback"] = traceback.format_exc(limit=12)
        rec["wall_s"] = time.perf_counter() - t0
        if rec["status"] == "failed":
            rec["outcome"] = "FAILED"
        self.records[(variant, seed)] = rec
        return rec

    def convert_from(self, init: Any, seed: int, cfg: Config) -> Optional[dict]:
        """Converts the source run of ``init`` at ``seed`` into ``cfg.run_dir``; returns the
        Hugging Face round trip's record (via=hf) or None."""
        from tfm_jax.tools.convert import convert_run

        src = self.records.get((init.run, seed))
        if src is None or src["status"] != "ok":
            why = src.get("error", src["status"]) if src else "not run"
            raise RuntimeError(f"init_from: source run {init.run}/seed{seed} did not finish "
                               f"({why.splitlines()[0] if why else ''})")
        params_from = None
        if init.via == "hf":        # out as a Hugging Face folder, back in from it
            import shutil

            from tfm_jax.hf import export_hf, params_via_hf

            hf_folder = cfg.run_dir.parent / f"{cfg.run_dir.name}-hf"
            shutil.rmtree(hf_folder, ignore_errors=True)   # (an interrupted earlier export)
            export_hf(src["run_dir"], hf_folder, dtype="float32", say=lambda *a, **k: None)
            params_from = params_via_hf(hf_folder)
        convert_run(src["run_dir"], config=cfg, corpus=self.corpus(cfg), devices=self.devices,
                    params_from=params_from)
        if params_from is None:
            return None
        import json

        return json.loads((cfg.run_dir / "convert.json").read_text())["params_from"]

    def results(self) -> dict[str, Any]:
        exp = self.exp
        variants = list(exp.variants)
        runs = [self.records[(v, s)] for v in exp.order() for s in exp.seeds
                if (v, s) in self.records]
        agg = aggregate(runs, variants)
        where = describe_machine(self.devices)
        try:
            common: Optional[Config] = exp.common_config()
            where += "; " + describe_scale(common)
        except ConfigError:
            common = None
        configs = []
        for v in variants:
            try:
                configs.append(self.variant_config(v, exp.seeds[0]))
            except ConfigError:
                pass
        short = short_where(self.devices, common, len(exp.seeds), configs)
        if len(configs) > 1:
            where += f" (variants: {scale_of(configs)})"
        kind = self.provenance["device"]["device_kind"]
        claims = [judge_claim(c.model_dump(), agg, short, runs, kind) for c in exp.claims]
        prov = {**self.provenance, "load_end": load_average(),
                "corpus": list(self.fingerprints.values()) or None}
        return {
            "experiment": {"name": exp.name, "description": exp.description,
                           "variants": variants, "seeds": exp.seeds,
                           "variant_descriptions": {v: exp.variants[v].description
                                                    for v in variants},
                           "derived_from": exp.derived_from,
                           "measurements": [m.model_dump() for m in exp.measurements],
                           "plots": [p.model_dump() for p in exp.plots],
                           "claims": [c.model_dump() for c in exp.claims]},
            "command": self.command, "where": where, "provenance": prov,
            "written": datetime.datetime.now().isoformat(timespec="seconds"),
            "runs": runs, "aggregates": agg, "claims": claims, "plots": [],
            "warnings": list(self.warnings)}


def pilot_runs(path: str) -> list[dict[str, Any]]:
    """The runs of a pilot's results.json (``--dry-run --pilot``); ExperimentError otherwise."""
    import json

    from tfm_jax.ablate.spec import ExperimentError

    p = pathlib.Path(path)
    try:
        runs = json.loads(p.read_text()).get("runs")
    except (OSError, ValueError, AttributeError) as err:
        raise ExperimentError(f"--pilot {path}: not a readable results.json ({err})") from None
    if not runs:
        raise ExperimentError(f"--pilot {path}: no runs in it (a results.json of tfm-jax "
                              "ablate)")
    return runs


def run_experiment(experiment: str | pathlib.Path | Experiment, *, devices: Optional[list] = None,
                   dry_run: bool = False, command: Optional[str] = None,
                   progress: bool = True, pilot: Optional[str] = None,
                   sd: Optional[float] = None) -> ExperimentResult:
    """Run (or continue) an experiment; see the module docstring. ``devices``: the devices each
    run uses (default all). ``dry_run``: validate every run's config and print the plan."""
    exp = experiment if isinstance(experiment, Experiment) else load_experiment(experiment)
    exp.common_config()                      # base + overrides: an error here stops everything
    command = command or " ".join(["tfm-jax ablate", str(experiment)])
    runner = _Runner(exp, devices, command)
    # seed-major: the variants of one seed run back to back (an init_from source first), so a
    # change of machine load over the experiment spreads over every variant (timings compare)
    plan = [(v, s) for s in exp.seeds for v in exp.order()]
    out = exp.out
    if dry_run:
        for v, s in plan:
            try:
                cfg = runner.variant_config(v, s)
                state, last = run_state(cfg)
                print(f"{v}/seed{s}: {state}" + (f" (checkpoint {last})" if last else "")
                      + f" -> {cfg.run_dir}")
            except ConfigError as err:
                print(f"{v}/seed{s}: INVALID: {err}")
        if pilot is not None or sd is not None:
            print("\n" + "\n".join(seed_plan(exp, pilot_runs(pilot) if pilot else None, sd)))
        return ExperimentResult({}, out, 0, {})
    rundir.check_run_dir(out)       # the experiment's folder and every run in it: no links
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(plan, desc=f"ablate {exp.name}", unit="run", disable=not progress,
               dynamic_ncols=True)
    try:
        for i, (v, s) in enumerate(bar):
            interrupts.note(f"during ablation {exp.name!r} at run {v}/seed{s} (finished runs are "
                            "kept; the same command continues the experiment)")
            rec = runner.one(v, s)
            line = f"[{i + 1}/{len(plan)}] {v}/seed{s}: {rec['outcome']}"
            if rec["status"] == "ok":
                m = rec["metrics"]
                line += f" in {rec['wall_s']:.0f} s" if "read back" not in rec["outcome"] else ""
                if "val_loss" in m:
                    line += f"; val_loss {m['val_loss']:.4f}, ppl {m['perplexity']:.3f}"
            else:
                line += f": {rec['error'].splitlines()[0]}"
            (bar.write if progress else print)(line)
            _write_json(out / "results.json", runner.results())
    finally:
        bar.close()
        if any(r["status"] == "interrupted" for r in runner.records.values()):
            _write_json(out / "results.json", runner.results())
    results = runner.results()
    files: dict[str, Any] = {"results.json": out / "results.json",
                             "results.md": out / "results.md", "plots": []}
    variants = list(exp.variants)
    runs = results["runs"]
    if any(r["status"] == "ok" for r in runs):
        plots_lib.loss_curves(runs, variants, out / "loss_curves.png")
        results["plots"].append("loss_curves.png")
        for spec in exp.plots:
            d = {**spec.model_dump(), "series_keys": spec.series_keys}
            name = plots_lib.plot_file(d)
            problem = plots_lib.plot(d, results["aggregates"], variants, out / name)
            if problem:
                results["warnings"].append(problem)
            else:
                results["plots"].append(name)
    files["plots"] = [out / p for p in results["plots"]]
    _write_json(out / "results.json", results)
    rundir.atomic_write(out / "results.md", markdown(results))
    failed = sum(r["status"] == "failed" for r in runs)
    print(f"\nablation {exp.name}: {len(runs) - failed} of {len(runs)} runs ok"
          + (f", {failed} failed (errors in results.json)" if failed else "")
          + f"\n  results   {files['results.json']}\n  table     {files['results.md']}"
          + "".join(f"\n  plot      {p}" for p in files["plots"])
          + f"\n  runs      {out}/<variant>/seed<k>/")
    for w in results["warnings"]:
        print(f"  warning: {w}", file=sys.stderr)
    return ExperimentResult(results, out, failed, files)
