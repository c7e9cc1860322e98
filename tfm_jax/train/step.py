"""The jitted steps: ``(state, batch) -> (state, metrics)`` for training (gradient accumulation
inside, one transform per parameter role) and the masked cross-entropy of evaluation.

The step is one pure function, jitted once with the state donated and every array sharded over
the mesh by the logical rule table. Gradient accumulation runs inside the step (``lax.scan`` over
micro-batches), so an optimizer step is one dispatch and its result does not depend on how the
batch was split (up to float summation order) -- except with ``norm: batchnorm``, whose
statistics are per micro-batch.
"""

from __future__ import annotations


from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from tfm_jax.config import Config
from tfm_jax.core import roles as param_roles, telemetry
from tfm_jax.layers.cross_entropy import chunked_ce_sum
from tfm_jax.layers.moe import balance_bias_update
from tfm_jax.model import head_weight
from tfm_jax.train import precision
from tfm_jax.train.state import TrainState, lr_schedule


def input_mask(target_mask: jax.Array) -> jax.Array:
    """Valid-input mask from the valid-target mask: input t is real iff t == 0 (BOS / first
    token) or target t-1 is real (inputs are targets shifted right by one). (B, T) -> (B, T)."""
    return jnp.concatenate([jnp.ones_like(target_mask[:, :1]), target_mask[:, :-1]], axis=1)


def masked_ce_sum(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Sum over valid positions of -log p(target). logits (B, T, V) f32, targets/mask (B, T)."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(ce * mask)


def loss_sum_and_state(model: nn.Module, params, model_state, batch, *, train: bool):
    """(masked cross-entropy sum, new model_state, telemetry): the plain loss of the logits, or
    with ``model.loss_chunk`` the chunked, rematerialised one over the final hidden states
    (:func:`tfm_jax.layers.cross_entropy.chunked_ce_sum`): never the whole logits at once."""
    cfg = model.cfg
    if not cfg.loss_chunk:
        logits, new_state, sown = _forward(model, params, model_state, batch, train=train)
        return masked_ce_sum(logits, batch["targets"], batch["mask"]), new_state, sown
    h, new_state, sown = _forward(model, params, model_state, batch, train=train,
                                  hidden_only=True)                             # (B, T, d)
    loss = chunked_ce_sum(h.reshape(-1, h.shape[-1]), head_weight(cfg, params),
                          batch["targets"].reshape(-1), batch["mask"].reshape(-1),
                          cfg.loss_chunk)
    return loss, new_state, sown


def _forward(model: nn.Module, params, model_state, batch, *, train: bool,
             hidden_only: bool = False):
    """(logits, new model_state, telemetry); telemetry (:mod:`tfm_jax.core.telemetry`) is collected
    in training only, and is ``{}`` when no module sows. ``hidden_only``: the final hidden
    states instead of the logits."""
    variables = {"params": params, **model_state}
    mutable = ((list(model_state) if model_state else []) + list(telemetry.COLLECTIONS)
               if train else False)
    kw = {"hidden_only": True} if hidden_only else {}
    packed = {k: batch[k] for k in ("segment_ids", "positions") if k in batch}  # segments packing
    out = model.apply(variables, batch["inputs"], token_mask=input_mask(batch["mask"]),
                      train=train, mutable=mutable, **kw, **packed)
    logits, new_state = out if mutable else (out, model_state)
    new_state, sown = telemetry.split(new_state)
    return logits, new_state, sown


def _stacked(path) -> bool:
    return any(getattr(k, "key", None) == "layers" for k in path)


def nonfinite_flags(tree: Any) -> Any:
    """Per-leaf flag ``any(~isfinite)``; leaves stacked by ``nn.scan`` get one flag per layer."""
    def flag(path, x):
        if _stacked(path) and x.ndim >= 1:
            return ~jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1)
        return ~jnp.all(jnp.isfinite(x))
    return jax.tree_util.tree_map_with_path(flag, tree)


_jit_nonfinite_flags = jax.jit(nonfinite_flags)


