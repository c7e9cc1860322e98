"""The ablation runner (tfm_jax.ablate): experiment-file validation, expressions and claims,
aggregates against numpy, and one small experiment end to end (2 variants x 2 seeds, a failing
variant, a variant started from a converted run): files written, resume skips finished runs
and continues an interrupted one bitwise, a changed config is refused.

Runs train on one CPU device with jax's persistent compilation cache switched on for this
module only (seeds of a variant share compiled programs), so the module takes well under a
minute on 2 cores."""

import json
import pathlib
import shutil

import numpy as np
import pytest
import yaml

from tfm_jax import cli
from tfm_jax.ablate import report
from tfm_jax.ablate.measurements import MEASUREMENTS, Series
from tfm_jax.ablate.spec import EXPERIMENT_DIR, ExperimentError, load_experiment

SMOKE = EXPERIMENT_DIR / "smoke.yaml"


def _raw(**changes):
    raw = yaml.safe_load(SMOKE.read_text())
    raw.update(changes)
    return raw


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("changes, match", [
    ({"varients": {"a": {}}}, r"varients: unknown key; did you mean 'variants'\?"),
    ({"measurements": ["kv_byte"]}, r"measurements: .*unknown measurement 'kv_byte'; did you "
                                    r"mean 'kv_bytes'\?"),
    ({"measurements": ["params", "params"]}, "'params' listed twice"),
    ({"variants": {}}, "variants: .*at least 1 item"),
    ({"variants": {"a/b": {}}}, "variant name 'a/b'"),
    ({"variants": {"a": {"init_from": {"run": "zz"}}}},
     r"variants.a.init_from.run: 'zz' is not a variant"),
    ({"variants": {"a": {"init_from": {"run": "b"}}, "b": {"init_from": {"run": "a"}}}},
     "init_from forms a cycle: a -> b -> a"),
    ({"variants": {"a": {"init_from": {"run": "a", "convrt": {}}}}},
     r"variants.a.init_from.convrt: unknown key; did you mean 'convert'\?"),
    ({"seeds": [0, 0]}, r"seeds \[0, 0\] repeat a value"),
    ({"claims": [{"claim": "x", "metric": "__import__('os').system('true')"}]},
     "(Call|Attribute) is not allowed"),
    ({"claims": [{"claim": "x", "metric": "ppl[a]", "check": "~abc%"}]}, "check '~abc%'"),
    ({"claims": [{"claim": "x", "metrc": "ppl[a]"}]}, r"did you mean 'metric'\?"),
    ({"plots": [{"x": "a"}]}, r"plots.0.y: Field required"),
    ({"name": "a b"}, "name: String should match pattern"),
])
def test_invalid_experiment(changes, match):
    with pytest.raises(ExperimentError, match=match) as info:
        load_experiment("bad.yaml", _raw(**changes))
    assert str(info.value).startswith("invalid experiment file bad.yaml")


def test_shipped_experiments_valid():
    for path in sorted(EXPERIMENT_DIR.glob("*.yaml")):
        exp = load_experiment(path)
        exp.common_config()
        for v in exp.variants:
            exp.config(v, exp.seeds[0])           # every variant's config validates
    exp = load_experiment("smoke")                # bare names find shipped experiments
    assert exp.measurements[0].name == "val_loss"   # always measured, added first
    assert exp.order() == list(exp.variants)


def test_val_loss_measured_without_measurements_key():
    raw = _raw()
    del raw["measurements"]
    exp = load_experiment("x.yaml", raw)
    assert [m.name for m in exp.measurements] == ["val_loss"]


def test_base_and_variant_config_errors(tmp_path):
    exp = load_experiment("x.yaml", _raw(overrides={"model.n_hedas": 2}))
    with pytest.raises(ExperimentError, match=r"(?s)base \+ overrides: .*model.n_hedas: unknown "
                                              r"key; did you mean 'model.n_heads'\?"):
        exp.common_config()
    assert cli.main(["ablate", str(tmp_path / "missing.yaml")]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_raw(seeds="zero")))
    assert cli.main(["ablate", str(bad)]) == 2


