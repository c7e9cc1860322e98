"""The mixed-precision policy of a run: which dtype each kind of tensor lives in, and how the
optimizer updates low-precision parameters.

Named by the model config (``model.dtype``, ``model.param_dtype``, ``model.master_weights``,
``model.param_rounding``), in the manner of jmp / Levanter policies:

========================  =================================================================
compute                   ``model.dtype``: activations and GEMM operands (softmax, norms and
                          the loss accumulate in float32 whatever it is)
parameters                ``model.param_dtype``: stored, checkpointed and gathered in this dtype
gradients                 the parameter dtype out of the backward pass; summed over micro-batches
                          in float32; divided, clipped and handed to the optimizer in float32
optimizer moments         ``train.opt_moments`` (float32 by default), never the parameter dtype
master weights            float32 parameters are their own master copy. bfloat16 parameters:
                          ``master_weights=float32`` keeps a float32 copy in the optimizer state
                          (:class:`MasterState`), updates it and casts it to the parameters;
                          ``none`` rounds the float32 update into the stored parameters
                          (``param_rounding``: stochastic or nearest-even)
========================  =================================================================

A pure-bfloat16 AdamW without either loses every late update below half a bfloat16 ulp of its
weight; the tiny model's figures are in the docs' mixed-precision page.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from tfm_jax.model import DTYPES


@dataclasses.dataclass(frozen=True)
class Policy:
    """Resolved dtypes of a run (module doc)."""
    compute: Any
    param: Any
    master: bool                  # a float32 master copy in the optimizer state
    rounding: Optional[str]       # low-precision parameters without a master: nearest|stochastic

    @property
    def low_precision_params(self) -> bool:
        return jnp.dtype(self.param) != jnp.dtype(jnp.float32)

    def describe(self) -> str:
        p = jnp.dtype(self.param).name
        text = f"compute {jnp.dtype(self.compute).name}, parameters {p}"
        if not self.low_precision_params:
            return text + " (their own master copy)"
        if self.master:
            return text + ", float32 master weights in the optimizer state"
        return text + f", no master copy (updates rounded {self.rounding})"


def policy(model_cfg) -> Policy:
    """The :class:`Policy` of a :class:`~tfm_jax.config.ModelConfig`."""
    param = DTYPES[model_cfg.param_dtype]
    low = jnp.dtype(param) != jnp.dtype(jnp.float32)
    master = low and model_cfg.master_weights in ("auto", "float32")
    rounding = model_cfg.param_rounding if low and not master else None
    return Policy(DTYPES[model_cfg.dtype], param, master, rounding)


def _to_f32(tree: Any) -> Any:
    return jax.tree.map(lambda x: x.astype(jnp.float32)
                        if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _exact_f32(x: jax.Array) -> jax.Array:
    """bfloat16 -> float32 on the bits. At init the parameters are a float32 draw cast to
    bfloat16, and XLA folds ``float32(bfloat16(draw))`` back into the draw: a master copy made
    with ``astype`` would not start equal to the parameters (measured on XLA:CPU)."""
    if jnp.dtype(x.dtype) != jnp.dtype(jnp.bfloat16):
        return x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x
    bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32) << 16
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


class MasterState(NamedTuple):
    """Optimizer state with a float32 master copy (the params' tree structure, so it takes the
    params' sharding) beside the inner optimizer's state."""
    master: Any
    inner: Any


def float32_optimizer(inner: optax.GradientTransformation, master: bool
                      ) -> optax.GradientTransformation:
    """``inner`` run in float32 for low-precision parameters: it sees float32 gradients and
    float32 parameters (so its moments are float32, or what ``train.opt_moments`` stores).

    ``master``: the state is :class:`MasterState`; each update is applied to the float32 master
    copy, and the new parameters are its cast (:func:`new_params`). Otherwise the inner state
    alone, and the new parameters are ``round(float32(p) + update)``."""
    def init(params):
        p32 = jax.tree.map(_exact_f32, params)
        return MasterState(p32, inner.init(p32)) if master else inner.init(p32)

    def update(grads, state, params=None):
        g32 = _to_f32(grads)
        if master:
            updates, s = inner.update(g32, state.inner, state.master)
            return updates, MasterState(optax.apply_updates(state.master, updates), s)
        return inner.update(g32, state, None if params is None else _to_f32(params))

    return optax.GradientTransformation(init, update)


def stochastic_round_bf16(x: jax.Array, key: jax.Array) -> jax.Array:
    """float32 -> bfloat16 rounded stochastically: up with probability equal to the distance
    from the lower neighbour in ulps (unbiased). Adds 16 random bits below bfloat16's last
    mantissa bit, then truncates. Non-finite values are cast as they are."""
    x = x.astype(jnp.float32)
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    noise = jax.random.bits(key, x.shape, jnp.uint32) >> 16
    y = jax.lax.bitcast_convert_type((bits + noise) & jnp.uint32(0xFFFF0000), jnp.float32)
    return jnp.where(jnp.isfinite(x), y, x).astype(jnp.bfloat16)


def new_params(pol: Policy, params: Any, updates: Any, opt_state: Any,
               key: Optional[jax.Array] = None) -> Any:
    """The parameters after one optimizer update, in their stored dtypes.

    Float32 parameters: ``p + u``. Master weights: the cast of the (already updated) master
    copy -- never ``p + (cast(master) - p)``, which rounds twice. Otherwise ``float32(p) + u``
    rounded to the parameter dtype (``key``: stochastic rounding, one key per leaf)."""
    if not pol.low_precision_params:
        return optax.apply_updates(params, updates)
    if pol.master:
        return jax.tree.map(lambda m, p: m.astype(p.dtype), opt_state.master, params)
    leaves, treedef = jax.tree.flatten(params)
    ups = treedef.flatten_up_to(updates)
    out = []
    for i, (p, u) in enumerate(zip(leaves, ups)):
        y = p.astype(jnp.float32) + u
        if jnp.dtype(p.dtype) != jnp.dtype(jnp.bfloat16):
            out.append(y.astype(p.dtype))
        elif pol.rounding == "stochastic" and key is not None:
            out.append(stochastic_round_bf16(y, jax.random.fold_in(key, i)))
        else:
            out.append(y.astype(p.dtype))
    return jax.tree.unflatten(treedef, out)
