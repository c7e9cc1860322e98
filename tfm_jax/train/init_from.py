"""``tfm-jax train --init-from RUN_DIR``: a new run whose parameters start as another run's
(fine-tuning; uptraining after ``tfm-jax convert``; a model imported with ``import-hf``), with a
fresh optimizer state at step 0. The new run's ``model.*`` must give the source's parameter
shapes; the first setting that differs is named."""

from __future__ import annotations

import pathlib
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from tfm_jax.config import Config, ConfigError, load_config
from tfm_jax.core import rundir
from tfm_jax.core.errors import CheckpointMismatch

# the settings that decide the parameter tree (name, value of a ModelConfig)
_SHAPE_KEYS = (("vocab_size", lambda m: m.vocab_size), ("d_model", lambda m: m.d_model),
               ("n_layers", lambda m: m.n_layers), ("n_heads", lambda m: m.n_heads),
               ("n_kv_heads", lambda m: m.n_kv_heads), ("head_dim", lambda m: m.resolved_head_dim),
               ("ffn_type", lambda m: m.ffn_type), ("ffn_hidden", lambda m: m.resolved_ffn_hidden),
               ("norm", lambda m: m.norm), ("norm_position", lambda m: m.norm_position),
               ("tie_embeddings", lambda m: m.tie_embeddings),
               ("qkv_bias", lambda m: m.qkv_bias), ("scan_layers", lambda m: m.scan_layers),
               ("param_dtype", lambda m: m.param_dtype))


def source_config(src: pathlib.Path) -> Config:
    """The saved config of the run ``src`` (its stored tokenizer, ``run.dir`` = ``src``)."""
    saved = src / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"--init-from {src}: no config.yaml there; is it a run directory "
                          "written by 'tfm-jax train', 'convert' or 'import-hf'?")
    stored = src / "tokenizer"
    extra = [f"data.tokenizer={stored.absolute()}"] if stored.is_dir() else []
    return load_config(str(saved), extra + [f"run.dir={src}"])


def check_compatible(cfg: Config, src_cfg: Config, src: pathlib.Path) -> None:
    """ConfigError naming the first ``model.*`` setting whose value changes the parameters."""
    for key, get in _SHAPE_KEYS:
        a, b = get(src_cfg.model), get(cfg.model)
        if a != b:
            raise ConfigError(f"--init-from {src}: model.{key}={b!r} but the source run has "
                              f"{a!r}; the parameters must have the source's shapes (set "
                              f"model.{key}={a!r}, or convert the source first)")
    if src_cfg.moe.n_experts != cfg.moe.n_experts:
        raise ConfigError(f"--init-from {src}: moe.n_experts={cfg.moe.n_experts} but the source "
                          f"run has {src_cfg.moe.n_experts}")
    if cfg.run_dir.resolve() == src.resolve():
        raise ConfigError(f"--init-from {src}: the new run's run.dir is the source run; set "
                          "run.dir=NEW_DIR")


def init_state(setup: Any, src: pathlib.Path | str, step: Optional[int] = None,
               devices: Optional[list] = None) -> Any:
    """The new run's step-0 state: ``src``'s parameters (checkpoint ``step``, default the
    newest intact one) and model state, a fresh optimizer state."""
    from tfm_jax.train.checkpoint import Checkpointer
    from tfm_jax.train.setup import build
    from tfm_jax.train.state import TrainState

    src = pathlib.Path(src)
    rundir.check_run_dir(src)
    src_cfg = source_config(src)
    check_compatible(setup.cfg, src_cfg, src)
    src_setup = build(src_cfg, devices)
    ckpt = Checkpointer(src / "checkpoints", read_only=True)
    try:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"--init-from {src}: no checkpoint under "
                                    f"{src / 'checkpoints'}")
        src_state = src_setup.restore(ckpt, step=step, optimizer=False)
    finally:
        ckpt.close()
    params = jax.device_get(src_state.params)
    model_state = jax.device_get(src_state.model_state)
    del src_state
    abstract = setup.abstract_state()
    want = jax.tree.map(lambda s: (tuple(s.shape), np.dtype(s.dtype)), abstract.params)
    have = jax.tree.map(lambda x: (tuple(np.shape(x)), np.dtype(x.dtype)), params)
    if want != have:
        raise CheckpointMismatch(f"--init-from {src}: the source's parameter tree differs from "
                                 "the new run's (a different quant.recipe or moe setting?)")
    if jax.tree.structure(model_state) != jax.tree.structure(abstract.model_state):
        model_state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract.model_state)

    def fresh(params, model_state):
        return TrainState(jnp.zeros((), jnp.int32), params, model_state, setup.opt_init(params))

    with setup.context():
        return jax.jit(fresh, out_shardings=setup.state_shardings)(params, model_state)