def test_derived_experiment_from_the_command_line(tmp_path, capsys, monkeypatch):
    """tfm-jax ablate --set/--variants/--seeds/--name: Experiment.derive."""
    exp = load_experiment("fp8_training_long")
    with pytest.raises(ExperimentError, match="--set changes every run's config.*--name"):
        exp.derive(sets={"train.steps": 1200})
    d = exp.derive(sets={"train.steps": 1200, "quant.amax_history": 1024},
                   variants=["fp8_delayed", "fp32"], seeds=[3, 4], name="fp8_1200")
    assert list(d.variants) == ["fp8_delayed", "fp32"] and d.seeds == [3, 4]
    assert d.out == pathlib.Path("runs/ablate/fp8_1200")
    cfg = d.config("fp8_delayed", 3)
    # the set value wins over the file's common overrides (train: {steps: 600} and
    # quant.amax_history: 16), the file's other common overrides stay
    assert (cfg.train.steps, cfg.quant.amax_history, cfg.train.warmup_steps) == (1200, 1024, 30)
    assert cfg.train.seed == 3 and cfg.run.dir == "runs/ablate/fp8_1200/fp8_delayed/seed3"
    # a variant's own value still wins over --set
    assert exp.derive(sets={"quant.recipe": "fp8_dynamic"}, name="x").config(
        "fp32", 0).quant.recipe == "none"
    # claims naming a dropped variant are dropped, the others kept
    assert [c.metric for c in d.claims] == [exp.claims[0].metric]
    assert exp.derive(seeds=[0]).claims == exp.claims and exp.derive(seeds=[0]).name == exp.name
    assert exp.seeds == [0, 1, 2] and len(exp.variants) == 4      # the original is unchanged
    for bad, match in [(dict(variants=["fp32", "nope"]), "nope: not a variant"),
                       (dict(variants=["fp32", "fp32"]), "twice"),
                       (dict(seeds=[1, 1]), "repeat"),
                       (dict(name="a/b"), "names a folder"),
                       (dict(sets={"model.n_hedas": 2}, name="y"), "n_hedas")]:
        with pytest.raises(ExperimentError, match=match):
            exp.derive(**bad)
    # the CLI: a dry run of the derived experiment; the recorded command carries the flags
    monkeypatch.chdir(tmp_path)
    assert cli.main(["ablate", "fp8_training_long", "--set", "train.steps=1200", "--variants",
                     "fp32", "--seeds", "0", "--name", "long1200", "--dry-run"]) == 0
    assert capsys.readouterr().out.strip() == \
        "fp32/seed0: new -> runs/ablate/long1200/fp32/seed0"
    assert cli.main(["ablate", "fp8_training_long", "--seeds", "0,x"]) == 2
    assert "--seeds '0,x': integers" in capsys.readouterr().err


# ----------------------------------------------------------------------------- expressions


AGG = {"scalars": {"mha": {"ppl": report.stats([4.0, 6.0]), "kv": report.stats([8])},
                   "gqa": {"ppl": report.stats([5.0, 5.5])}},
       "series": {"dec": {"by": ["context", "batch"], "rows": [
           {"variant": "mha", "context": 256, "batch": 1, "tps": report.stats([10.0, 20.0])}]}}}


def test_expressions():
    assert report.evaluate("ppl[gqa] - ppl[mha]", AGG) == pytest.approx(0.25)
    assert report.evaluate("ppl['mha'] / kv[mha]", AGG) == pytest.approx(5 / 8)
    assert report.evaluate("std('ppl', 'mha')", AGG) == pytest.approx(np.std([4, 6], ddof=1))
    assert report.evaluate("value('tps', 'mha', context=256, batch=1)", AGG) == 15.0
    assert report.evaluate("abs(-2) + max(1, 3) if ppl[mha] > 4 else 0", AGG) == 5
    with pytest.raises(report.NotMeasured, match="kv.gqa. was not measured"):
        report.evaluate("kv[gqa]", AGG)
    with pytest.raises(report.NotMeasured):
        report.evaluate("value('tps', 'mha', context=512)", AGG)
    for bad in ("ppl.mean", "open('x')", "[1, 2]", "lambda: 1", "ppl[mha][0]", "True"):
        with pytest.raises(ValueError, match="not allowed"):
            report.parse_expression(bad)
    with pytest.raises(ValueError, match="unknown name 'ppl'"):
        report.evaluate("ppl", AGG)


