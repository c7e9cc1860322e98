"""Shared by the FP8 tests of both tiers (tests/ is on sys.path through its conftest.py)."""

import jax
import numpy as np

from tfm_jax import data as data_lib
from tfm_jax.config import load_config
from tfm_jax.core import roles as param_roles

SMALL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
         "model.multiple_of=16", "data.seq_len=32", "train.batch_size=8", "train.warmup_steps=2",
         "train.eval_batches=2", "train.log_every=1", "train.sample_tokens=0",
         "run.progress=false", "run.tensorboard=false", "quant.amax_history=4"]


def cfg_of(tmp_path, *extra, recipe="fp8_delayed"):
    return load_config(None, SMALL + [f"run.dir={tmp_path}", f"quant.recipe={recipe}"]
                       + list(extra))


def batch_at(cfg, corpus, step):
    return data_lib.train_batch(corpus.train, corpus.train_doc_starts, step=step, seed=0,
                                batch_size=cfg.train.batch_size, seq_len=cfg.data.seq_len)


def quant_leaves(params) -> dict:
    """The overwritten (FP8 state) leaves of ``params`` by path, as numpy."""
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]
    return {jax.tree_util.keystr(p, simple=True, separator="/"): np.asarray(x)
            for p, x in flat if param_roles.overwritten(p)}


STORAGE = ["quant.fp8_weight_storage=true", "train.lr=1e-2"]


def storage_cfg_of(tmp_path, *extra, recipe="fp8_delayed"):
    """:func:`cfg_of` with the kernels kept in FP8 (and a larger lr, so updates show)."""
    return cfg_of(tmp_path, *STORAGE, *extra, recipe=recipe)


def step_hlo(tmp_path, devices, *extra, recipe="fp8_delayed", platform="gpu") -> str:
    """Unoptimized HLO text of the train step lowered with ``platform``'s op set (one device,
    abstract state: nothing runs), for :func:`tfm_jax.quant.hlo_check.check_hlo`."""
    import jax.numpy as jnp

    from tfm_jax.train import build

    cfg = cfg_of(tmp_path, "mesh.data=1", *extra, recipe=recipe)
    setup = build(cfg, devices=devices[:1], ops_platform=platform)
    batch = {k: jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.data.seq_len),
                                     jnp.float32 if k == "mask" else jnp.int32)
             for k in ("inputs", "targets", "mask")}
    with setup.context():
        return setup.train_step.lower(setup.abstract_state(), batch).as_text(dialect="hlo")
