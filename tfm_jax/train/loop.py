"""Train state, the jitted train/eval steps, and the training loop.

The step is one pure function ``(state, batch) -> (state, metrics)``, jitted once with the state
donated and every array sharded over the mesh by the logical rule table. Gradient accumulation
runs inside the step (``lax.scan`` over micro-batches), so an optimizer step is one dispatch and
its result does not depend on how the batch was split (up to float summation order) -- except
with ``norm: batchnorm``, whose statistics are per micro-batch (running averages are updated
once per micro-batch).

Resume is exact: the data pipeline is a pure function of ``(seed, step)`` and the state (params,
optimizer moments, BatchNorm statistics, step) is restored whole from an orbax checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import time
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tfm_jax.platform import backends
from tfm_jax import data as data_lib
from tfm_jax.core import interrupts
from tfm_jax.core import roles as param_roles, telemetry
from tfm_jax.train.checkpoint import CheckpointMismatch, Checkpointer
from tfm_jax.config import Config, ConfigError, check_runtime, check_trainable
from tfm_jax.layers.moe import balance_bias_update
from tfm_jax.layers.ops import Ops
from tfm_jax.train.metrics import MetricsLogger, read_metrics
from tfm_jax.model import TransformerLM, count_params, train_flops_per_token
from tfm_jax.parallel import mesh as mesh_lib


class NonFiniteError(FloatingPointError):
    """Loss or gradients became NaN/inf and ``train.on_nonfinite`` is ``stop``."""


class _Reload(Exception):
    """Internal: a non-finite step under ``train.on_nonfinite=reload`` (message: what failed)."""


class Interrupted(RuntimeError):
    """SIGINT/SIGTERM received; a checkpoint was saved. ``signum`` says which."""

    def __init__(self, msg: str, signum: int):
        super().__init__(msg)
        self.signum = signum


@struct.dataclass
class TrainState:
    step: jax.Array        # int32 scalar: optimizer steps taken
    params: Any
    model_state: Any       # non-param collections, e.g. {"batch_stats": ...}; {} if none
    opt_state: Any


# --------------------------------------------------------------------------------------------
# Optimizer and loss.


def lr_schedule(cfg: Config) -> optax.Schedule:
    """Linear warmup from 0 to ``lr`` over ``warmup_steps``, cosine decay to ``lr*min_lr_ratio``
    at ``steps``."""
    t = cfg.train
    return optax.warmup_cosine_decay_schedule(
        0.0, t.lr, t.warmup_steps, max(t.steps, t.warmup_steps + 1), t.lr * t.min_lr_ratio)


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
    the moments in low precision (:mod:`tfm_jax.quant.optim`)."""
    t = cfg.train
    if t.opt_moments == "fp32":
        adamw = optax.adamw(lr_schedule(cfg), b1=t.b1, b2=t.b2, eps=t.eps,
                            weight_decay=t.weight_decay, mask=param_roles.decay_mask)
    else:   # bf16 / blockwise 8-bit moments (tfm_jax.quant.optim)
        from tfm_jax.quant import optim
        adamw = optim.adamw_lowp(lr_schedule(cfg), b1=t.b1, b2=t.b2, eps=t.eps,
                                 weight_decay=t.weight_decay, mask=param_roles.decay_mask,
                                 moments=t.opt_moments, block=t.opt_block)
    return optax.multi_transform({param_roles.TRAINED: adamw,
                                  param_roles.OVERWRITTEN: optax.set_to_zero()},
                                 param_roles.optimizer_labels)


def input_mask(target_mask: jax.Array) -> jax.Array:
    """Valid-input mask from the valid-target mask: input t is real iff t == 0 (BOS / first
    token) or target t-1 is real (inputs are targets shifted right by one). (B, T) -> (B, T)."""
    return jnp.concatenate([jnp.ones_like(target_mask[:, :1]), target_mask[:, :-1]], axis=1)


