"""tfm-jax quantize on a trained run: an int8 run evaluates and generates, int4 and asymmetric
runs, and the refusals."""

import json
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tfm_jax import cli
from tfm_jax.config import compose_config


# --------------------------------------------------------------------------------------------
# a trained run


@pytest.fixture(scope="module")
def source(tmp_path_factory, text_corpus):
    """A 2-layer d=64 run trained 60 steps on one CPU device (loss well below the unigram
    baseline, so quantization error shows in the perplexity)."""
    from tfm_jax.train import train

    tmp = tmp_path_factory.mktemp("ptq")
    cfg = compose_config("tiny", [{
        "model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2},
        "data": {"seq_len": 64, "path": str(text_corpus)},
        "train": {"batch_size": 8, "steps": 60, "warmup_steps": 5, "log_every": 20,
                  "eval_every": 60, "checkpoint_every": 60, "eval_batches": 4,
                  "sample_tokens": 0},
        "run": {"dir": str(tmp / "fp"), "tensorboard": False, "progress": False}}])
    res = train(cfg, devices=jax.devices()[:1])
    return cfg, res


def _ckpt_dtypes(run_dir: pathlib.Path, step: int) -> dict[str, str]:
    meta = ocp.StandardCheckpointHandler().metadata(run_dir / "checkpoints" / str(step) /
                                                    "default")
    leaves = jax.tree_util.tree_flatten_with_path(getattr(meta, "tree", meta))[0]
    return {jax.tree_util.keystr(p, simple=True, separator="/"): str(m.dtype) for p, m in leaves}


def test_int8_run_eval_generate(source, tmp_path, capsys):
    from tfm_jax.tools.quantize import quantize_run

    cfg, trained = source
    res = quantize_run(cfg.run_dir, "int8_weight", tmp_path / "int8",
                       devices=jax.devices()[:1])
    ev = res.eval
    assert ev["source"]["val_loss"] == pytest.approx(trained.eval["val_loss"], rel=1e-6)
    assert ev["source"]["val_loss"] < 2.5            # trained: well below ~3 nats uniform-ish
    assert 0 < abs(ev["ppl_delta_pct"]) < 2.0, ev    # per-channel int8: a small, nonzero change
    assert res.quantized_weight_bytes < 0.3 * res.weight_bytes

    dtypes = _ckpt_dtypes(res.out_dir, res.source_step)
    assert dtypes["params/layers_0/attn/q_proj/kernel/q"] == "int8"
    assert dtypes["params/layers_1/ffn/wo/kernel/scale"] == "float32"
    assert dtypes["params/lm_head/kernel"] == "float32"          # LM head kept
    assert dtypes["params/embed/embedding"] == "float32"
    assert not any(k.startswith("opt_state") for k in dtypes)

    info = json.loads((res.out_dir / "quantize.json").read_text())
    assert info["recipe"] == "int8_weight" and info["eval"]["ppl_delta_pct"] == pytest.approx(
        ev["ppl_delta_pct"])
    # the CLI (8 devices here) loads the quantized run, dequantized
    assert cli.main(["eval", "--run-dir", str(res.out_dir)]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["val_loss"] == pytest.approx(ev["quantized"]["val_loss"], rel=1e-5)
    assert cli.main(["generate", "--run-dir", str(res.out_dir), "--tokens", "8", "--prompt",
                     "def ", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("def ")


@pytest.mark.parametrize("recipe,code_dtype", [("int4_weight", "uint8"),
                                                ("int8_weight_asym", "uint8")])
def test_int4_and_asym_runs(source, tmp_path, recipe, code_dtype):
    from tfm_jax.tools.quantize import quantize_run, summary

    cfg, _ = source
    res = quantize_run(cfg.run_dir, recipe, tmp_path / recipe, devices=jax.devices()[:1])
    out = res.out_dir
    printed = summary(res)
    assert f"with {recipe}" in printed and "ppl" in printed and "smaller" in printed
    info = json.loads((out / "quantize.json").read_text())
    dtypes = _ckpt_dtypes(out, info["source_step"])
    assert dtypes["params/layers_0/attn/k_proj/kernel/q"] == code_dtype
    assert ("params/layers_0/attn/k_proj/kernel/zero_point" in dtypes) == (
        recipe == "int8_weight_asym")
    delta = info["eval"]["ppl_delta_pct"]
    assert np.isfinite(delta) and abs(delta) < (15.0 if recipe == "int4_weight" else 2.0)
    if recipe == "int4_weight":                       # two codes per byte
        assert info["quantized_weight_bytes"] < 0.2 * info["weight_bytes"]


def test_quantize_refusals(source, tmp_path, capsys):
    cfg, _ = source
    out = tmp_path / "q"
    assert cli.main(["quantize", "--run-dir", str(cfg.run_dir), "--recipe", "int8_weight",
                     "--out", str(out), "--no-eval"]) == 0
    printed = capsys.readouterr().out
    assert "with int8_weight" in printed and "smaller" in printed and "ppl" not in printed
    cases = [(["quantize", "--run-dir", str(out), "--recipe", "int4_weight"],
              "is already quantized (quant.recipe=int8_weight)"),
             (["quantize", "--run-dir", str(tmp_path / "missing"), "--recipe", "int8_weight"],
              "does not exist"),
             (["quantize", "--run-dir", str(cfg.run_dir), "--recipe", "int8_weight", "--out",
               str(out)], "already holds checkpoints"),
             (["train", "--config", str(out / "config.yaml"), "--resume"],
              "a quantized run cannot be trained or resumed"),
             (["train", "quant.recipe=int4_weight"], "weight-only post-training quantization")]
    for argv, msg in cases:
        assert cli.main(argv) == 2, argv
        assert msg in capsys.readouterr().err, argv
