"""FP8 weight storage through the loop: a run resumed from a checkpoint with stochastic rounding
and int8 moments equals the uninterrupted run bit for bit."""

import chex
import jax
import pytest

from tfm_jax import data as data_lib
from tfm_jax.train import build

from fp8_support import batch_at, storage_cfg_of as cfg_of


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return data_lib.load_corpus(None, 0.05, str(tmp_path_factory.mktemp("cache")))


def test_resume_is_bitwise_with_sr_and_int8_moments(tmp_path, corpus, devices):
    from tfm_jax.train.checkpoint import Checkpointer

    setup = build(cfg_of(tmp_path, "mesh.data=1", "quant.stochastic_rounding=true",
                         "train.opt_moments=int8"), devices=devices[:1])
    batches = [setup.shard_batch(batch_at(setup.cfg, corpus, i)) for i in range(3)]
    with setup.context():
        full = setup.init_state()
        for b in batches:
            full, _ = setup.train_step(full, b)
        cut, _ = setup.train_step(setup.init_state(), batches[0])
        ckpt = Checkpointer(tmp_path / "ckpt", async_save=False)
        ckpt.save(1, cut)
        ckpt.wait()
        resumed = ckpt.restore(setup.abstract_state())
        ckpt.close()
        for b in batches[1:]:
            resumed, _ = setup.train_step(resumed, b)
    chex.assert_trees_all_equal(jax.device_get(full.params), jax.device_get(resumed.params))
    chex.assert_trees_all_equal(jax.device_get(full.opt_state),
                                jax.device_get(resumed.opt_state))
