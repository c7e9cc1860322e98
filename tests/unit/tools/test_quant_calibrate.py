"""Static FP8 calibration and FP8 inference of a run trained without FP8
(tfm_jax.tools.calibrate, ``tfm-jax calibrate``, ``tfm-jax eval ... quant.recipe=fp8_*``):
scale reductions and delayed histories against numpy formulas; the calibration statistics of a
trained run against the fp32 model's own Linear inputs (hooked independently) and kernels; the
sharded (8 devices) statistics equal the single-device ones; delayed inference with filled
histories equals static inference with the max calibration of the same batches; refusals."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from tfm_jax import cli
from tfm_jax.config import ConfigError, compose_config
from tfm_jax.tools import calibrate as cal
from tfm_jax.quant import fp8

E4M3_MAX = 448.0


# --------------------------------------------------------------------------------------------
# pure functions


def _stats(inp, pct, kern):
    return cal.CalibrationStats({"p": np.asarray(inp, np.float64)},
                                {"p": np.asarray(pct, np.float64)},
                                {"p": np.asarray(kern, np.float64)}, 99.0,
                                [0.0] * len(inp))


def test_reduce_scales_against_numpy():
    amax = np.array([2.0, 5.0, 3.0, 4.0])
    pct = np.array([1.0, 2.0, 1.5, 1.5])
    st = _stats(amax, pct, 0.25)
    got = {m: cal.reduce_scales(st, m, ema_beta=0.9)["p"] for m in cal.METHODS}
    np.testing.assert_allclose(got["max"]["input_scale"], E4M3_MAX / 5.0, rtol=1e-6)
    np.testing.assert_allclose(got["percentile"]["input_scale"], E4M3_MAX / 1.5, rtol=1e-6)
    s = E4M3_MAX / 2.0                                    # the seed's EMA of the scale
    for a in amax[1:]:
        s = 0.9 * s + 0.1 * E4M3_MAX / a
    np.testing.assert_allclose(got["ema"]["input_scale"], s, rtol=1e-6)
    for m in cal.METHODS:                                 # kernels: always the exact amax
        np.testing.assert_allclose(got[m]["kernel_scale"], E4M3_MAX / 0.25, rtol=1e-6)
    # margin and another format
    m2 = cal.reduce_scales(st, "max", fmt="float8_e5m2", margin=2)["p"]["input_scale"]
    np.testing.assert_allclose(m2, 57344.0 / 5.0 / 4.0, rtol=1e-6)
    # per layer / per channel shapes pass through
    st2 = _stats(np.arange(1, 7, dtype=float).reshape(3, 2), np.ones((3, 2)),
                 np.full((1, 5), 2.0))
    r = cal.reduce_scales(st2, "max")["p"]
    np.testing.assert_allclose(r["input_scale"], E4M3_MAX / np.array([5.0, 6.0]), rtol=1e-6)
    assert r["kernel_scale"].shape == (1, 5)
    with pytest.raises(ConfigError, match="valid: max, percentile, ema"):
        cal.reduce_scales(st, "mean")
    with pytest.raises(ConfigError, match="ema-beta"):
        cal.reduce_scales(st, "ema", ema_beta=1.5)


@pytest.mark.parametrize("n,length", [(3, 5), (5, 5), (7, 4)])
def test_history_from_amaxes_layout(n, length):
    a = np.arange(1, n + 1, dtype=np.float32) * 1.5
    h = cal.history_from_amaxes(a, length)
    # reference: newest at index 0, then index -1 the one before, -2 before that, ...
    ref = np.zeros(length, np.float32)
    ref[0] = a[-1]
    for j in range(1, min(n, length)):
        ref[-j] = a[-1 - j]
    np.testing.assert_array_equal(h, ref)
    assert h.max() == a[-min(n, length):].max()


# --------------------------------------------------------------------------------------------
# a trained run


@pytest.fixture(scope="module")
def source(tmp_path_factory, text_corpus):
    """A 2-layer d=32 run trained 40 steps on one CPU device."""
    from tfm_jax.train import train

    tmp = tmp_path_factory.mktemp("calib")
    cfg = compose_config("tiny", [{
        "model": {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                  "multiple_of": 32},
        "data": {"seq_len": 32, "path": str(text_corpus)},
        "train": {"batch_size": 8, "steps": 40, "warmup_steps": 5, "log_every": 20,
                  "eval_every": 40, "checkpoint_every": 40, "eval_batches": 2,
                  "sample_tokens": 0},
        "run": {"dir": str(tmp / "fp"), "tensorboard": False, "progress": False}}])
    res = train(cfg, devices=jax.devices()[:1])
    return cfg, res


def _linear_inputs(cfg, params, batch):
    """Inputs of every quantizable Linear of the *fp32* model (intercepted at Linear, not at
    the FP8 dot), flattened to (tokens, in), by module path."""
    from tfm_jax.layers.linear import Linear
    from tfm_jax.train import build, input_mask

    setup = build(cfg, jax.devices()[:1])
    seen = {}

    def hook(next_fun, args, kwargs, context):
        m = context.module
        if isinstance(m, Linear) and m.quantized and context.method_name == "__call__":
            x = args[0]
            seen["/".join(m.path)] = np.asarray(x).reshape(-1, int(np.prod(
                x.shape[x.ndim - m.in_axes:])))
        return next_fun(*args, **kwargs)

    with setup.context(), nn.intercept_methods(hook):
        logits = setup.model.apply({"params": params}, batch["inputs"],
                                   token_mask=input_mask(batch["mask"]), train=False)
    return seen, np.asarray(logits)


def test_stats_match_the_fp32_model(source, text_corpus):
    from tfm_jax import data as data_lib
    from tfm_jax.train import masked_ce_sum

    cfg, trained = source
    corpus = data_lib.load_corpus(str(text_corpus), cfg.data.val_fraction, cfg.data.cache_dir)
    state = trained.state
    batches = list(cal.calibration_batches(cfg, corpus, 3))
    stats = cal.run_stats(cfg, state, 3, percentile=99.0, corpus=corpus,
                          devices=jax.devices()[:1])
    params = jax.device_get(state.params)
    assert len(stats.input_amax) == 2 * 7          # q k v o wi_0 wi_1 wo per layer
    for b, batch in enumerate(batches):
        xs, logits = _linear_inputs(cfg, params, batch)
        assert set(xs) == set(stats.input_amax)
        for proj, x in xs.items():
            np.testing.assert_allclose(stats.input_amax[proj][b], np.abs(x).max(), rtol=1e-6)
            np.testing.assert_allclose(stats.input_percentile[proj][b],
                                       np.percentile(np.abs(x), 99.0), rtol=1e-5)
        # the calibration forward is the fp32 forward: same mean loss
        ce = float(masked_ce_sum(logits, batch["targets"], batch["mask"]) / batch["mask"].sum())
        assert stats.losses[b] == pytest.approx(ce, rel=1e-5)
    k = params["layers_1"]["ffn"]["wo"]["kernel"]
    np.testing.assert_allclose(stats.kernel_amax["layers_1/ffn/wo"], np.abs(k).max(), rtol=0)
    # per-channel kernels: one amax per output column
    st_pc = cal.run_stats(cfg.replace(**{"quant.kernel_granularity": "per_channel"}), state, 1,
                          corpus=corpus, devices=jax.devices()[:1])
    kq = params["layers_0"]["attn"]["q_proj"]["kernel"]            # (d, H, Dh)
    np.testing.assert_allclose(st_pc.kernel_amax["layers_0/attn/q_proj"],
                               np.abs(kq.reshape(kq.shape[0], -1)).max(0, keepdims=True),
                               rtol=0)


@pytest.mark.slow   # 26 s: the CLI end to end; the stats and scale rules stay in the default suite
def test_calibrate_cli_eval_fp8_inference(source, tmp_path, capsys):
    cfg, trained = source
    run = str(cfg.run_dir)
    out = cfg.run_dir / "calibration-max.json"               # the default path
    # 8 devices (conftest): the sharded statistics equal the single-device ones
    assert cli.main(["calibrate", "--run-dir", run, "--batches", "3", "--method", "max"]) == 0
    printed = capsys.readouterr().out
    assert f"calibration file: {out}" in printed and "quant.recipe=fp8_static" in printed
    loaded = fp8.load_calibration(out)
    single = cal.calibrate_run(run, 3, "max", out=tmp_path / "one.json",
                               devices=jax.devices()[:1])
    assert set(loaded["scales"]) == set(single.scales)
    for proj, e in single.scales.items():
        for name, v in e.items():
            np.testing.assert_allclose(loaded["scales"][proj][name], v, rtol=1e-6)

    def ev(*extra):
        assert cli.main(["eval", "--run-dir", run, *extra]) == 0
        return json.loads(capsys.readouterr().out)

    base = trained.eval                                     # fp32, same validation batches
    static = ev("quant.recipe=fp8_static", f"quant.calibration={out}")
    delayed = ev("quant.recipe=fp8_delayed", "--calib-batches", "3")
    dynamic = ev("quant.recipe=fp8_dynamic")
    for r in (static, delayed, dynamic):
        assert r["val_loss"] != pytest.approx(base["val_loss"], rel=1e-7)  # FP8 did something
        assert abs(r["val_ppl"] / base["val_ppl"] - 1) < 0.02, (r, base)
    assert static["quant_recipe"] == "fp8_static"
    # delayed with histories of the same 3 batches == static with their max calibration
    assert delayed["val_loss"] == pytest.approx(static["val_loss"], rel=1e-6)


@pytest.mark.slow
def test_generate_fp8_inference(source, capsys):
    """Greedy FP8 generation (fp8_dynamic, through the KV cache) equals the argmax of the full
    FP8 forward, token by token."""
    from tfm_jax.data import ByteTokenizer

    cfg, _ = source
    assert cli.main(["generate", "--run-dir", str(cfg.run_dir), "--tokens", "4", "--prompt",
                     "def ", "--temperature", "0", "--json", "quant.recipe=fp8_dynamic"]) == 0
    row = json.loads(capsys.readouterr().out)["completions"][0]
    fcfg = cfg.replace(**{"quant.recipe": "fp8_dynamic"})
    setup, state = cal.restore_with_recipe(fcfg, devices=jax.devices()[:1])
    tok = ByteTokenizer()
    ids = [tok.EOS_ID] + list(tok.encode("def "))
    variables = {"params": state.params, **state.model_state}
    for _ in range(row["new_tokens"]):
        with setup.context():
            logits = setup.model.apply(variables, jnp.asarray([ids], jnp.int32))
        ids.append(int(np.argmax(np.asarray(logits)[0, -1])))
    assert row["text"] == tok.decode(ids), (row, ids)


def test_delayed_state_holds_the_history(source, tmp_path):
    cfg, _ = source
    dcfg = cfg.replace(**{"quant.recipe": "fp8_delayed", "quant.amax_history": 4})
    setup, state = cal.restore_with_recipe(dcfg, calib_batches=6, devices=jax.devices()[:1])
    stats = cal.run_stats(cfg, state, 6, devices=jax.devices()[:1])
    st = jax.device_get(state.params["layers_0"]["attn"]["k_proj"]["fp8"])
    a = stats.input_amax["layers_0/attn/k_proj"]
    np.testing.assert_array_equal(st["input_amax_history"],
                                  cal.history_from_amaxes(a, 4))      # the last 4 batches
    np.testing.assert_allclose(st["input_scale"], E4M3_MAX / a[-4:].max(), rtol=1e-6)
    np.testing.assert_allclose(st["kernel_scale"], E4M3_MAX / stats.kernel_amax[
        "layers_0/attn/k_proj"], rtol=1e-6)
    assert not st["output_grad_amax_history"].any()


@pytest.mark.slow
def test_fp8_trained_run(source, tmp_path, capsys):
    """A run trained with fp8_delayed: calibrate says what happens and eval under fp8_static
    replaces its delayed state by the file's scales."""
    from tfm_jax.train import train

    cfg, _ = source
    fcfg = cfg.replace(**{"quant.recipe": "fp8_delayed", "train.steps": 4,
                          "train.warmup_steps": 2,
                          "train.checkpoint_every": 4, "train.eval_every": 4,
                          "run.dir": str(tmp_path / "f8")})
    train(fcfg, devices=jax.devices()[:1])
    out = tmp_path / "f8.json"
    assert cli.main(["calibrate", "--run-dir", str(fcfg.run_dir), "--batches", "2",
                     "--method", "percentile", "--out", str(out)]) == 0
    assert "was trained with quant.recipe=fp8_delayed" in capsys.readouterr().out
    assert cli.main(["eval", "--run-dir", str(fcfg.run_dir)]) == 0
    own = json.loads(capsys.readouterr().out)
    assert cli.main(["eval", "--run-dir", str(fcfg.run_dir), "quant.recipe=fp8_static",
                     f"quant.calibration={out}"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert np.isfinite(st["val_loss"]) and st["val_loss"] != own["val_loss"]


def test_calibrate_refusals(source, tmp_path, capsys):
    cfg, _ = source
    run = str(cfg.run_dir)
    cases = [(["--run-dir", str(tmp_path / "nope"), "--batches", "2", "--method", "max"],
              "does not exist"),
             (["--run-dir", run, "--batches", "0", "--method", "max"], "at least 1 batch"),
             (["--run-dir", run, "--batches", "2", "--method", "mean"],
              "valid: max, percentile, ema"),
             (["--run-dir", run, "--batches", "2", "--method", "percentile", "--percentile",
               "0"], "percentile in (0, 100]"),
             (["--run-dir", run, "--batches", "2", "--method", "max", "model.d_model=64"],
              "only quant.* keys"),
             (["--run-dir", run, "--batches", "2", "--method", "max",
               "quant.recipe=fp8_static"], "only quant.* keys")]
    for argv, msg in cases:
        assert cli.main(["calibrate", *argv]) == 2, argv
        assert msg in capsys.readouterr().err, argv
    assert cli.main(["eval", "--run-dir", run, "quant.recipe=fp8_delayed",
                     "--calib-batches", "0"]) == 2
    assert "at least 1 batch" in capsys.readouterr().err
    assert cli.main(["eval", "--run-dir", run, "quant.recipe=fp8_static"]) == 2
    assert "needs quant.calibration" in capsys.readouterr().err
    assert cli.main(["eval", "--run-dir", run, "quant.recipe=fp8_static",
                     f"quant.calibration={tmp_path / 'missing.json'}"]) == 2
    assert "no such file" in capsys.readouterr().err
