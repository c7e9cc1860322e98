"""MoE end to end: a tiny MoE model's training loss falls."""

import numpy as np
import jax
import pytest

from tfm_jax.config import load_config
from tfm_jax.core import telemetry


def test_moe_training_loss_falls(devices, tmp_path):
    """A few all_to_all steps on one batch (data 2 x expert 4): expert-sharded parameters, the
    aux losses in the loss and the telemetry, the loss falls."""
    from tfm_jax import train as train_lib

    cfg = load_config("moe-tiny", [
        "model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1",
        "model.ffn_hidden=32", "data.seq_len=16", "train.batch_size=8", "train.steps=8",
        "train.warmup_steps=0", "train.lr=1e-2", f"run.dir={tmp_path}"])
    setup = train_lib.build(cfg, devices)
    state = setup.init_state()
    wo = state.params["layers_0"]["ffn"]["experts_wo"]["kernel"]
    assert wo.sharding.spec[0] == "expert"
    rng = np.random.default_rng(0)
    toks = rng.integers(0, 259, (8, 17))
    batch = setup.shard_batch({"inputs": toks[:, :-1].astype(np.int32),
                               "targets": toks[:, 1:].astype(np.int32),
                               "mask": np.ones((8, 16), np.float32)})
    losses = []
    with setup.context():
        for _ in range(8):
            state, m = setup.train_step(state, batch)
            losses.append(float(m["loss"]))
    tel = telemetry.flatten(jax.device_get(m["telemetry"]))
    assert {"layers_0/ffn/load_balance_loss", "layers_0/ffn/router_z_loss",
            "layers_0/ffn/moe/drop_fraction"} <= set(tel)
    assert tel["layers_0/ffn/load_balance_loss"] == pytest.approx(
        cfg.moe.aux_loss_coef * 1.0, rel=0.5)
    assert losses[-1] < losses[0] - 0.5, losses
