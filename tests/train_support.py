"""Shared by the train tests of both tiers (tests/ is on sys.path through its conftest.py)."""

import jax
import numpy as np

from tfm_jax.config import load_config

SMALL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
         "model.multiple_of=16", "data.seq_len=32", "train.batch_size=8", "train.warmup_steps=2",
         "train.eval_batches=2", "train.log_every=1", "train.sample_tokens=0",
         "run.progress=false", "run.tensorboard=false"]


def small_cfg(tmp_path, *extra):
    return load_config(None, SMALL + [f"run.dir={tmp_path}"] + list(extra))


def params_np(state):
    return jax.tree.map(np.asarray, jax.device_get(state.params))


def poison(setup, state, layer="layers_1"):
    """``state`` with an inf written into one FFN kernel of ``layer``."""
    params = jax.device_get(state.params)
    k = np.array(params[layer]["ffn"]["wo"]["kernel"])
    k[0, 0] = np.inf
    params[layer]["ffn"]["wo"]["kernel"] = k
    params = jax.device_put(params, setup.state_shardings.params)
    return state.replace(params=params)


def write_initialized_run(run_dir, overrides):
    """A run directory as ``tfm-jax train`` leaves it (config.yaml + a checkpoint at step 0),
    holding the initial parameters: for tests of what reads runs, without compiling a train
    step."""
    from tfm_jax.core import rundir
    from tfm_jax.train import build
    from tfm_jax.train.checkpoint import Checkpointer

    cfg = load_config(None, list(overrides) + [f"run.dir={run_dir}"])
    setup = build(cfg)
    state = setup.init_state()
    rundir.atomic_write(cfg.run_dir / "config.yaml", cfg.to_yaml())
    ckpt = Checkpointer(cfg.run_dir / "checkpoints", async_save=False)
    ckpt.save(0, state)
    ckpt.close()
    return cfg


def cli_env(cache_dir) -> dict:
    """Environment for ``python -m tfm_jax`` subprocesses: this checkout's package first on
    PYTHONPATH (whatever is installed), one CPU device (not conftest's 8), a private cache, no
    plugin from the caller's environment, unbuffered output."""
    import os
    import pathlib

    root = str(pathlib.Path(__file__).resolve().parents[1])
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([root] + [p for p in e.get("PYTHONPATH", "").split(
        os.pathsep) if p and os.path.abspath(p) != root])
    e["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    e["JAX_PLATFORMS"] = "cpu"
    e["TFM_JAX_CACHE"] = str(cache_dir)
    e["PYTHONUNBUFFERED"] = "1"
    for k in ("TFM_JAX_PJRT_PLUGIN", "PJRT_NAMES_AND_LIBRARY_PATHS"):
        e.pop(k, None)
    return e