def masked_ce_sum(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Sum over valid positions of -log p(target). logits (B, T, V) f32, targets/mask (B, T)."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    return jnp.sum(ce * mask)


# --------------------------------------------------------------------------------------------
# Steps.


def _forward(model: nn.Module, params, model_state, batch, *, train: bool):
    """(logits, new model_state, telemetry); telemetry (:mod:`tfm_jax.core.telemetry`) is collected
    in training only, and is ``{}`` when no module sows."""
    variables = {"params": params, **model_state}
    mutable = ((list(model_state) if model_state else []) + list(telemetry.COLLECTIONS)
               if train else False)
    out = model.apply(variables, batch["inputs"], token_mask=input_mask(batch["mask"]),
                      train=train, mutable=mutable)
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
    if not over:
        return jnp.zeros_like(p)
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
        logits, new_state, sown = _forward(model, params, model_state, batch, train=True)
        loss_sum = masked_ce_sum(logits, batch["targets"], batch["mask"])
        aux = telemetry.aux_loss(sown)     # sown auxiliary losses (MoE), per token; None if none
        if aux is not None:
            loss_sum = loss_sum + aux * jnp.sum(batch["mask"])
        return loss_sum, (new_state, sown)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    stored = cfg.quant.fp8_weight_storage
    if stored:
        from tfm_jax.quant import storage
        spec = storage.spec_from_config(cfg.quant)

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        over = param_roles.overwrite_mask(state.params)     # Python bools: static routing
        # MoE balancing bias: its "gradient" is the load, summed over micro-batches; updated by
        # its own rule below, outside the division, the norm, the clip and AdamW
        bal = param_roles.balance_mask(state.params)
        held = jax.tree.map(lambda o, b: o or b, over, bal)
        n_tokens = jnp.maximum(batch["mask"].sum(), 1.0)
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
        grads = jax.tree.map(lambda g, o: g if o else g / n_tokens, grads, held)
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
            new_params = optax.apply_updates(params, updates)
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
        logits, _, _ = _forward(model, state.params, state.model_state, batch, train=False)
        return masked_ce_sum(logits, batch["targets"], batch["mask"]), batch["mask"].sum()
    return step


# --------------------------------------------------------------------------------------------
# Set-up: mesh, sharded state, compiled steps.


@dataclasses.dataclass
class Setup:
    cfg: Config
    mesh: Mesh
    rules: tuple
    model: TransformerLM
    tx: optax.GradientTransformation
    state_shardings: Any
    batch_sharding: NamedSharding
    train_step: Callable
    eval_step: Callable
    init_fn: Callable
    ops: Ops                      # the backend's ops (backends.resolve_ops)

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """Mesh + logical rules, needed while tracing/calling the model."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    def init_state(self) -> TrainState:
        with self.context():
            return self.init_fn(jax.random.key(self.cfg.train.seed))

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and target shardings of the state (for checkpoint restore)."""
        shapes = jax.eval_shape(self.init_fn, jax.random.key(self.cfg.train.seed))
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, self.state_shardings)

    def shard_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return data_lib.shard_batch(batch, self.batch_sharding, self.cfg.train.batch_size)


