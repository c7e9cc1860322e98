"""The train state and its optimizer: AdamW over the trained parameters, ``set_to_zero`` over
the leaves the step sets itself, partitioned by parameter role (:mod:`tfm_jax.core.roles`)."""

from __future__ import annotations

from typing import Any

import jax
import optax
from flax import struct
from jax.sharding import PartitionSpec as P

from tfm_jax.config import Config
from tfm_jax.core import roles as param_roles
from tfm_jax.train import precision


@struct.dataclass
class TrainState:
    step: jax.Array        # int32 scalar: optimizer steps taken
    params: Any
    model_state: Any       # non-param collections, e.g. {"batch_stats": ...}; {} if none
    opt_state: Any


def lr_schedule(cfg: Config) -> optax.Schedule:
    """Linear warmup from 0 to ``lr`` over ``warmup_steps`` (at most ``steps``: a quick run of a
    config made for a long one warms up over all of its steps), cosine decay to
    ``lr*min_lr_ratio`` at ``steps``."""
    t = cfg.train
    warmup = min(t.warmup_steps, t.steps)
    return optax.warmup_cosine_decay_schedule(
        0.0, t.lr, warmup, max(t.steps, warmup + 1), t.lr * t.min_lr_ratio)


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
    """AdamW; decoupled weight decay on projection kernels and embeddings only, decided by each
    parameter's role (:mod:`tfm_jax.core.roles`), never by its rank (scanned norm scales are
    2-D). (Global-norm clipping happens in the train step, which already has the norm.)

    The optimizer is always an ``optax.multi_transform`` whose labels come from the parameters'
    roles by path (:func:`tfm_jax.core.roles.optimizer_labels`), never from config flags: AdamW
    over the trained leaves; ``set_to_zero`` (no moments, no decay: their optimizer state is
    ``MaskedNode``) over the leaves the step sets itself -- FP8 scaling state, FP8 storage
    scales, MoE balancing biases. The train step writes their new values
    (:func:`make_train_step`). The moments of an FP8-stored kernel are float arrays of its
    shape (the optimizer sees the dequantized view,
    :func:`tfm_jax.quant.storage.dequantized_view`). ``train.opt_moments`` bf16 / int8 store
    the moments in low precision (:mod:`tfm_jax.quant.optim`). Low-precision parameters: the
    whole optimizer runs in float32, with a float32 master copy when the policy names one
    (:func:`tfm_jax.train.precision.float32_optimizer`)."""
    t = cfg.train
    if t.opt_moments == "fp32":
        adamw = optax.adamw(lr_schedule(cfg), b1=t.b1, b2=t.b2, eps=t.eps,
                            weight_decay=t.weight_decay, mask=param_roles.decay_mask)
    else:   # bf16 / blockwise 8-bit moments (tfm_jax.quant.optim)
        from tfm_jax.quant import optim
        adamw = optim.adamw_lowp(lr_schedule(cfg), b1=t.b1, b2=t.b2, eps=t.eps,
                                 weight_decay=t.weight_decay, mask=param_roles.decay_mask,
                                 moments=t.opt_moments, block=t.opt_block)
    tx = optax.multi_transform({param_roles.TRAINED: adamw,
                                param_roles.OVERWRITTEN: optax.set_to_zero()},
                               param_roles.optimizer_labels)
    pol = precision.policy(cfg.model)
    if pol.low_precision_params:   # float32 gradients, moments (and master copy)
        tx = precision.float32_optimizer(tx, master=pol.master)
    return tx


def lowp_opt_specs(opt_state: Any, param_specs: Any) -> Any:
    """Partition specs of a :mod:`tfm_jax.quant.optim` state from the params' specs, by path: a
    moment leaf (or a master-weights leaf) (under ``mu``/``nu``, then the parameter's dict path) takes its parameter's
    spec; an 8-bit moment's block ``scale`` (same rank, last axis in blocks) the same with the
    last axis replicated; everything else (counts) is replicated."""
    flat_specs = {tuple(getattr(k, "key", None) for k in path): sp for path, sp in
                  jax.tree_util.tree_flatten_with_path(
                      param_specs, is_leaf=lambda x: isinstance(x, P))[0]}

    def spec(path, leaf):
        names = [getattr(k, "name", getattr(k, "key", None)) for k in path]
        cut = max((i for i, n in enumerate(names) if n in ("mu", "nu", "master")),
                  default=None)
        if cut is None:
            return P()
        dict_keys = tuple(k.key for k in path[cut + 1:] if isinstance(k, jax.tree_util.DictKey))
        sp = flat_specs.get(dict_keys)
        if sp is None:
            return P()
        if isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "scale":
            return P(*tuple(sp)[:-1], None) if len(tuple(sp)) == leaf.ndim else P()
        return sp
    return jax.tree_util.tree_map_with_path(spec, opt_state)
