"""The ablation runner's pieces (tfm_jax.ablate): experiment-file validation, expressions and
claims, statistics and tables against numpy. (One experiment end to end:
tests/integration/test_ablate_runs.py.)"""

import pathlib

import numpy as np
import pytest
import yaml

from tfm_jax import cli
from tfm_jax.ablate import report
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
    assert [c.metric for c in exp.derive(seeds=[0]).claims] == [c.metric for c in exp.claims]
    assert exp.derive(seeds=[0]).name == exp.name
    # the derived experiment describes its own runs: its steps, seeds and variants, not the
    # file's ("600 steps ... seeds 0-2"); the file's claim notes are marked as the file's
    assert d.description.startswith("Derived from fp8_training_long (--set train.steps=1200")
    assert "1200 steps (common config), seeds 3, 4, variants fp8_delayed, fp32" in d.description
    assert "600" not in d.description and d.derived_from == "fp8_training_long"
    noted = exp.model_copy(update={"claims": [exp.claims[0].model_copy(
        update={"note": "runs trained 630 steps"})]}).derive(seeds=[0])
    assert noted.claims[0].note == ("(written for fp8_training_long's own runs) runs trained "
                                    "630 steps")
    assert exp.seeds == [0, 1, 2, 3, 4] and len(exp.variants) == 4      # the original stays
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


def test_expressions_are_bounded():
    """The audit: '7**7**8' took 1.9 s (an unbounded integer) and "'a'*10**9" built 1 GB.
    Powers compute in floats (an overflow is an error), text never enters arithmetic, and an
    expression is one short formula."""
    import time

    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="overflows"):
        report.evaluate("7**7**8", AGG)
    for bad in ("'a' * 10**9", "'a' * kv[mha]", "'x' + 'y'"):
        with pytest.raises(ValueError, match="numbers only"):
            report.evaluate(bad, AGG)
    assert time.perf_counter() - t0 < 0.5
    assert report.evaluate("kv[mha] ** 2", AGG) == 64.0
    with pytest.raises(ValueError, match="at most 1000"):
        report.parse_expression("1 + " * 300 + "1")


@pytest.mark.parametrize("claim, verdict", [
    # an undeclared comparison (no kind) is reported, never judged
    ({"metric": "ppl[gqa] - ppl[mha]", "expected": 0.12, "check": "<="}, "reported"),
    ({"metric": "ppl[gqa] / ppl[mha]", "check": "measured > 1"}, "reported"),
    ({"metric": "ppl[gqa]"}, "reported"),
    ({"expected": "640 MB"}, "reported"),
    ({"metric": "kv[gqa]", "expected": 1, "check": "<"}, "not measured"),
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
                           "verdict": "consistent", "where": "here", "n": 3, "mde": 0.5,
                           "interval": [0.5, 1.0]}]}
    assert report.scalars_table(results) == (
        "| metric | a | b |\n|---|---|---|\n| val_loss | 1.250 ± 0.354 | 2.000 |")
    assert report.claims_table(results).splitlines()[2] == (
        "| 1 | b \\| worse | s | 1 | 0.7500 [0.5000, 1.000] (n 3) | 0.5000 | consistent | here |")


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


def test_layer_axes_get_integer_ticks():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tfm_jax.ablate import plots

    fig, ax = plt.subplots()
    ax.plot([0, 1, 2, 3], [1.0, 2.0, 1.5, 1.2])
    plots.integer_ticks(ax, "layer")
    fig.canvas.draw()
    assert all(float(t).is_integer() for t in ax.get_xticks())
    ax2 = fig.add_subplot(212)
    ax2.plot([0, 1], [0, 1])
    plots.integer_ticks(ax2, "kv_bytes")                 # other axes keep their ticks
    fig.canvas.draw()
    assert not all(float(t).is_integer() for t in ax2.get_xticks())
    plt.close(fig)
