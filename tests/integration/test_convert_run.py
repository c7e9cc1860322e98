"""tfm-jax convert on a trained run: the identity conversion, MHA -> GQA then eval and resume,
and the refusals."""

import json

import numpy as np
import pytest

from tfm_jax import cli
from tfm_jax.config import compose_config
from tfm_jax.tools.convert import convert_run


# ----------------------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A trained 4-head MHA run with scanned layers (2 layers), trained on one CPU device
    (``mesh.data=-1``: the CLI commands below use all 8)."""
    import jax

    from tfm_jax.train import train

    tmp = tmp_path_factory.mktemp("convert")
    corpus = tmp / "corpus.txt"
    corpus.write_text("".join(f"def f{i}(x):\n    return x + {i}\n\n" for i in range(2000)))
    cfg = compose_config("tiny", [{
        "model": {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4,
                  "scan_layers": True},
        "data": {"seq_len": 32, "path": str(corpus)},
        "train": {"batch_size": 8, "steps": 4, "warmup_steps": 1, "log_every": 2,
                  "eval_every": 4, "checkpoint_every": 4, "eval_batches": 2, "sample_tokens": 0},
        "run": {"dir": str(tmp / "mha"), "tensorboard": False, "progress": False}}])
    res = train(cfg, devices=jax.devices()[:1])
    return cfg, res


def _params(run_dir):
    import jax

    from tfm_jax.train.checkpoint import Checkpointer
    from tfm_jax.tools.convert import load_run_config
    from tfm_jax.train import build

    cfg = load_run_config(run_dir)
    setup = build(cfg, jax.devices()[:1])
    ck = Checkpointer(cfg.run_dir / "checkpoints")
    try:
        state = ck.restore(setup.abstract_state())
    finally:
        ck.close()
    return cfg, jax.device_get(state)


def test_identity_conversion(source, tmp_path):
    import jax

    cfg, res = source
    out = convert_run(cfg.run_dir, 4, tmp_path / "same", devices=jax.devices()[:1])
    assert out.source_step == 4 and out.config.train.steps == 1      # 5 % of 4, at least 1
    new_cfg, state = _params(out.out_dir)
    assert int(state.step) == 0
    src = jax.device_get(res.state.params)
    for a, b in zip(jax.tree.leaves(src), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(a, b)
    assert out.eval["val_loss"] == res.eval["val_loss"]               # same model, same loss
    # fresh optimizer state: zero Adam moments
    assert all(not np.any(x) for x in jax.tree.leaves(state.opt_state)
               if getattr(x, "ndim", 0) > 0)


def test_convert_to_gqa_then_eval_and_resume(source, tmp_path, capsys):
    import jax

    from tfm_jax.train import train

    cfg, res = source
    out_dir = tmp_path / "gqa2"
    # the CLI builds on all 8 test devices (the run was trained on one: restore reshards)
    assert cli.main(["convert", "--run-dir", str(cfg.run_dir), "--kv-heads", "2", "--out",
                     str(out_dir), "--steps", "2"]) == 0
    printed = capsys.readouterr().out
    new_cfg, state = _params(out_dir)
    assert new_cfg.model.n_kv_heads == 2 and new_cfg.train.steps == 2
    assert "right after conversion: val loss" in printed
    src = jax.device_get(res.state.params)
    for name in ("k_proj", "v_proj"):
        k_src = np.asarray(src["layers"]["attn"][name]["kernel"])         # (L, d, 4, Dh)
        k_new = np.asarray(state.params["layers"]["attn"][name]["kernel"])
        assert k_src.shape == (2, 32, 4, 8) and k_new.shape == (2, 32, 2, 8)
        # new head j = mean of old heads 2j, 2j + 1 (contiguous groups), in float64
        ref = k_src.astype(np.float64).reshape(2, 32, 2, 2, 8).mean(axis=3)
        np.testing.assert_allclose(k_new, ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(state.params["layers"]["attn"]["q_proj"]["kernel"],
                                  src["layers"]["attn"]["q_proj"]["kernel"])
    info = json.loads((out_dir / "convert.json").read_text())
    assert info["source_step"] == 4 and info["n_kv_heads"] == 2 and info["checkpoint_step"] == 0

    assert cli.main(["eval", "--run-dir", str(out_dir)]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["step"] == 0 and ev["val_loss"] == pytest.approx(info["eval"]["val_loss"])

    resumed = train(new_cfg, resume=True, devices=jax.devices()[:1])
    assert resumed.final_step == 2 and np.isfinite(resumed.last_loss)


def test_convert_errors(source, tmp_path, capsys):
    cfg, _ = source
    assert cli.main(["convert", "--run-dir", str(cfg.run_dir), "--kv-heads", "3"]) == 2
    assert "must divide the source run's model.n_kv_heads=4" in capsys.readouterr().err
    assert cli.main(["convert", "--run-dir", str(tmp_path), "--kv-heads", "2"]) == 2
    assert "no config.yaml" in capsys.readouterr().err


def test_convert_refuses_quantized_runs(source, tmp_path, capsys):
    # an FP8-trained (and FP8-stored) run: refused before anything is built, naming the recipe
    cfg, _ = source
    fp8 = cfg.replace(**{"quant.recipe": "fp8_delayed", "quant.fp8_weight_storage": True,
                         "run.dir": str(tmp_path / "fp8")})
    fp8.run_dir.mkdir()
    (fp8.run_dir / "config.yaml").write_text(fp8.to_yaml())
    assert cli.main(["convert", "--run-dir", str(fp8.run_dir), "--kv-heads", "2"]) == 2
    err = capsys.readouterr().err
    assert "quant.recipe=fp8_delayed with FP8 weight storage" in err
    assert "Convert a run trained with quant.recipe=none" in err and "Traceback" not in err
    assert not (tmp_path / "fp8-kv2").exists()
