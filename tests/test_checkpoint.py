"""Checkpointer: a shape mismatch is reported from the checkpoint's metadata, before any array is
read (a failing orbax restore leaves reader threads that print tracebacks at exit)."""

import jax
import jax.numpy as jnp
import pytest

from tfm_jax.checkpoint import CheckpointMismatch, Checkpointer


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
