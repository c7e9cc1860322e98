"""Uptraining (GQA paper, Ainslie et al. 2023): MHA (or GQA) checkpoint -> fewer K/V heads.

Each group of contiguous K/V heads is replaced by its mean: the key and value projection
kernels (``k_proj``/``v_proj``, shape (d, Hkv, Dh), or (L, d, Hkv, Dh) under ``scan_layers``)
are mean-pooled over the head axis into ``n_kv_heads`` heads. Groups are contiguous, which is
this framework's head -> group mapping (query head ``h`` reads K/V head ``h // G``; see
:mod:`tfm_jax.layers.attention`): new K/V head ``j`` is the mean of old heads
``j*r .. (j+1)*r - 1`` with ``r = old / new``, and query head ``h`` moves from old K/V head
``h // G_old`` to new head ``h // G_new = (h // G_old) // r``, the group that contains it. RoPE
is the same linear rotation for every head, so pooling the kernels pools the rotated keys.

:func:`convert_run` writes a **new run directory**: ``config.yaml`` (``model.n_kv_heads=N``,
``train.steps`` = the uptraining steps, default 5 % of the source's, as in the paper), an orbax
checkpoint **at step 0** holding the converted parameters, the source's other model state
(BatchNorm statistics) and a **fresh optimizer state** (Adam moments of the MHA model do not fit
the pooled kernels, and a fresh state wants the warmup the step-0 schedule gives it), and
``convert.json`` (provenance and, by default, the validation loss right after conversion).
``tfm-jax train --config OUT/config.yaml --resume`` then continues training it (its learning
rate schedule restarts: warmup and cosine over the uptraining steps), and ``tfm-jax eval
--run-dir OUT`` evaluates it. Batches are a function of ``(train.seed, step)``: at the same seed
the uptraining steps see the batches of the source run's first steps again.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any, Callable, Optional

import numpy as np

from tfm_jax.config import Config, ConfigError, load_config
from tfm_jax.config.schema import safe_run_name
from tfm_jax.core import rundir

KV_PROJECTIONS = ("k_proj", "v_proj")
METHOD = ("mean-pool of contiguous K/V head groups (Ainslie et al. 2023, 'GQA: Training "
          "Generalized Multi-Query Transformer Models from Multi-Head Checkpoints')")


def mean_pool_kv_heads(kernel: np.ndarray, n_kv_heads: int, head_axis: int = -2) -> np.ndarray:
    """Mean of each group of contiguous heads along ``head_axis``: (..., H, ...) ->
    (..., n_kv_heads, ...). ``H == n_kv_heads`` returns the kernel unchanged (a copy)."""
    kernel = np.asarray(kernel)
    axis = head_axis % kernel.ndim
    h = kernel.shape[axis]
    if n_kv_heads < 1 or h % n_kv_heads:
        raise ValueError(f"cannot pool {h} K/V heads into {n_kv_heads}: the new count must "
                         f"divide the old one (e.g. {', '.join(map(str, _divisors(h)))})")
    r = h // n_kv_heads
    shape = kernel.shape[:axis] + (n_kv_heads, r) + kernel.shape[axis + 1:]
    # accumulate in float64, return the kernel's dtype (bf16 kernels stay bf16)
    return kernel.astype(np.float64).reshape(shape).mean(axis=axis + 1).astype(kernel.dtype)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def convert_params(params: Any, n_kv_heads: int) -> Any:
    """The parameter tree with every ``k_proj``/``v_proj`` kernel mean-pooled to ``n_kv_heads``
    heads (numpy leaves); every other leaf unchanged. A leaf under a K/V projection that is not
    its ``kernel`` (e.g. quantization scales) is refused: there is no rule for it yet."""
    import jax

    from tfm_jax.core.roles import path_names

    def conv(path, x):
        names = path_names(path)
        if not any(n in KV_PROJECTIONS for n in names):
            return x
        if names[-1] != "kernel":
            raise ValueError(f"convert: no rule to pool {'/'.join(names)} (only the K/V "
                             "projection kernels are converted); convert an unquantized run")
        return mean_pool_kv_heads(np.asarray(x), n_kv_heads, head_axis=-2)

    return jax.tree_util.tree_map_with_path(conv, params)


@dataclasses.dataclass
class ConvertResult:
    out_dir: pathlib.Path
    config: Config
    source_step: int
    source_n_kv_heads: int
    eval: Optional[dict]        # validation loss/perplexity right after conversion (or None)


def default_out_dir(run_dir: pathlib.Path, n_kv_heads: int) -> pathlib.Path:
    return run_dir.parent / f"{run_dir.name}-kv{n_kv_heads}"


def converted_config(src: Config, n_kv_heads: int, out_dir: pathlib.Path,
                     steps: Optional[int] = None) -> Config:
    """The new run's config: ``n_kv_heads``, ``run.dir``, ``train.steps`` (default 5 % of the
    source's, at least 1) with the warmup clipped to it."""
    if n_kv_heads < 1 or src.model.n_kv_heads % n_kv_heads:
        raise ConfigError(
            f"convert: --kv-heads {n_kv_heads} must divide the source run's model.n_kv_heads="
            f"{src.model.n_kv_heads} (groups of contiguous heads are averaged); choose one of "
            f"{', '.join(map(str, _divisors(src.model.n_kv_heads)))}")
    steps = max(1, math.ceil(0.05 * src.train.steps)) if steps is None else steps
    if steps < 1:
        raise ConfigError(f"convert: --steps {steps} must be >= 1")
    return src.replace(**{"model.n_kv_heads": n_kv_heads, "run.dir": str(out_dir),
                          "run.name": safe_run_name(out_dir.name), "train.steps": steps,
                          "train.warmup_steps": min(src.train.warmup_steps, steps)})


