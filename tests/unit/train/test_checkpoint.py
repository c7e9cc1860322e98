"""Checkpointer: a shape mismatch is reported from the checkpoint's metadata, before any array is
read (a failing orbax restore leaves reader threads that print tracebacks at exit)."""

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
