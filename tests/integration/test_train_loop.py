"""The training loop end to end: loss falls below the unigram baseline, exact resume, a run
directory is never silently reused, non-finite stop/skip logging, checkpoint atomicity and a
process killed during an async save."""

import os
import signal

import chex
import jax
import numpy as np
import pytest

from tfm_jax import data as data_lib
from tfm_jax.train.checkpoint import Checkpointer
from tfm_jax.config import load_config
from train_support import SMALL, params_np, poison, small_cfg
from tfm_jax.train.metrics import read_metrics
from tfm_jax.train import Interrupted, NonFiniteError, build, train

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return data_lib.load_corpus(None, 0.05, str(tmp_path_factory.mktemp("cache")))


def test_loss_falls_below_unigram_baseline(tmp_path, corpus):
    cfg = load_config(None, [f"run.dir={tmp_path}", "train.steps=100", "train.warmup_steps=10",
                             "train.eval_every=100", "train.checkpoint_every=100",
                             "train.sample_tokens=0", "run.progress=false", "mesh.data=1"])
    res = train(cfg, corpus=corpus, devices=jax.devices()[:1])
    rows = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    assert res.eval["val_loss"] < res.unigram_baseline - 0.3, (res.eval, res.unigram_baseline)
    assert all(r["tokens_per_s"] > 0 for r in rows)
    assert (tmp_path / "events").is_dir() and any((tmp_path / "events").iterdir())


@pytest.mark.parametrize("extra", [[], ["model.norm=batchnorm", "train.grad_accum=2", "train.batch_size=16",
                                        "model.scan_layers=true"]])
def test_resume_is_bitwise_identical(tmp_path, corpus, extra, devices, capsys):
    common = ["train.steps=10", "train.checkpoint_every=4", "train.eval_every=5",
              "mesh.data=2"] + extra
    run = lambda name, **kw: train(small_cfg(tmp_path / name, *common), corpus=corpus,  # noqa
                                   devices=devices[:2], **kw)
    full = run("full")

    def interrupt_at_6(step):
        if step == 6:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted) as err:
        run("cut", step_hook=interrupt_at_6)
    assert err.value.signum == signal.SIGINT and "step 6" in str(err.value)
    assert Checkpointer(tmp_path / "cut" / "checkpoints").latest_step() == 6
    capsys.readouterr()
    resumed = run("cut", resume=True)
    assert "resumed from step 6 of 10" in capsys.readouterr().out

    chex.assert_trees_all_equal(params_np(full.state), params_np(resumed.state))
    chex.assert_trees_all_equal(jax.device_get(full.state.model_state),
                                jax.device_get(resumed.state.model_state))
    chex.assert_trees_all_equal(jax.device_get(full.state.opt_state),
                                jax.device_get(resumed.state.opt_state))
    a = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "full") if "loss" in r]
    b = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "cut") if "loss" in r]
    assert a == b   # same losses, logged once per step, no duplicates after resume
    assert full.eval == resumed.eval
    # one "final train loss": the last train row of metrics.jsonl, for both runs
    assert full.last_loss == resumed.last_loss == a[-1][1] and full.last_loss_step == 10


def test_existing_run_needs_resume(tmp_path, corpus):
    cfg = small_cfg(tmp_path, "train.steps=2", "train.checkpoint_every=2", "mesh.data=1")
    train(cfg, corpus=corpus, devices=jax.devices()[:1])
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg, corpus=corpus, devices=jax.devices()[:1])


def test_nonfinite_stop_names_step_and_layer(tmp_path, corpus, monkeypatch):
    import tfm_jax.train as train_mod

    orig = train_mod.Setup.init_state
    monkeypatch.setattr(train_mod.Setup, "init_state",
                        lambda self: poison(self, orig(self)))
    with pytest.raises(NonFiniteError) as err:
        train(small_cfg(tmp_path, "train.steps=4", "mesh.data=1"), corpus=corpus,
              devices=jax.devices()[:1])
    msg = str(err.value)
    assert "step 1" in msg and "layers_1/ffn/wo/kernel" in msg, msg
    assert Checkpointer(tmp_path / "checkpoints").latest_step() is None   # nothing bad saved


