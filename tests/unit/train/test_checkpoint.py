"""Checkpointer: a shape mismatch is reported from the checkpoint's metadata, before any array is
read (a failing orbax restore leaves reader threads that print tracebacks at exit)."""

import os

import jax
import jax.numpy as jnp
import pytest

from tfm_jax.train.checkpoint import CheckpointMismatch, Checkpointer


def test_mismatch_named_from_metadata_without_reading(tmp_path, monkeypatch):
    state = {"params": {"w": jnp.ones((3, 4)), "b": jnp.zeros((4,))}, "step": jnp.zeros((), jnp.int32)}
    ck = Checkpointer(tmp_path / "ck", async_save=False)
    ck.save(1, state)
    ck.wait()
    wrong = {"params": {"w": jax.ShapeDtypeStruct((3, 8), jnp.float32),
                        "extra": jax.ShapeDtypeStruct((2,), jnp.float32)},
             "step": jax.ShapeDtypeStruct((), jnp.int32)}
    monkeypatch.setattr(type(ck.manager), "restore",
                        lambda *a, **k: pytest.fail("restore ran despite a known mismatch"))
    with pytest.raises(CheckpointMismatch) as err:
        ck.restore(wrong)
    msg = str(err.value)
    assert "params/w: checkpoint (3, 4), configured (3, 8)" in msg
    assert "params/extra: not in the checkpoint" in msg
    assert "params/b: in the checkpoint, not in the configured model" in msg
    monkeypatch.undo()
    right = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    restored = ck.restore(right)
    assert float(restored["params"]["w"].sum()) == 12.0
    ck.close()


def test_interrupted_save_is_cleaned_before_the_manager_is_used(tmp_path):
    """A crash mid-save leaves ``<step>.orbax-checkpoint-tmp``; orbax removes it in a background
    thread. Checkpointer waits for that removal, so a second Checkpointer on the same directory
    (as in a probe, then the resumed run) never removes the same folder concurrently (a CI
    failure: FileNotFoundError inside orbax's rmtree)."""
    state = {"w": jnp.arange(4.0)}
    first = Checkpointer(tmp_path / "ck", async_save=False)
    first.save(2, state)
    first.close()
    tmp = tmp_path / "ck" / "4.orbax-checkpoint-tmp"
    for i in range(300):                     # a folder that takes a moment to remove
        (tmp / f"d{i % 30}").mkdir(parents=True, exist_ok=True)
        (tmp / f"d{i % 30}" / f"f{i}").write_bytes(b"x" * 64)
    probe = Checkpointer(tmp_path / "ck")
    assert probe.latest_step() == 2
    assert not tmp.exists()                  # removed before the manager was handed out
    probe.close()
    run = Checkpointer(tmp_path / "ck")
    assert run.latest_step() == 2
    run.save(4, state)
    run.close()
    assert Checkpointer(tmp_path / "ck").all_steps() == [2, 4]


def _two_steps(tmp_path):
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=5, async_save=False)
    for step in (1, 2):
        ckpt.save(step, {"w": jnp.full((64, 64), float(step)), "b": jnp.arange(8.0) + step})
    ckpt.wait()
    ckpt.close()
    return tmp_path / "checkpoints"


