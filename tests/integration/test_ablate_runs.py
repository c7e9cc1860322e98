"""The ablation runner end to end: one small experiment (2 variants x 2 seeds, a failing
variant, a variant started from a converted run): files written, aggregates against numpy,
resume skips finished runs and continues an interrupted one bitwise, a changed config is
refused. Runs train on one CPU device with jax's persistent compilation cache switched on for
this module (seeds of a variant share compiled programs)."""

import json
import pathlib
import shutil

import numpy as np
import pytest
import yaml

from tfm_jax.ablate.measurements import MEASUREMENTS, Series
from tfm_jax.ablate.spec import EXPERIMENT_DIR, load_experiment

SMOKE = EXPERIMENT_DIR / "smoke.yaml"


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
    raw = {**yaml.safe_load(SMOKE.read_text()), "out_dir": str(tmp_path / "out"), **changes}
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
         "metric": "init_val_loss[up] - val_loss[up]", "kind": "superiority",
         "direction": "greater"},
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
    assert claims["MQA caches 4x less than MHA at 4 heads"]["verdict"] == "consistent"
    assert claims["a claim that is only reported"]["verdict"] == "reported"
    assert claims["bad is measured"]["verdict"] == "not measured"
    up = claims["uptraining lowers the loss"]
    assert up["verdict"] in ("consistent", "inconsistent", "inconclusive")
    assert up["n"] == 2 and up["interval"][0] <= up["measured"] <= up["interval"][1]
    # the scale comes from every variant's config (up trains its own steps)
    steps = sorted({exp_steps for exp_steps in (r.get("steps") for r in res.results["runs"])
                    if exp_steps})
    assert up["where"].startswith(f"d32 L1, {'/'.join(map(str, steps))} steps, byte-level, "
                                  "CPU x1, 2 seeds"), up["where"]


def test_provenance_and_times(ablation, corpus):
    """Every results.json records what produced it (one function writes it)."""
    import subprocess

    exp, res, _ = ablation
    prov = json.loads((exp.out / "results.json").read_text())["provenance"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=pathlib.Path(__file__).parent).stdout.strip()
    assert prov["git"]["commit"] == head and isinstance(prov["git"]["dirty"], bool)
    assert prov["versions"]["jax"] and prov["machine"]["cores"] >= 1 and prov["machine"]["cpu"]
    assert prov["device"]["platform"] == "cpu" and prov["device"]["count"] == 1
    assert len(prov["load_start"]) == 3 and len(prov["load_end"]) == 3
    assert prov["command"].startswith("tfm-jax ablate")
    # the corpus the runs trained on: one fingerprint (every variant reads the same file),
    # the one each run recorded in its corpus.json
    from tfm_jax import data as data_lib

    [fp] = prov["corpus"]
    ok = [r for r in res.results["runs"] if r["status"] == "ok"]
    assert fp["source"] == str(corpus) and len(fp["digest"]) == 64
    assert {r["corpus_digest"] for r in ok} == {fp["digest"]}
    assert {data_lib.run_corpus(r["run_dir"])["digest"] for r in ok} == {fp["digest"]}
    for r in res.results["runs"]:
        if r["status"] == "ok" and "read back" not in r.get("outcome", ""):
            assert r["train_s"] > 0 and r["measure_s"] > 0
            assert r["train_s"] + r["measure_s"] <= r["wall_s"] + 1e-6
        if r["status"] == "ok":      # the final evaluation closes every validation curve
            assert r["curves"]["val"][-1][0] == r["steps"] + r.get("step_offset", 0)


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