@pytest.mark.parametrize("claim, verdict", [
    ({"metric": "ppl[gqa] - ppl[mha]", "expected": 0.12, "check": "<="}, "does not hold"),
    ({"metric": "ppl[gqa] - ppl[mha]", "expected": 0.3, "check": "<="}, "holds"),
    ({"metric": "ppl[gqa]", "expected": 5.0, "check": "~10%"}, "holds"),
    ({"metric": "ppl[gqa]", "expected": 6.0, "check": "~0.5"}, "does not hold"),
    ({"metric": "ppl[gqa]", "expected": 6.0, "check": "~0.75"}, "holds"),
    ({"metric": "ppl[gqa]", "expected": 5, "check": "measured < expected and ppl[mha] < 6"},
     "does not hold"),
    ({"metric": "ppl[gqa] / ppl[mha]", "check": "measured > 1"}, "holds"),
    ({"metric": "ppl[gqa]"}, "reported"),
    ({"expected": "640 MB"}, "reported"),
    ({"metric": "kv[gqa]", "expected": 1, "check": "<"}, "not measured"),
    ({"metric": "ppl[gqa]", "expected": "text", "check": "<"}, "error: check '<' needs a "
                                                              "numeric 'expected'"),
])
def test_claims(claim, verdict):
    row = report.judge_claim({"claim": "c", **claim}, AGG, "here")
    assert row["verdict"].startswith(verdict)
    assert row["where"] == "here"


def test_stats_against_numpy():
    vals = [1.5, 2.25, 7.0]
    s = report.stats(vals)
    assert s["mean"] == pytest.approx(np.mean(vals)) and s["n"] == 3
    assert s["std"] == pytest.approx(np.std(vals, ddof=1))
    assert report.stats([3.0])["std"] is None
    assert report.fmt_stats(report.stats([1.0, 1.5])) == "1.250 ± 0.354"
    assert report.fmt_stats(report.stats([33376, 33376])) == "33,376"


def test_results_and_claims_tables():
    runs = [{"variant": v, "seed": k, "status": "ok", "metrics": {"val_loss": x}, "series": {}}
            for v, k, x in [("a", 0, 1.0), ("a", 1, 1.5), ("b", 0, 2.0)]]
    results = {"experiment": {"variants": ["a", "b"]},
               "aggregates": report.aggregate(runs, ["a", "b"]),
               "claims": [{"claim": "b | worse", "source": "s", "claimed": 1, "measured": 0.75,
                           "verdict": "holds", "where": "here"}]}
    assert report.scalars_table(results) == (
        "| metric | a | b |\n|---|---|---|\n| val_loss | 1.250 ± 0.354 | 2.000 |")
    assert report.claims_table(results).splitlines()[2] == (
        "| 1 | b \\| worse | s | 1 | 0.7500 | holds | here |")


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def corpus(text_corpus):
    return text_corpus


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """jax's persistent compilation cache, for this module only (restored afterwards)."""
    import jax
    from jax._src import compilation_cache

    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")
    old = {k: getattr(jax.config, k) for k in keys}
    jax.config.update(keys[0], str(tmp_path_factory.mktemp("xla_cache")))
    jax.config.update(keys[1], 0)
    jax.config.update(keys[2], 0)
    compilation_cache.reset_cache()
    yield
    for k, v in old.items():
        jax.config.update(k, v)
    compilation_cache.reset_cache()


class Counter:
    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, cfg, **kw):
        self.calls.append((cfg.run_dir.parent.name, cfg.train.seed, kw.get("resume")))
        return self.fn(cfg, **kw)


FAKE_CALLS = []