def test_skip_mode_logs_every_window_with_skipped_count(tmp_path, corpus, monkeypatch, capsys):
    """28 of 30 steps non-finite (their batches' masks are NaN, so loss and gradients are):
    a train row still comes at every log step with the cumulative `skipped` count and the mean
    loss of the window's finite steps (null if none); the console says it once per window."""
    good = {5, 20}                          # 1-based steps with a finite loss
    orig = data_lib.train_batch

    def batch_with_nan(*args, step, **kw):
        b = orig(*args, step=step, **kw)
        if step + 1 not in good:
            b["mask"] = np.full_like(b["mask"], np.nan)
        return b

    monkeypatch.setattr(data_lib, "train_batch", batch_with_nan)
    res = train(small_cfg(tmp_path, "mesh.data=1", "train.on_nonfinite=skip", "train.steps=30",
                          "train.log_every=10", "train.eval_every=30",
                          "train.checkpoint_every=30"),
                corpus=corpus, devices=jax.devices()[:1])
    rows = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert [(r["step"], r["skipped"]) for r in rows] == [(10, 9), (20, 18), (30, 28)]
    assert rows[0]["loss"] > 0 and rows[1]["loss"] > 0 and rows[2]["loss"] is None
    assert res.skipped_steps == 28 and res.last_loss_step == 20
    assert res.last_loss == rows[1]["loss"]           # the window's only finite step
    out = [line for line in capsys.readouterr().out.splitlines() if "skipped" in line]
    assert len(out) == 4, out                          # not one line per skipped step
    assert out[0].startswith("non-finite loss/gradients at step 1:")
    assert out[1:] == [f"step {s}: {k} step(s) skipped (non-finite) in this log window, "
                       f"{n} in all" for s, k, n in [(10, 9, 9), (20, 9, 18), (30, 10, 28)]]


def test_partial_checkpoint_is_never_restored(tmp_path, corpus, devices):
    """A save that crashed leaves orbax's tmp folder; it must be invisible to restore."""
    cfg = small_cfg(tmp_path, "mesh.data=1", "train.steps=4", "train.checkpoint_every=2")
    train(cfg, corpus=corpus, devices=devices[:1])
    ckdir = tmp_path / "checkpoints"
    (ckdir / "6.orbax-checkpoint-tmp-1234").mkdir()
    (ckdir / "6.orbax-checkpoint-tmp-1234" / "junk").write_text("half-written")
    ck = Checkpointer(ckdir)
    assert ck.latest_step() == 4
    setup = build(cfg, devices=devices[:1])
    restored = ck.restore(setup.abstract_state())
    assert int(restored.step) == 4
    ck.close()


def test_process_killed_during_async_save_resumes_exactly(tmp_path, corpus, devices):
    """A real crash: the process exits while orbax writes step 4 in the background. Whatever
    is on disk must restore correctly, and resuming must end bitwise where an uninterrupted
    run ends."""
    import pathlib
    import subprocess
    import sys

    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"def g{i}(a):\n    return a + {i % 9}\n\n" for i in range(3000)))
    common = SMALL + ["train.steps=6", "train.checkpoint_every=2", "train.eval_every=6",
                      "mesh.data=1", f"data.path={text}", f"data.cache_dir={tmp_path / 'c'}"]
    worker = pathlib.Path(__file__).with_name("crash_worker.py")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, str(worker), "4", *common,
                           f"run.dir={tmp_path / 'crash'}"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 17, proc.stderr[-2000:]
    ck = Checkpointer(tmp_path / "crash" / "checkpoints")
    assert ck.latest_step() in (2, 4)
    ck.close()
    resumed = train(load_config(None, common + [f"run.dir={tmp_path / 'crash'}"]),
                    resume=True, devices=devices[:1])
    full = train(load_config(None, common + [f"run.dir={tmp_path / 'full'}"]),
                 devices=devices[:1])
    chex.assert_trees_all_equal(params_np(full.state), params_np(resumed.state))


def test_final_train_loss_is_the_last_logged_window(tmp_path, corpus):
    """The result's train loss (what the finish line prints) is the mean over the last log
    window -- metrics.jsonl's last train row -- not the last step's own loss."""
    res = train(small_cfg(tmp_path, "mesh.data=1", "train.steps=4", "train.log_every=2",
                          "train.eval_every=4", "train.checkpoint_every=4"),
                corpus=corpus, devices=jax.devices()[:1])
    rows = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert [r["step"] for r in rows] == [2, 4]
    assert res.last_loss == rows[-1]["loss"] and res.last_loss_step == 4
