"""FP8 training end to end: gradient accumulation gives the whole batch's delayed-scaling state
bit for bit, and an fp8_delayed run's loss falls while it logs telemetry."""

import jax
import numpy as np
import pytest

from tfm_jax import data as data_lib
from tfm_jax.train.metrics import read_metrics
from tfm_jax.train import build, train

from fp8_support import batch_at, cfg_of, quant_leaves


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return data_lib.load_corpus(None, 0.05, str(tmp_path_factory.mktemp("cache")))


@pytest.mark.parametrize("scan,granularity", [
    (False, "per_tensor"), (False, "per_channel"),
    pytest.param(True, "per_tensor", marks=pytest.mark.slow)])
def test_grad_accum_4_gives_the_whole_batch_scales(tmp_path, corpus, devices, scan,
                                                    granularity):
    """Two steps with train.grad_accum=4 end with the whole batch's fp8 state -- the max over
    micro-batches, not the sum (which would be ~4x off); per-channel kernel scales (one per
    output column) as well. Equal to float32 rounding (rtol 1e-6), not bit for bit: the amaxes
    of a quarter of the batch come out of a backward pass that XLA:CPU may compute in another
    float order for another batch shape (bitwise on jax 0.10.2, one ulp off on 0.12.1)."""
    extra = ["mesh.data=1", f"model.scan_layers={str(scan).lower()}", "quant.telemetry=true",
             f"quant.kernel_granularity={granularity}"]
    one = build(cfg_of(tmp_path, *extra), devices=devices[:1])
    four = build(cfg_of(tmp_path, *extra, "train.grad_accum=4"), devices=devices[:1])
    sa, sb = one.init_state(), four.init_state()
    for step in range(2):
        batch = one.shard_batch(batch_at(one.cfg, corpus, step))
        with one.context():
            sa, ma = one.train_step(sa, batch)
        with four.context():
            sb, mb = four.train_step(sb, batch)
        np.testing.assert_allclose(float(ma["loss"]), float(mb["loss"]), rtol=1e-5)
    qa, qb = quant_leaves(sa.params), quant_leaves(sb.params)
    assert qa and qa.keys() == qb.keys()
    for k in qa:
        if k.endswith("output_grad_stats"):
            # telemetry fractions: the max over the micro-batches, which bounds the whole
            # batch's fraction (a weighted mean of the micro-batches' at the same scale)
            assert np.all(qb[k] >= qa[k] - 1e-7), (k, qa[k], qb[k])
            continue
        np.testing.assert_allclose(qb[k], qa[k], rtol=1e-6, atol=0, err_msg=k)
    assert any(k.endswith("output_grad_stats") for k in qa)
    # a sum over the 4 micro-batches would have given 4x the amaxes
    hist = [v for k, v in qa.items() if k.endswith("input_amax_history")][0]
    assert np.max(hist) > 0
    if not scan:
        ks = qa["layers_0/ffn/wo/fp8/kernel_scale"]
        n_out = sa.params["layers_0"]["ffn"]["wo"]["kernel"].shape[1]
        if granularity == "per_channel":     # one scale per output column, distinct values
            assert ks.shape == (1, n_out) and np.unique(ks).size > 1
            assert qa["layers_0/ffn/wo/fp8/kernel_amax_history"].shape == (4, 1, n_out)
        else:
            assert ks.shape == ()
    # telemetry came back reduced over micro-batches, same keys as the whole batch
    assert jax.tree.structure(ma["telemetry"]) == jax.tree.structure(mb["telemetry"])


def test_fp8_delayed_training_loss_falls_and_logs_telemetry(tmp_path, corpus, devices,
                                                            capsys):
    cfg = cfg_of(tmp_path, "mesh.data=1", "train.steps=40", "train.log_every=5",
                 "train.eval_every=40", "train.checkpoint_every=40", "train.lr=3e-3",
                 "quant.telemetry=true")
    res = train(cfg, corpus=corpus, devices=devices[:1])
    rows = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5, (rows[0]["loss"], rows[-1]["loss"])
    out = capsys.readouterr().out
    assert "fp8: emulated" in out and "Fp8DotGeneral (fp8_delayed" in out
    last = rows[-1]
    key = "layers_1/ffn/wo/fp8/input_amax"
    for suffix in ("input_amax", "input_scale", "input_saturated", "input_flushed",
                   "input_staleness", "kernel_amax", "output_grad_amax",
                   "output_grad_staleness", "output_grad_saturated", "output_grad_flushed"):
        assert f"layers_0/attn/q_proj/fp8/{suffix}" in last, suffix
    assert not any(k.startswith("lm_head") for k in last)
    # the logged amax is the one the step recorded in the state
    hist = res.state.params["layers_1"]["ffn"]["wo"]["fp8"]["input_amax_history"]
    assert last[key] == pytest.approx(float(hist[0]), rel=1e-6)
    assert 0.0 <= last["layers_1/ffn/wo/fp8/input_saturated"] < 0.5