def build(cfg: Config, devices: Optional[list] = None) -> Setup:
    """Mesh, model, optimizer, state shardings and jitted steps for ``cfg``."""
    devices = list(jax.devices() if devices is None else devices)
    check_runtime(cfg, len(devices))
    mesh = mesh_lib.make_mesh(cfg.mesh, devices)
    rules = mesh_lib.rules_tuple(cfg.mesh.rules)
    ops = backends.resolve_ops(cfg, devices)
    model = TransformerLM(cfg.model, ops=ops, moe=cfg.moe)
    tx = make_optimizer(cfg)
    dummy = jnp.zeros((1, cfg.data.seq_len), jnp.int32)
    calibration = None
    if cfg.quant.recipe == "fp8_static":
        from tfm_jax.quant import fp8
        calibration = fp8.load_calibration(cfg.quant.calibration)   # a bad file: fail now
        fmt = calibration.get("fwd_format")
        if fmt is not None and fmt != cfg.quant.fwd_format:
            raise ConfigError(f"quant.calibration={cfg.quant.calibration} holds scales for "
                              f"{fmt} (max |x| of that format), but quant.fwd_format="
                              f"{cfg.quant.fwd_format} (e.g. from backend.profile/emulate); "
                              f"recalibrate with quant.fwd_format={cfg.quant.fwd_format}")

    def init_boxed(rng):   # (what modules sow at init is not state)
        return telemetry.split(model.init(rng, dummy, train=False))[0]

    def init_fn(rng) -> TrainState:
        variables = nn.meta.unbox(init_boxed(rng))
        params = variables.pop("params")
        if calibration is not None:      # fp8_static: the scales of the calibration file
            params = fp8.apply_calibration(params, calibration)
        if cfg.quant.fp8_weight_storage:   # moments of FP8 kernels: float, as the view
            from tfm_jax.quant import storage
            return TrainState(jnp.zeros((), jnp.int32), params, variables,
                              tx.init(storage.dequantized_view(params)))
        return TrainState(jnp.zeros((), jnp.int32), params, variables, tx.init(params))

    boxed = jax.eval_shape(init_boxed, jax.random.key(0))
    var_specs = nn.get_partition_spec(boxed)
    mesh_lib.check_rules_cover(var_specs, rules)
    param_specs = var_specs.pop("params")
    abstract = jax.eval_shape(init_fn, jax.random.key(0))
    if cfg.train.opt_moments == "fp32":
        # (multi_transform: the overwritten leaves' moments are MaskedNode, kept as they are)
        opt_specs = optax.tree_map_params(
            tx, lambda x, spec: x if isinstance(x, optax.MaskedNode) else spec,
            abstract.opt_state, param_specs, transform_non_params=lambda _: P(),
            is_leaf=lambda x: isinstance(x, (P, optax.MaskedNode)))
    else:
        opt_specs = lowp_opt_specs(abstract.opt_state, param_specs)
    specs = TrainState(P(), param_specs, var_specs, opt_specs)
    state_shardings = mesh_lib.logical_to_sharding(specs, mesh, rules)
    mesh_lib.check_divisible(abstract, state_shardings)
    batch_sharding = mesh_lib.data_sharding(mesh, rules)
    batch_shardings = {k: batch_sharding for k in ("inputs", "targets", "mask")}

    train_step = jax.jit(make_train_step(cfg, model, tx),
                         in_shardings=(state_shardings, batch_shardings),
                         out_shardings=(state_shardings, None), donate_argnums=0)
    eval_step = jax.jit(make_eval_step(model), in_shardings=(state_shardings, batch_shardings))
    jit_init = jax.jit(init_fn, out_shardings=state_shardings)
    return Setup(cfg, mesh, rules, model, tx, state_shardings, batch_sharding, train_step,
                 eval_step, jit_init, ops)


def lowp_opt_specs(opt_state: Any, param_specs: Any) -> Any:
    """Partition specs of a :mod:`tfm_jax.quant.optim` state from the params' specs, by path: a
    moment leaf (under ``mu``/``nu``, then the parameter's dict path) takes its parameter's
    spec; an 8-bit moment's block ``scale`` (same rank, last axis in blocks) the same with the
    last axis replicated; everything else (counts) is replicated."""
    flat_specs = {tuple(getattr(k, "key", None) for k in path): sp for path, sp in
                  jax.tree_util.tree_flatten_with_path(
                      param_specs, is_leaf=lambda x: isinstance(x, P))[0]}

    def spec(path, leaf):
        names = [getattr(k, "name", getattr(k, "key", None)) for k in path]
        cut = max((i for i, n in enumerate(names) if n in ("mu", "nu")), default=None)
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


def fp8_dot_line(setup: Setup, state: TrainState) -> str:
    """Whether the compiled train step runs FP8 GEMMs (native) or upcasts (emulated), from its
    HLO (:func:`tfm_jax.quant.fp8.fp8_dot_mode`); one line for the run log."""
    from tfm_jax.quant import fp8

    cfg = setup.cfg
    batch = {k: jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.data.seq_len),
                                     jnp.float32 if k == "mask" else jnp.int32,
                                     sharding=setup.batch_sharding)
             for k in ("inputs", "targets", "mask")}
    with setup.context():
        text = setup.train_step.lower(state, batch).compile().as_text()
    return fp8.describe_dot_mode(fp8.fp8_dot_mode(text), setup.mesh.devices.flat[0].platform)