def leaf_sumsq(tree: Any) -> Any:
    """Per-leaf sum of squares in float32 (per layer for ``nn.scan``-stacked leaves).

    One pass over the gradients gives both the global norm (clipping, metrics) and the
    non-finite check: a NaN/inf anywhere in a leaf makes its sum of squares non-finite (so does
    a finite gradient beyond ~1e19 in magnitude, which is counted as divergence too).
    """
    def f(path, x):
        x = jnp.square(x.astype(jnp.float32))
        if _stacked(path) and x.ndim >= 1:
            return jnp.sum(x.reshape(x.shape[0], -1), axis=1)
        return jnp.sum(x)
    return jax.tree_util.tree_map_with_path(f, tree)


def _accumulate(acc, g, over: bool):
    """Micro-batch accumulation of one leaf: sum of gradients; max of overwritten state."""
    return jnp.maximum(acc, g) if over else acc + g


def _acc_init(p, over: bool):
    if not over:     # gradients sum in float32 whatever the parameter dtype
        return jnp.zeros(p.shape, jnp.promote_types(p.dtype, jnp.float32))
    low = jnp.finfo(p.dtype).min if jnp.issubdtype(p.dtype, jnp.floating) else jnp.iinfo(
        p.dtype).min
    return jnp.full_like(p, low)


