"""The quantization study (experiments.scripts.quant_study): the captured tensors are the
model's (x^T @ dy == the kernel gradient of the fp32 loss), the error metric against numpy +
ml_dtypes, and a smoke run on a tiny trained run writing JSON, markdown and PNGs. The real
study (with the perplexity table) is the slow test / the documented command."""

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from tfm_jax.config import compose_config
from experiments.scripts import quant_study as qs


@pytest.fixture(scope="module")
def run(tmp_path_factory, text_corpus):
    from tfm_jax.train import train

    tmp = tmp_path_factory.mktemp("study")
    cfg = compose_config("tiny", [{
        "model": {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                  "multiple_of": 32},
        "data": {"seq_len": 32, "path": str(text_corpus)},
        "train": {"batch_size": 8, "steps": 20, "warmup_steps": 5, "log_every": 10,
                  "eval_every": 20, "checkpoint_every": 20, "eval_batches": 2,
                  "sample_tokens": 0},
        "run": {"dir": str(tmp / "fp"), "tensorboard": False, "progress": False}}])
    res = train(cfg, devices=jax.devices()[:1])
    return cfg, res


def test_quant_error_against_numpy():
    x = np.random.default_rng(0).standard_normal((64, 96)).astype(np.float32) * 3
    for fmt, dt, fmax in (("float8_e4m3fn", ml_dtypes.float8_e4m3fn, 448.0),
                          ("int8", None, 127.0)):
        s = np.float32(fmax) / np.abs(x).max()
        xs = (x * s).astype(np.float32)
        q = (np.clip(xs, -fmax, fmax).astype(dt).astype(np.float32) if dt is not None
             else np.clip(np.round(xs), -fmax, fmax))
        err = q.astype(np.float64) * np.float64(np.float32(1) / s) - x
        rel = np.linalg.norm(err) / np.linalg.norm(x.astype(np.float64))
        got = qs.quant_error(x, fmt, "per_tensor")
        assert got["rel_err"] == pytest.approx(rel, rel=1e-5)
        assert got["snr_db"] == pytest.approx(-20 * np.log10(rel), rel=1e-5)
        assert got["saturated"] == 0.0
        # a static scale twice too large saturates exactly the values beyond amax / 2
        half = qs.quant_error(x, fmt, "per_tensor", np.float32(2) * s)
        assert half["saturated"] == pytest.approx(np.mean(np.abs(x) * 2 * s > fmax))


def test_capture_gives_the_kernel_gradient(run, text_corpus):
    """x^T @ dy of every captured projection equals jax.grad of the fp32 mean loss w.r.t. its
    kernel (so inputs and output gradients are the model's)."""
    from tfm_jax import data as data_lib
    from tfm_jax.tools.calibrate import calibration_batches
    from tfm_jax.train import build, input_mask, masked_ce_sum

    cfg, trained = run
    corpus = data_lib.load_corpus(str(text_corpus), cfg.data.val_fraction, cfg.data.cache_dir)
    batch = next(iter(calibration_batches(cfg, corpus, 1)))
    caps = qs.capture(cfg, trained.state, [batch])[0]
    setup = build(cfg, jax.devices()[:1])
    params = jax.device_get(trained.state.params)

    def loss(p):
        logits = setup.model.apply({"params": p}, batch["inputs"],
                                   token_mask=input_mask(jnp.asarray(batch["mask"])),
                                   train=False)
        return masked_ce_sum(logits, batch["targets"], batch["mask"]) / batch["mask"].sum()

    with setup.context():
        grads = jax.device_get(jax.grad(loss)(params))
    assert len(caps) == 14
    for proj, t in caps.items():
        g = grads
        for k in proj.split("/"):
            g = g[k]
        g = np.asarray(g["kernel"]).reshape(t["kernel"].shape)
        np.testing.assert_allclose(t["input"].T.astype(np.float64) @ t["output_grad"], g,
                                   rtol=2e-3, atol=1e-6 * np.abs(g).max())


@pytest.mark.slow   # 18 s: a study script end to end
def test_study_smoke(run, tmp_path, capsys):
    cfg, _ = run
    out = tmp_path / "study"
    res = qs.main(["--run-dir", str(cfg.run_dir), "--out", str(out), "--batches", "2",
                   "--ema-steps", "6", "--no-ppl"])
    printed = capsys.readouterr().out
    assert str(out / "results.md") in printed
    saved = json.loads((out / "results.json").read_text())
    assert saved["batches"] == 2 and len(saved["projections"]) == 14
    # what produced it: the commit (or None outside a checkout), machine, load, the command
    prov = saved["provenance"]
    assert set(prov["git"]) == {"commit", "dirty"} and prov["versions"]["jax"] == jax.__version__
    assert prov["load_start"] is not None and prov["load_end"] is not None
    assert prov["command"].startswith("python -m experiments.scripts.quant_study --run-dir")
    assert saved["scale"] == "d32 L2, 20 steps, byte-level"
    for name in ("snr_format_granularity", "snr_strategy", "per_channel_gain", "ema_beta",
                 "static_vs_dynamic_shift"):
        assert (out / f"{name}.png").stat().st_size > 1000
    md = (out / "results.md").read_text()
    assert "## Seed Ch2 claims" in md and "| ffn | kernel | int8 |" in md
    assert "Provenance: commit " in md or "Provenance: no git checkout" in md
    err = {(r["role"], r["format"], r["granularity"], r["strategy"]): r
           for r in res["errors"] if r["group"] == "all"}
    # sanity of the numbers: more bits, less error; finer granularity, no worse
    for role in qs.ROLES:
        e = lambda f, g="per_tensor": err[(role, f, g, "dynamic")]["snr_db"]  # noqa: E731
        assert e("int8") > e("int4") + 10
        assert e("float8_e4m3fn") > e("float8_e5m2")
        assert e("int8", "block32") >= e("int8") - 0.1
    # delayed kernels == dynamic (fixed weights); delayed inputs exist per tensor only
    assert err[("kernel", "int8", "per_channel", "delayed")]["snr_db"] == pytest.approx(
        err[("kernel", "int8", "per_channel", "dynamic")]["snr_db"])
    assert ("input", "int8", "per_channel", "delayed") not in err
    # static scaling saturates under a x64 shift, dynamic never does
    sh = {(r["format"], r["factor"], r["scaling"]): r for r in res["shift"]}
    assert sh[("float8_e4m3fn", 64, "static")]["saturated"] > 0.01
    assert sh[("float8_e4m3fn", 64, "dynamic")]["saturated"] == 0.0
    assert sh[("float8_e4m3fn", 1, "static")]["rel_err"] < 0.1


@pytest.mark.slow
def test_study_with_perplexity_table(run, tmp_path):
    cfg, _ = run
    res = qs.main(["--run-dir", str(cfg.run_dir), "--out", str(tmp_path / "s"), "--batches",
                   "3", "--ema-steps", "10", "--calib-batches", "4"])
    rows = res["ppl"]["rows"]
    assert set(rows) == {"fp32", *qs.PPL_ROWS}
    for name, r in rows.items():
        assert np.isfinite(r["val_ppl"]) and abs(r["ppl_delta_pct"]) < 20, (name, r)