# --------------------------------------------------------------------------------------------
# Evaluation.


def evaluate(setup: Setup, state: TrainState, val_tokens: np.ndarray) -> dict[str, float]:
    """Mean validation loss (nats/token) and perplexity over ``train.eval_batches`` batches."""
    cfg = setup.cfg
    total, count = 0.0, 0.0
    with setup.context():
        for batch in data_lib.eval_batches(val_tokens, batch_size=cfg.train.batch_size,
                                           seq_len=cfg.data.seq_len,
                                           max_batches=cfg.train.eval_batches,
                                           rows=data_lib.process_rows(cfg.train.batch_size)):
            s, n = setup.eval_step(state, setup.shard_batch(batch))
            total, count = total + float(s), count + float(n)
    val_loss = total / max(count, 1.0)
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)),
            "val_tokens": int(count)}


def eval_span(cfg: Config, val_tokens: np.ndarray) -> np.ndarray:
    """The validation tokens :func:`evaluate` scores (its baseline must use the same text): the
    target tokens of every evaluation window."""
    starts = data_lib.eval_window_starts(val_tokens, batch_size=cfg.train.batch_size,
                                         seq_len=cfg.data.seq_len,
                                         max_batches=cfg.train.eval_batches)
    return np.asarray(val_tokens)[(starts[:, None] + np.arange(1, cfg.data.seq_len + 1)).ravel()]


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


# --------------------------------------------------------------------------------------------
# The loop.


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    run_dir: str
    final_step: int
    last_loss: float
    eval: dict[str, float]
    unigram_baseline: float
    skipped_steps: int
    setup: Setup
    already_finished: bool = False      # resumed at train.steps: nothing was trained
    last_loss_step: Optional[int] = None


class _SignalFlag:
    """Turns SIGINT/SIGTERM into a flag the loop checks between steps."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:   # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:        # second signal: give up immediately
            if interrupts.installed():     # the CLI: exit now, in one line
                interrupts.exit_on_signal(signum, where=(
                    "a second time, while stopping: exited without waiting for the final "
                    "checkpoint (an incomplete save is never restored; the latest complete one "
                    "is kept)"))
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _nothing_to_resume(cfg: Config, ckpt_dir) -> str:
    """The --resume error when the configured run directory holds no checkpoint."""
    run_dir = cfg.run_dir
    others = sorted(
        str(d) for d in (run_dir.parent.iterdir() if run_dir.parent.is_dir() else [])
        if d != run_dir and (d / "checkpoints").is_dir()
        and any(c.name.isdigit() for c in (d / "checkpoints").iterdir()))
    return (f"--resume: no checkpoint in {ckpt_dir}, so there is no run to continue. The run "
            f"directory is run.dir or, if unset, runs/<run.name>, and run.name derives from the "
            f"config file and the overrides (here {cfg.run.name!r}): an override such as "
            f"train.steps=... names a new run. To continue an existing run pass its directory "
            f"(run.dir=...) or name (run.name=...) along with the overrides"
            + (f"; runs with checkpoints next to it: {', '.join(others[:5])}" if others else "")
            + "; to start this run from step 0, drop --resume")


def _model_diff(saved_yaml, cfg: Config) -> list[str]:
    """``model.key: saved -> now`` for each model.* key that differs from a run's config.yaml."""
    import yaml

    try:
        saved = (yaml.safe_load(saved_yaml.read_text()) or {}).get("model") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return []
    now = cfg.to_dict()["model"]
    return [f"model.{k}: {saved.get(k)!r} -> {v!r}" for k, v in now.items() if saved.get(k) != v]