def make_train_step(cfg: Config, model: nn.Module, tx: optax.GradientTransformation
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The pure train step. Non-finite loss or gradients never update the state (in both
    ``on_nonfinite`` modes): the step counter advances, everything else is kept, and the
    metrics say so (``finite``, per-leaf ``grad_nonfinite``); the loop decides to stop or skip.

    Leaves are routed by role (:mod:`tfm_jax.core.roles`, decided from paths at trace time):
    trained leaves are summed over micro-batches, divided by the token count, clipped and
    updated by the optimizer; MoE balancing biases (role ``balance``) sum their load over
    micro-batches and take one sign step (:func:`tfm_jax.layers.moe.balance_bias_update`);
    overwritten leaves (quantization state, whose "gradient" is its
    new value) take the max over micro-batches and are written into the parameters as they
    are -- bit for bit -- when the step is finite; they count in neither the gradient norm nor
    the non-finite check (their ``grad_nonfinite`` flag is always False). A tree without
    overwritten leaves runs exactly the computation it always did.

    Telemetry: whatever the model sows (:mod:`tfm_jax.core.telemetry`) comes back in the metrics
    under ``"telemetry"`` (reduced over micro-batches as its collection says), for the loop to
    log; the key is absent and nothing is computed when the model sows nothing.
    """
    n_micro = cfg.train.grad_accum
    clip = cfg.train.grad_clip

    def micro_loss(params, model_state, batch):
        loss_sum, new_state, sown = loss_sum_and_state(model, params, model_state, batch,
                                                       train=True)
        aux = telemetry.aux_loss(sown)     # sown auxiliary losses (MoE), per token; None if none
        if aux is not None:
            loss_sum = loss_sum + aux * jnp.sum(batch["mask"])
        return loss_sum, (new_state, sown)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    stored = cfg.quant.fp8_weight_storage
    if stored:
        from tfm_jax.quant import storage
        spec = storage.spec_from_config(cfg.quant)

    pol = precision.policy(cfg.model)

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        round_key = (jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.train.seed),
                                                           state.step), 1)
                     if pol.rounding == "stochastic" else None)
        over = param_roles.overwrite_mask(state.params)     # Python bools: static routing
        # MoE balancing bias: its "gradient" is the load, summed over micro-batches; updated by
        # its own rule below, outside the division, the norm, the clip and AdamW
        bal = param_roles.balance_mask(state.params)
        held = jax.tree.map(lambda o, b: o or b, over, bal)
        n_tokens = jnp.maximum(batch["mask"].sum(dtype=jnp.float32), 1.0)
        # FP8-stored kernels: gradients, clip and AdamW act on their dequantized float32 view
        params = storage.dequantized_view(state.params) if stored else state.params
        if n_micro == 1:
            (loss_sum, (model_state, sown)), grads = grad_fn(params, state.model_state, batch)
        else:
            # (B, ...) -> (A, B/A, ...), micro-batch a = rows a, a+A, ... so each device keeps
            # its own rows in every micro-batch (no resharding of the batch dimension).
            micro = jax.tree.map(
                lambda x: x.reshape(x.shape[0] // n_micro, n_micro, *x.shape[1:]).swapaxes(0, 1),
                batch)

            def body(carry, mb):
                loss_acc, grad_acc, mstate = carry
                (loss_sum, (mstate, sown)), g = grad_fn(params, mstate, mb)
                return (loss_acc + loss_sum, jax.tree.map(_accumulate, grad_acc, g, over),
                        mstate), sown

            init = jax.tree.map(_acc_init, params, over)
            (loss_sum, grads, model_state), sown = jax.lax.scan(
                body, (jnp.zeros((), jnp.float32), init, state.model_state), micro)
            sown = telemetry.reduce_micro(sown)
        loss = loss_sum / n_tokens
        # float32 from here on (precision policy): the division, the clip and the optimizer
        grads = jax.tree.map(lambda g, o: g if o else g.astype(jnp.float32) / n_tokens,
                             grads, held)
        # overwritten / balance leaves: zeros here, so they add nothing to the norm and are
        # never flagged
        sumsq = leaf_sumsq(jax.tree.map(lambda g, o: jnp.zeros_like(g) if o else g, grads, held))
        grad_norm = jnp.sqrt(sum(jnp.sum(x) for x in jax.tree.leaves(sumsq)))
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if clip > 0:   # clip_by_global_norm, reusing the norm computed above
            scale = jnp.where(grad_norm < clip, 1.0, clip / grad_norm)
            grads = jax.tree.map(lambda g, o: g if o else (g * scale).astype(g.dtype),
                                 grads, held)

        def apply(_):
            updates, opt_state = tx.update(grads, state.opt_state, params)
            new_params = precision.new_params(pol, params, updates, opt_state, round_key)
            # the new quantization state, as computed (not p + (new - p), which rounds)
            new_params = jax.tree.map(lambda p, g, o: g.astype(p.dtype) if o else p,
                                      new_params, grads, over)
            if any(jax.tree.leaves(bal)):   # b += rate * sign(mean load - load), once per step
                new_params = jax.tree.map(
                    lambda n, p, g, b: balance_bias_update(p, g, cfg.moe.bias_update_rate)
                    if b else n, new_params, params, grads, bal)
            if stored:   # EMA scales, re-quantized kernels (stochastic rounding: key of step)
                key = (jax.random.fold_in(jax.random.key(cfg.train.seed), state.step)
                       if spec.stochastic_rounding else None)
                new_params = storage.requantize_tree(new_params, state.params, spec, key)
            return TrainState(state.step + 1, new_params, model_state, opt_state)

        def keep(_):
            return TrainState(state.step + 1, state.params, state.model_state, state.opt_state)

        new = jax.lax.cond(finite, apply, keep, None)
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite,
                   "grad_nonfinite": jax.tree.map(lambda x: ~jnp.isfinite(x), sumsq),
                   "lr": lr_schedule(cfg)(state.step), "tokens": n_tokens}
        if jax.tree.leaves(sown):
            metrics["telemetry"] = sown
        return new, metrics

    return step


def make_eval_step(model: nn.Module) -> Callable[[TrainState, dict], tuple[jax.Array, jax.Array]]:
    def step(state: TrainState, batch: dict):
        loss, _, _ = loss_sum_and_state(model, state.params, state.model_state, batch,
                                        train=False)
        return loss, batch["mask"].sum()
    return step


def describe_nonfinite(m: dict, param_flags: Any, param_paths: list[str]) -> str:
    """Human description of which parameters/gradients hold NaN/inf, by tree path and layer.
    ``m``: a step's metrics; ``param_flags``: :func:`nonfinite_flags` of the parameters."""
    def offenders(flags) -> list[str]:
        names = []
        for path, f in zip(param_paths, jax.tree.leaves(flags)):
            f = np.asarray(f)
            if f.ndim == 0 and f:
                names.append(path)
            elif f.ndim == 1:
                names += [f"{path}[layer {i}]" for i in np.flatnonzero(f)]
        return names

    bad_params, bad_grads = offenders(param_flags), offenders(m["grad_nonfinite"])
    parts = [f"loss={float(m['loss'])}"]
    if bad_params:
        parts.append(f"non-finite parameters in {', '.join(bad_params[:5])}")
    if bad_grads:
        parts.append(f"non-finite gradients first in {bad_grads[0]} "
                     f"({len(bad_grads)} tensors affected)")
    return "; ".join(parts)