def _truncate_data(step_dir):
    files = [p for p in step_dir.rglob("*") if p.is_file() and "/d/" in p.as_posix()]
    assert files
    for p in files:
        os.truncate(p, p.stat().st_size // 2)


ABSTRACT = {"w": jax.ShapeDtypeStruct((64, 64), jnp.float32),
            "b": jax.ShapeDtypeStruct((8,), jnp.float32)}


@pytest.mark.parametrize("damage", ["data", "metadata"])
def test_damaged_step_falls_back_to_the_newest_intact_one(tmp_path, damage):
    """A truncated data file or _METADATA in the newest step: the latest-step restore says so
    in one line (naming the step folder and the cause) and restores the step before; the
    damaged folder is left in place; asking for it by number raises CheckpointDamaged; with
    every step damaged the error names them all."""
    from tfm_jax.core.errors import CheckpointDamaged

    root = _two_steps(tmp_path)
    if damage == "data":
        _truncate_data(root / "2")
    else:
        (root / "2" / "default" / "_METADATA").write_text("")
    said = []
    ckpt = Checkpointer(root, read_only=True)
    state = ckpt.restore(ABSTRACT, say=said.append)
    assert float(state["w"][0, 0]) == 1.0 and ckpt.restored_step == 1
    assert ckpt.damaged_steps == [2] and len(said) == 1 and "\n" not in said[0]
    assert f"{root}/2 is damaged" in said[0] and "restored step 1" in said[0]
    assert (root / "2").is_dir()                                   # nothing deleted
    with pytest.raises(CheckpointDamaged, match=f"{root}/2 is damaged"):
        ckpt.restore(ABSTRACT, step=2)
    _truncate_data(root / "1")
    with pytest.raises(CheckpointDamaged, match="no intact checkpoint.*/2 is damaged.*/1 is "
                                                "damaged"):
        ckpt.restore(ABSTRACT)
    ckpt.close()


def test_logger_off_a_terminal_prints_each_row_once(tmp_path, capsys):
    """In a log file (stdout/stderr not a terminal) there is no progress bar to redraw: each
    train row is one line with that row's own window loss, each eval row one line."""
    from tfm_jax.train.metrics import MetricsLogger

    log = MetricsLogger(tmp_path, tensorboard=False, progress=True, total_steps=4)
    log.log(2, {"loss": 1.5, "tokens_per_s": 100.0, "mfu": None})
    log.log(4, {"loss": 1.25, "tokens_per_s": 120.0, "mfu": 0.5})
    log.log(4, {"val_loss": 1.0}, kind="eval")
    log.close()
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["step 2/4: loss 1.5000, tok/s 100",
                                         "step 4/4: loss 1.2500, tok/s 120, mfu 50.0%",
                                         "step 4: val_loss 1.0000"]
    assert "train:" not in captured.err                     # no bar redraws


def test_params_only_checkpoint_restores_with_a_fresh_optimizer(tmp_path):
    """``save(optimizer=False)`` (what import-hf writes) stores no optimizer leaves; a plain
    restore returns ``opt_state`` None, ``Setup.restore`` builds the fresh optimizer state --
    equal to the one a new run starts with -- so training from it takes the same steps as
    training from the state it was saved from; a different model is still refused by name."""
    import numpy as np
    import optax
    import orbax.checkpoint as ocp

    from tfm_jax.config import load_config
    from tfm_jax.train import build
    from tfm_jax.train.checkpoint import _shapes

    base = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
            "model.ffn_hidden=64", "model.vocab_size=64", "data.tokenizer=none",
            "data.seq_len=16", "train.batch_size=2", "train.warmup_steps=0", "mesh.data=1"]
    setup = build(load_config(None, base), jax.devices()[:1])
    state = setup.init_state()
    ck = Checkpointer(tmp_path / "ck", async_save=False)
    ck.save(0, state, optimizer=False)
    ck.wait()
    meta = ocp.StandardCheckpointHandler().metadata(tmp_path / "ck" / "0" / "default")
    saved = _shapes(getattr(meta, "tree", meta))
    assert saved and not [k for k in saved if k.startswith("opt_state")]

    plain = ck.restore(setup.abstract_state())
    assert plain.opt_state is None and ck.fresh_optimizer
    restored = setup.restore(ck)
    assert ck.fresh_optimizer
    fresh, orig = jax.tree.leaves(restored.opt_state), jax.tree.leaves(state.opt_state)
    assert len(fresh) == len(orig) > 0
    for a, b in zip(fresh, orig):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree.structure(restored.opt_state, is_leaf=lambda x: isinstance(
        x, optax.MaskedNode)) == jax.tree.structure(state.opt_state, is_leaf=lambda x: isinstance(
            x, optax.MaskedNode))

    rng = np.random.default_rng(0)
    batch = {"inputs": rng.integers(0, 64, (2, 16), np.int32),
             "targets": rng.integers(0, 64, (2, 16), np.int32),
             "mask": np.ones((2, 16), np.float32)}
    losses = []
    for s in (restored, jax.tree.map(jnp.copy, state)):
        with setup.context():
            for _ in range(2):
                s, m = setup.train_step(s, setup.shard_batch(batch))
        losses.append(float(m["loss"]))
    assert losses[0] == losses[1]

    wider = build(load_config(None, base[1:] + ["model.d_model=64"]), jax.devices()[:1])
    with pytest.raises(CheckpointMismatch, match="params/"):
        wider.restore(ck)
    ck.close()