def _last_train_row(run_dir, up_to_step: int, with_loss: bool = False) -> dict:
    """The last train row (one with a ``loss`` key; a non-null loss if ``with_loss``) at or
    before ``up_to_step`` in the run's metrics.jsonl; {} if none."""
    try:
        rows = read_metrics(run_dir)
    except (OSError, ValueError):
        return {}
    rows = [r for r in rows if "loss" in r and r.get("step", 0) <= up_to_step
            and (r["loss"] is not None or not with_loss)]
    return rows[-1] if rows else {}


def _last_logged_loss(run_dir, up_to_step: int) -> tuple[float, Optional[int]]:
    """(loss, step) of the last train row with a loss at or before ``up_to_step``."""
    row = _last_train_row(run_dir, up_to_step, with_loss=True)
    return (float(row["loss"]), int(row["step"])) if row else (float("nan"), None)


def train(cfg: Config, *, resume: bool = False, devices: Optional[list] = None,
          corpus: Optional[data_lib.Corpus] = None,
          step_hook: Optional[Callable[[int], None]] = None) -> TrainResult:
    """Run training as configured; writes the run directory. ``step_hook(step)`` is called after
    each step (tests use it to inject interruptions)."""
    backends.configure(cfg.backend)
    check_trainable(cfg)
    check_runtime(cfg, len(jax.devices() if devices is None else devices))   # before any I/O
    run_dir = cfg.run_dir
    ckpt = Checkpointer(run_dir / "checkpoints", keep=cfg.train.keep_checkpoints,
                        async_save=cfg.train.async_checkpoint)
    try:   # closed on every exit: an orbax manager left open prints asyncio tracebacks at exit
        return _train(cfg, ckpt, resume, devices, corpus, step_hook)
    finally:
        ckpt.close()