def fake_decode(ctx):
    """A plug-in measurement as the decode benchmark will be: options, the restored model, a
    series keyed by context and batch."""
    ctx.check_options({"contexts", "batches"})
    setup, state = ctx.restore()
    assert int(state.step) == ctx.cfg.train.steps
    FAKE_CALLS.append((ctx.variant, ctx.seed))
    return {"fake": Series(("context", "batch"), [
        {"context": c, "batch": b, "fake_tps": float(c * b * ctx.cfg.model.n_kv_heads)}
        for c in ctx.option("contexts") for b in ctx.option("batches", [1])])}


@pytest.fixture(scope="module", autouse=True)
def registered():
    MEASUREMENTS["fake_decode"] = fake_decode           # one line registers a measurement
    yield
    del MEASUREMENTS["fake_decode"]


def _experiment(tmp_path, corpus, **changes):
    raw = _raw(out_dir=str(tmp_path / "out"), **changes)
    raw["overrides"]["data.path"] = str(corpus)
    raw["measurements"] = raw["measurements"] + [
        {"name": "fake_decode", "contexts": [8, 16], "batches": [1, 4], "once": True},
        {"name": "decode", "contexts": [8], "batches": [2], "new_tokens": 3, "once": True}]
    raw["plots"] = raw["plots"] + [{"x": "context", "y": "fake_tps",
                                    "series": ["variant", "batch"], "logx": True},
                                   {"x": "context", "y": "nothing"}]
    raw["variants"] = {
        "mha": {"model.n_kv_heads": 4},
        "mqa": {"model.n_kv_heads": 1},
        "bad": {"model.n_kv_heads": 3},                       # 4 heads: invalid
        # MHA mean-pooled to one K/V head: the same compiled programs as mqa (fast)
        "up": {"init_from": {"run": "mha", "convert": {"kv_heads": 1}},
               "description": "MHA mean-pooled to 1 K/V head"},
    }
    raw["claims"] = raw["claims"] + [
        {"claim": "uptraining lowers the loss", "source": "test",
         "metric": "init_val_loss[up] - val_loss[up]", "expected": 0, "check": ">"},
        {"claim": "bad is measured", "metric": "val_loss[bad]", "expected": 1, "check": "<"}]
    return load_experiment(tmp_path / "exp.yaml", raw)


def _run(exp, monkeypatch):
    import jax

    from tfm_jax import train as train_lib
    from tfm_jax.ablate.runner import run_experiment

    counter = Counter(train_lib.train)
    monkeypatch.setattr(train_lib, "train", counter)
    res = run_experiment(exp, devices=jax.devices()[:1], progress=False)
    return res, counter.calls


@pytest.fixture(scope="module")
def ablation(tmp_path_factory, corpus, compile_cache):
    tmp = tmp_path_factory.mktemp("ablate")
    exp = _experiment(tmp, corpus)
    with pytest.MonkeyPatch.context() as mp:
        res, calls = _run(exp, mp)
    return exp, res, calls


def test_runs_and_failures(ablation):
    exp, res, calls = ablation
    runs = {(r["variant"], r["seed"]): r for r in res.results["runs"]}
    assert sorted(calls) == sorted([("mha", 0, False), ("mha", 1, False), ("mqa", 0, False),
                                    ("mqa", 1, False), ("up", 0, True), ("up", 1, True)])
    assert res.failed == 2
    for seed in (0, 1):
        bad = runs[("bad", seed)]
        assert bad["status"] == "failed" and "variant 'bad'" in bad["error"]
        assert "n_kv_heads=3" in bad["error"]
        for v in ("mha", "mqa", "up"):
            assert runs[(v, seed)]["status"] == "ok", runs[(v, seed)].get("error")
    # order: 'up' runs after its source
    order = [r["variant"] for r in res.results["runs"]]
    assert order.index("up") > order.index("mha")


