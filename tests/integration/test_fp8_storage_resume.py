"""FP8 weight storage through the loop: a run resumed from a checkpoint with stochastic rounding
and int8 moments equals the uninterrupted run bit for bit."""

import chex
import jax
import ml_dtypes
import pytest

from tfm_jax import data as data_lib
from tfm_jax.config import load_config
from tfm_jax.train import build

E4M3 = ml_dtypes.float8_e4m3fn
E4M3_MAX = float(ml_dtypes.finfo(E4M3).max)
# every finite non-negative e4m3fn value, ascending (from the bit patterns, not from tfm_jax)
SMALL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
         "model.multiple_of=16", "data.seq_len=32", "train.batch_size=8", "train.warmup_steps=2",
         "train.eval_batches=2", "train.log_every=1", "train.sample_tokens=0",
         "run.progress=false", "run.tensorboard=false", "quant.amax_history=4",
         "quant.fp8_weight_storage=true", "train.lr=1e-2"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return data_lib.load_corpus(None, 0.05, str(tmp_path_factory.mktemp("cache")))


def cfg_of(tmp_path, *extra, recipe="fp8_delayed"):
    return load_config(None, SMALL + [f"run.dir={tmp_path}", f"quant.recipe={recipe}"]
                       + list(extra))


def batch_at(cfg, corpus, step):
    return data_lib.train_batch(corpus.train, corpus.train_doc_starts, step=step, seed=0,
                                batch_size=cfg.train.batch_size, seq_len=cfg.data.seq_len)


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