def _train(cfg: Config, ckpt: Checkpointer, resume: bool, devices: Optional[list],
           corpus: Optional[data_lib.Corpus], step_hook: Optional[Callable[[int], None]]
           ) -> TrainResult:
    run_dir = cfg.run_dir
    if not resume and ckpt.latest_step() is not None:
        raise FileExistsError(
            f"run directory {run_dir} already has checkpoints (latest step "
            f"{ckpt.latest_step()}); pass --resume to continue it, or choose another run.dir")
    if resume and ckpt.latest_step() is None:
        raise FileNotFoundError(_nothing_to_resume(cfg, ckpt.directory))
    corpus = corpus or data_lib.load_corpus(cfg.data.path, cfg.data.val_fraction,
                                            cfg.data.cache_dir, include=cfg.data.include)
    setup = build(cfg, devices)

    start_step = 0
    if resume:
        # Restore before writing anything: a resume with an incompatible config must leave the
        # run directory (its config.yaml above all) exactly as it was.
        try:
            state = ckpt.restore(setup.abstract_state())
        except CheckpointMismatch as err:
            diff = _model_diff(run_dir / "config.yaml", cfg)
            raise CheckpointMismatch(
                f"{err}" + (f"\n  differences from the run's config.yaml: {'; '.join(diff)}"
                            if diff else "")) from None
        start_step = int(state.step)
        interrupts.note(f"before training resumed from step {start_step}; the run's "
                        "checkpoints are unchanged")
    else:
        state = setup.init_state()
    run_dir.mkdir(parents=True, exist_ok=True)
    data_lib.atomic_write(run_dir / "config.yaml", cfg.to_yaml().encode("utf-8"))

    param_paths = [jax.tree_util.keystr(p, simple=True, separator="/")
                   for p, _ in jax.tree_util.tree_flatten_with_path(state.params)[0]]
    flops_tok = train_flops_per_token(cfg.model, cfg.data.seq_len, cfg.moe)
    peak, peak_source = backends.peak_flops_info(cfg, n_devices=len(setup.mesh.devices.flat))
    unigram = data_lib.unigram_entropy(corpus.train, eval_span(cfg, corpus.val))
    logger = MetricsLogger(run_dir, resume_step=start_step, tensorboard=cfg.run.tensorboard,
                           progress=cfg.run.progress, total_steps=cfg.train.steps,
                           initial_step=start_step)
    logger.info(f"run dir {run_dir} | params {count_params(cfg.model, cfg.moe)['total']:,} | "
                f"mesh {dict(setup.mesh.shape)} | corpus {corpus.num_train_tokens:,} train / "
                f"{corpus.num_val_tokens:,} val tokens | unigram baseline {unigram:.3f} nats")
    if corpus.skipped_files:
        logger.info(f"corpus {corpus.source}: {corpus.skipped_summary()}")
    logger.info(f"kernels: {setup.ops.describe()}")
    from tfm_jax.train import memory
    logger.info(memory.summary_line(memory.state_bytes(state)))
    if cfg.quant.fp8:
        logger.info(fp8_dot_line(setup, state))
    logger.info(f"MFU peak: {peak / 1e9:,.1f} GFLOP/s ({peak_source})")
    logger.start_progress()

    rows = data_lib.process_rows(cfg.train.batch_size)
    t = cfg.train
    skipped, last_loss, last_loss_step, eval_row = 0, float("nan"), None, {}
    if start_step:   # the count goes on from the resumed run's last train row (exact when the
        # resumed step was a log step; skips after the last row were not recorded)
        skipped = _last_train_row(run_dir, start_step).get("skipped", 0)
    window = {"t0": time.perf_counter(), "tokens": 0.0, "losses": [], "skipped": 0,
              "grad_norm": None}
    pending: Optional[tuple[int, dict]] = None

    def handle(step_done: int, m: dict) -> None:
        """Host-side handling of step ``step_done``'s metrics (one step behind the device).

        Every log step writes a train row, also when steps were skipped (``on_nonfinite=skip``):
        ``loss`` is the mean over the window's finite steps (null if none), ``skipped`` the
        count since the start of the run. The console gets the first skipped step in full and
        then one line per log window that skipped any."""
        nonlocal skipped, last_loss, last_loss_step
        m = jax.device_get(m)
        if step_done == start_step + 1:      # includes compilation: keep out of tokens/s
            window["t0"] = time.perf_counter()
        if not bool(m["finite"]):
            # Parameters at detection time (one step later: a failing step keeps the state, so
            # they are the failing step's unless the following step succeeded).
            param_flags = jax.device_get(_jit_nonfinite_flags(state.params))
            msg = f"non-finite loss/gradients at step {step_done}: " + describe_nonfinite(
                m, param_flags, param_paths)
            if t.on_nonfinite == "reload":
                raise _Reload(msg)
            if t.on_nonfinite == "stop":
                raise NonFiniteError(msg + ". Lower train.lr, enable train.grad_clip, or set "
                                     "train.on_nonfinite=skip. Last good checkpoint: "
                                     f"{ckpt.latest_step()}")
            skipped += 1
            window["skipped"] += 1
            if skipped == 1:
                logger.warn(msg + " (update skipped; further skipped steps are counted per log "
                            "window and in metrics.jsonl's 'skipped')")
        else:
            last_loss, last_loss_step = float(m["loss"]), step_done
            window["losses"].append(last_loss)
            window["grad_norm"] = float(m["grad_norm"])
            if step_done != start_step + 1:
                window["tokens"] += float(m["tokens"])
        if step_done % t.log_every == 0 or step_done == t.steps:
            dt = time.perf_counter() - window["t0"]
            tps = window["tokens"] / dt if window["tokens"] else None
            if window["skipped"] and skipped > 1:
                logger.warn(f"step {step_done}: {window['skipped']} step(s) skipped (non-finite) "
                            f"in this log window, {skipped} in all")
            logger.log(step_done, {
                "loss": float(np.mean(window["losses"])) if window["losses"] else None,
                "lr": float(m["lr"]), "grad_norm": window["grad_norm"], "tokens_per_s": tps,
                "mfu": tps * flops_tok / peak if (peak and tps) else None, "skipped": skipped,
                **telemetry.flatten(m.get("telemetry", {}))},   # whatever was sown, by path
                nullable=("loss",))
            window.update(t0=time.perf_counter(), tokens=0.0, losses=[], skipped=0,
                          grad_norm=None)

    reloads = 0

    def reload(msg: str) -> None:
        """on_nonfinite=reload: the last checkpoint (or a fresh init if none), quant.margin + 1,
        config.yaml rewritten (a later --resume keeps the margin), metrics.jsonl cut back to
        the reloaded step, one warning and a ``reload`` row."""
        nonlocal cfg, setup, state, step, logger, reloads, pending
        if reloads >= t.max_reloads:
            raise NonFiniteError(f"{msg}. train.on_nonfinite=reload: {reloads} reload(s) done, "
                                 f"train.max_reloads={t.max_reloads} reached; lower train.lr or "
                                 "raise quant.margin")
        reloads += 1
        ckpt.wait()
        margin = cfg.quant.margin + 1
        cfg = cfg.model_copy(update={"quant": cfg.quant.model_copy(update={"margin": margin})})
        setup = build(cfg, devices)
        latest = ckpt.latest_step()
        state = setup.init_state() if latest is None else ckpt.restore(setup.abstract_state())
        step, pending = int(state.step), None
        data_lib.atomic_write(run_dir / "config.yaml", cfg.to_yaml().encode("utf-8"))
        where = (f"checkpoint {latest}" if latest is not None
                 else "the initial state (no checkpoint yet)")
        logger.warn(f"{msg}; reloaded {where} with quant.margin={margin} (reload {reloads} of "
                    f"at most {t.max_reloads}, train.on_nonfinite=reload)")
        logger.close()
        logger = MetricsLogger(run_dir, resume_step=step, tensorboard=cfg.run.tensorboard,
                               progress=cfg.run.progress, total_steps=t.steps, initial_step=step)
        logger.log(step, {"reload": reloads, "margin": margin}, kind="reload")
        window.update(t0=time.perf_counter(), tokens=0.0, losses=[], skipped=0, grad_norm=None)

    with _SignalFlag() as sig, setup.context():
        step = start_step
        try:
            while True:   # one pass; again after each on_nonfinite=reload
                try:
                    while step < t.steps:
                        batch = data_lib.train_batch(
                            corpus.train, corpus.train_doc_starts, step=step, seed=t.seed,
                            batch_size=t.batch_size, seq_len=cfg.data.seq_len,
                            packing=cfg.data.packing, rows=rows,
                            random_truncate=cfg.data.random_truncate)
                        state, metrics = setup.train_step(state, setup.shard_batch(batch))
                        step += 1
                        if pending is not None:
                            handle(*pending)
                        pending = (step, metrics)
                        if step_hook is not None:
                            step_hook(step)
                        stop = sig.signum    # read once: a signal may land at any point below
                        if (step % t.eval_every == 0 or step % t.checkpoint_every == 0
                                or step == t.steps or stop is not None):
                            # never evaluate or save a state not checked finite
                            handle(*pending)
                            pending = None
                        t_pause = time.perf_counter()
                        if step % t.eval_every == 0 or step == t.steps:
                            eval_row = evaluate(setup, state, corpus.val)
                            logger.log(step, eval_row, kind="eval")
                        if step % t.checkpoint_every == 0 or step == t.steps:
                            ckpt.save(step, state)
                        # eval/save: not training time
                        window["t0"] += time.perf_counter() - t_pause
                        if stop is not None:
                            if ckpt.latest_step() != step:
                                ckpt.save(step, state)
                            ckpt.wait()
                            name = signal.Signals(stop).name
                            raise Interrupted(f"{name} at step {step}: checkpoint saved to "
                                              f"{ckpt.directory}; continue with --resume", stop)
                    if pending is not None:
                        handle(*pending)
                        pending = None
                    break
                except _Reload as err:
                    reload(str(err))
            if not eval_row:          # resumed at the last step: report its evaluation
                eval_row = evaluate(setup, state, corpus.val)
        finally:
            ckpt.wait()
            ckpt.close()
            logger.close()
    already_finished = start_step >= t.steps
    if already_finished:
        last_loss, last_loss_step = _last_logged_loss(run_dir, start_step)
    return TrainResult(state, str(run_dir), step, last_loss, eval_row, unigram, skipped, setup,
                       already_finished, last_loss_step)
