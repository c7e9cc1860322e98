"""A damaged checkpoint (a truncated data file) through the commands: ``eval`` says which step
folder is damaged and why in one line and evaluates the newest intact step (``--step`` picks
one); ``train --resume`` continues from that step, keeps the damaged folder as
``<step>.damaged`` and ends where an uninterrupted run ends."""

import json
import shutil

import numpy as np
import pytest

from tfm_jax import cli
from tfm_jax.train.metrics import read_metrics


def _truncate_data(step_dir):
    for p in step_dir.rglob("*"):
        if p.is_file() and "/d/" in p.as_posix():
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, text_corpus):
    run = tmp_path_factory.mktemp("run")
    common = [f"data.path={text_corpus}", "model.d_model=32", "model.n_layers=2",
              "model.n_heads=2", "model.n_kv_heads=1", "model.ffn_hidden=64",
              "data.seq_len=32", "train.batch_size=8", "train.steps=4",
              "train.checkpoint_every=2", "train.eval_every=4", "train.keep_checkpoints=3",
              "train.sample_tokens=0", "train.log_every=1", "train.eval_batches=2",
              "run.progress=false", "mesh.data=-1"]
    assert cli.main(["train", *common, f"run.dir={run}"]) == 0
    return run, common


def test_eval_and_resume_past_a_damaged_step(trained, tmp_path, capsys):
    src, common = trained
    run = tmp_path / "run"
    shutil.copytree(src, run)
    _truncate_data(run / "checkpoints" / "4")
    capsys.readouterr()
    assert cli.main(["eval", "--run-dir", str(run)]) == 0
    out = capsys.readouterr()
    lines = [ln for ln in out.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and f"{run}/checkpoints/4 is damaged" in lines[0], out.err
    assert "restored step 2" in lines[0]
    assert json.loads(out.out[out.out.index("{"):])["step"] == 2
    # --step names a step: the damaged one is an error of one line, exit 2
    assert cli.main(["eval", "--run-dir", str(run), "--step", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoints/4 is damaged" in err[0]
    # --resume continues from step 2, sets the damaged folder aside, ends like the original
    assert cli.main(["train", "--resume", *common, f"run.dir={run}"]) == 0
    out = capsys.readouterr().out
    assert "resumed from step 2 of 4" in out and "checkpoints/4.damaged" in out
    assert (run / "checkpoints" / "4.damaged").is_dir() and (run / "checkpoints" / "4").is_dir()
    a = [(r["step"], r["loss"]) for r in read_metrics(src) if "loss" in r]
    b = [(r["step"], r["loss"]) for r in read_metrics(run) if "loss" in r]
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4]
    np.testing.assert_allclose([x for _, x in b], [x for _, x in a], rtol=1e-6)