def load_run_config(run_dir: pathlib.Path | str, overrides: Optional[list[str]] = None) -> Config:
    """A run directory's saved ``config.yaml`` (with ``run.dir`` pointing at it)."""
    run_dir = pathlib.Path(run_dir)
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"--run-dir {run_dir}: no config.yaml there; is it a run directory "
                          "written by 'tfm-jax train'?")
    stored = run_dir / "tokenizer"         # the run's copy of its tokenizer
    extra = [f"data.tokenizer={stored.absolute()}"] if stored.is_dir() else []
    return load_config(str(saved), extra + list(overrides or []) + [f"run.dir={run_dir}"])


def _check_target(src: Config, target: Config) -> None:
    """A given target config must describe the source's model with only n_kv_heads changed."""
    a, b = src.to_dict()["model"], target.to_dict()["model"]
    diff = [f"model.{k}: source {a[k]!r}, target {b[k]!r}" for k in a
            if k != "n_kv_heads" and a[k] != b[k]]
    if diff:
        raise ConfigError("convert: the target config's model differs from the source run's "
                          "beyond model.n_kv_heads: " + "; ".join(diff))
    converted_config(src, target.model.n_kv_heads, target.run_dir, 1)   # divisibility check


def convert_run(run_dir: pathlib.Path | str, n_kv_heads: Optional[int] = None,
                out_dir: Optional[pathlib.Path | str] = None, *, steps: Optional[int] = None,
                config: Optional[Config] = None, evaluate: bool = True,
                corpus: Any = None, devices: Optional[list] = None,
                params_from: Optional[Callable[[Config, Any], tuple[Any, dict]]] = None,
                ) -> ConvertResult:
    """Convert the latest checkpoint of ``run_dir`` to ``n_kv_heads`` K/V heads in a new run
    directory (default ``<run_dir>-kv<N>``); see the module docstring for what it holds.

    ``config``: the new run's full config instead of the one derived from the source
    (:func:`converted_config`); its model must be the source's except ``n_kv_heads`` (which
    then gives the head count), and ``run.dir`` names the output. The ablation runner's
    ``init_from`` uses this. ``corpus``: a loaded corpus to evaluate on (else loaded);
    ``devices``: the devices to build on (default all). ``params_from(src_cfg, params)``: the
    parameters to convert instead of the checkpoint's (same layout), with a record for
    convert.json (``params_from``); e.g. :func:`tfm_jax.hf.params_via_hf` reads them back from a
    Hugging Face export of the run."""
    import jax
    import jax.numpy as jnp

    from tfm_jax.platform import backends
    from tfm_jax import data as data_lib
    from tfm_jax.train.checkpoint import Checkpointer, restore_latest
    from tfm_jax.train import TrainState, build, evaluate as eval_fn

    run_dir = pathlib.Path(run_dir)
    src_cfg = load_run_config(run_dir)
    if src_cfg.quant.recipe != "none":
        storage = " with FP8 weight storage" if src_cfg.quant.fp8_weight_storage else ""
        raise ConfigError(
            f"convert: {run_dir} was trained with quant.recipe={src_cfg.quant.recipe}{storage}; "
            "K/V-head pooling converts full-precision kernels only (the FP8 scaling state of the "
            "pooled projections has no pooled equivalent). Convert a run trained with "
            "quant.recipe=none, then train the converted run with the recipe")
    if config is not None:
        _check_target(src_cfg, config)
        new_cfg, n_kv_heads, out_dir = config, config.model.n_kv_heads, config.run_dir
    else:
        if n_kv_heads is None:
            raise ConfigError("convert: give the new number of K/V heads (--kv-heads N)")
        out_dir = (pathlib.Path(out_dir) if out_dir is not None
                   else default_out_dir(run_dir, n_kv_heads))
        new_cfg = converted_config(src_cfg, n_kv_heads, out_dir, steps)
    if out_dir.resolve() == run_dir.resolve():
        raise FileExistsError(f"convert: --out {out_dir} is the source run; choose a new "
                              "directory")
    if (out_dir / "checkpoints").exists() and any((out_dir / "checkpoints").iterdir()):
        raise FileExistsError(f"convert: {out_dir} already holds checkpoints; choose another "
                              "--out or remove it")
    rundir.claim_output_dir(out_dir, "convert: --out")   # never into another folder's files
    rundir.check_run_dir(run_dir)
    backends.configure(src_cfg.backend)

    src_setup = build(src_cfg, devices)
    src_state = restore_latest(run_dir / "checkpoints", src_setup.abstract_state(),
                               what="convert")
    source_step = int(src_state.step)
    src_params = jax.device_get(src_state.params)
    params_note = None
    if params_from is not None:
        src_params, params_note = params_from(src_cfg, src_params)
    params = convert_params(src_params, n_kv_heads)
    model_state = jax.device_get(src_state.model_state)
    del src_state

    setup = build(new_cfg, devices)
    want = jax.tree.map(lambda s: (tuple(s.shape), s.dtype), setup.abstract_state().params)
    have = jax.tree.map(lambda x: (tuple(x.shape), x.dtype), params)
    if want != have:   # a layout this converter does not know (a new kind of K/V leaf)
        raise ValueError(f"convert: converted parameters do not match the {n_kv_heads}-head "
                         f"model: {have} vs {want}")

    def fresh(params, model_state):
        return TrainState(jnp.zeros((), jnp.int32), params, model_state, setup.opt_init(params))

    with setup.context():
        state = jax.jit(fresh, out_shardings=setup.state_shardings)(params, model_state)
    out_dir.mkdir(parents=True, exist_ok=True)
    rundir.atomic_write(out_dir / "config.yaml", new_cfg.to_yaml())
    tok = data_lib.run_tokenizer(run_dir, new_cfg.data.tokenizer)
    data_lib.tokenizer.copy_into(tok, out_dir)
    data_lib.inherit_run_corpus(run_dir, out_dir)
    ckpt = Checkpointer(out_dir / "checkpoints", keep=new_cfg.train.keep_checkpoints,
                        async_save=False)
    try:
        ckpt.save(0, state)
        ckpt.wait()
    finally:
        ckpt.close()

    ev = None
    if evaluate:
        corpus = corpus or data_lib.corpus_for(new_cfg.data, tok)
        ev = eval_fn(setup, state, corpus.val)
    info = {"source_run": str(run_dir), "source_step": source_step,
            "source_n_kv_heads": src_cfg.model.n_kv_heads, "n_kv_heads": n_kv_heads,
            "method": METHOD, "checkpoint_step": 0, "optimizer_state": "fresh",
            "uptrain_steps": new_cfg.train.steps, "eval": ev}
    if params_note is not None:
        info["params_from"] = params_note
    rundir.atomic_write(out_dir / "convert.json", json.dumps(info, indent=2))
    return ConvertResult(out_dir, new_cfg, source_step, src_cfg.model.n_kv_heads, ev)