def test_files_written(ablation):
    exp, res, _ = ablation
    out = exp.out
    for name in ("results.json", "results.md", "loss_curves.png", "perplexity-vs-kv_bytes.png",
                 "kv_bytes-vs-context.png", "fake_tps-vs-context.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "nothing-vs-context.png").exists()
    assert any("plot nothing vs context: no measurement series" in w
               for w in res.results["warnings"])
    md = (out / "results.md").read_text()
    assert "| metric | mha | mqa | bad | up |" in md
    assert "## Claims" in md and "FAILED" in md and "MHA mean-pooled" in md
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["aggregates"] == json.loads(json.dumps(res.results["aggregates"]))
    for seed in (0, 1):
        assert (out / "mha" / f"seed{seed}" / "checkpoints" / "4").is_dir()
        assert (out / "up" / f"seed{seed}" / "convert.json").is_file()


def test_aggregates_match_numpy(ablation):
    exp, res, _ = ablation
    agg = res.results["aggregates"]["scalars"]
    for v in ("mha", "mqa", "up"):
        runs = [r for r in res.results["runs"] if r["variant"] == v]
        for r in runs:       # per-run numbers are the run directory's final evaluation
            rows = [json.loads(x) for x in (pathlib.Path(r["run_dir"]) / "metrics.jsonl")
                    .read_text().splitlines()]
            final = [x for x in rows if "val_loss" in x][-1]
            assert r["metrics"]["val_loss"] == final["val_loss"]
            assert final["step"] == 4
        for m in ("val_loss", "perplexity", "train_tokens_per_s", "kv_bytes"):
            vals = np.array([r["metrics"][m] for r in runs], dtype=float)
            assert agg[v][m]["mean"] == pytest.approx(np.mean(vals), rel=1e-12)
            assert agg[v][m]["std"] == pytest.approx(np.std(vals, ddof=1), rel=1e-12, abs=1e-12)
    assert "bad" not in agg or not agg["bad"]
    # measurements: params and KV bytes from the formulas, exact
    assert agg["mha"]["kv_bytes"]["mean"] == 2 * 4 * 8 * 4 * 1 * 32        # 2*Hkv*Dh*4B*L*T
    assert agg["mqa"]["kv_bytes"]["mean"] == 2 * 1 * 8 * 4 * 1 * 32
    assert agg["mha"]["params"]["mean"] - agg["mqa"]["params"]["mean"] == 2 * 32 * 3 * 8
    ser = {(r["variant"], r["context"]): r["kv_bytes"]["mean"]
           for r in res.results["aggregates"]["series"]["kv_bytes_by_context"]["rows"]}
    assert ser[("mha", 64)] == 2 * ser[("mha", 32)] == 8 * ser[("mqa", 32)]
    assert "init_val_loss" in agg["up"] and "init_val_loss" not in agg["mha"]
    # the plug-in: measured once per variant (first seed), its series averaged per key
    assert sorted(FAKE_CALLS) == [("mha", 0), ("mqa", 0), ("up", 0)]
    fake = {(r["variant"], r["context"], r["batch"]): r["fake_tps"]
            for r in res.results["aggregates"]["series"]["fake"]["rows"]}
    assert fake[("mqa", 16, 4)] == {"n": 1, "mean": 64.0, "std": None, "min": 64.0,
                                    "max": 64.0, "values": [64.0]}
    assert fake[("mha", 8, 1)]["mean"] == 32.0 and len(fake) == 3 * 2 * 2
    # the real decode measurement (tfm_jax.generate.decode_speed on the restored run)
    dec = {(r["variant"], r["context"], r["batch"]): r
           for r in res.results["aggregates"]["series"]["decode"]["rows"]}
    assert sorted(dec) == [("mha", 8, 2), ("mqa", 8, 2), ("up", 8, 2)]
    for r in dec.values():
        assert r["decode_tokens_per_s"]["n"] == 1 and r["decode_tokens_per_s"]["mean"] > 0
        assert r["decode_step_ms"]["mean"] > 0


def test_claims_table(ablation):
    _, res, _ = ablation
    claims = {c["claim"]: c for c in res.results["claims"]}
    assert claims["MQA caches 4x less than MHA at 4 heads"]["verdict"] == "holds"
    assert claims["a claim that is only reported"]["verdict"] == "reported"
    assert claims["bad is measured"]["verdict"] == "not measured"
    assert claims["uptraining lowers the loss"]["verdict"] in ("holds", "does not hold")
    assert claims["uptraining lowers the loss"]["where"].startswith("CPU x1, d32 L1")


def test_rerun_skips_resumes_and_refuses_changes(ablation, corpus, monkeypatch):
    exp, first, _ = ablation
    res, calls = _run(exp, monkeypatch)
    assert calls == []                                        # all finished: read back
    assert res.failed == 2
    assert {r["outcome"].split(" (")[0] for r in res.results["runs"] if r["status"] == "ok"} \
        == {"finished earlier"}
    before = {(r["variant"], r["seed"]): r["metrics"] for r in first.results["runs"]}
    for r in res.results["runs"]:
        assert r["metrics"] == before[(r["variant"], r["seed"])]

    # an interrupted run (its last checkpoint gone) is resumed, to bitwise the same result
    run_dir = exp.run_dir("mqa", 1)
    shutil.rmtree(run_dir / "checkpoints" / "4")
    res, calls = _run(exp, monkeypatch)
    assert calls == [("mqa", 1, True)]
    again = {(r["variant"], r["seed"]): r for r in res.results["runs"]}
    assert again[("mqa", 1)]["outcome"].startswith("resumed at step 2")
    assert again[("mqa", 1)]["metrics"]["val_loss"] == before[("mqa", 1)]["val_loss"]

    # a run saved before a config key existed reads that key as its default: still finished
    saved = run_dir / "config.yaml"
    raw = yaml.safe_load(saved.read_text())
    del raw["quant"]["fp8_operands"]
    saved.write_text(yaml.safe_dump(raw))
    res, calls = _run(exp, monkeypatch)
    assert calls == []
    again = {(r["variant"], r["seed"]): r for r in res.results["runs"]}
    assert again[("mqa", 1)]["outcome"].startswith("finished earlier")

    # a changed experiment does not reuse runs of another config
    changed = _experiment(exp.out.parent, corpus, overrides={**exp.overrides, "train.lr": 1e-2})
    res, calls = _run(changed, monkeypatch)
    assert calls == []
    err = {(r["variant"], r["seed"]): r.get("error", "") for r in res.results["runs"]}
    assert "holds a run of a different config (train.lr: 0.003 -> 0.01)" in err[("mha", 0)]


def test_paired_deltas_against_numpy():
    """Each variant vs the first, paired by seed; unfinished runs and missing seeds left out."""
    from tfm_jax.ablate.report import markdown, paired_deltas

    base = {0: 2.0, 1: 2.5, 2: 3.0}
    other = {0: 2.1, 1: 2.4, 3: 9.0}        # seed 3 has no baseline run
    runs = ([{"variant": "a", "seed": s, "status": "ok", "metrics": {"val_loss": v}}
             for s, v in base.items()]
            + [{"variant": "b", "seed": s, "status": "ok", "metrics": {"val_loss": v}}
               for s, v in other.items()]
            + [{"variant": "b", "seed": 2, "status": "failed", "metrics": {"val_loss": 1.0}}])
    got = paired_deltas(runs, ["a", "b"])
    want = 100 * (np.array([2.1, 2.4]) - np.array([2.0, 2.5])) / np.array([2.0, 2.5])
    st = got["metrics"]["val_loss"]["b"]
    assert got["baseline"] == "a" and st["n"] == 2
    assert st["mean"] == pytest.approx(want.mean(), rel=1e-12)
    assert st["std"] == pytest.approx(np.std(want, ddof=1), rel=1e-12)
    assert "final_train_loss" not in got["metrics"]
    from tfm_jax.ablate.report import aggregate
    res = {"experiment": {"name": "x", "variants": ["a", "b"], "seeds": [0, 1, 2, 3],
                          "variant_descriptions": {}},
           "command": "c", "written": "w", "where": "cpu", "claims": [], "runs": runs,
           "aggregates": aggregate(runs, ["a", "b"])}
    md = markdown(res)
    sem = np.std(want, ddof=1) / np.sqrt(2)
    assert f"| Δ% val_loss | {want.mean():+.2f} % ± {sem:.2f} (n 2) |" in md
