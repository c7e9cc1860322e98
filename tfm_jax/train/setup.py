"""Set-up of a run: mesh, model, optimizer, sharded state and the compiled steps
(:func:`build`), and evaluation on the validation tokens."""

from __future__ import annotations

import contextlib
import math
import dataclasses
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tfm_jax import data as data_lib
from tfm_jax.config import Config, ConfigError, check_runtime
from tfm_jax.core import telemetry
from tfm_jax.layers.ops import Ops
from tfm_jax.model import TransformerLM
from tfm_jax.parallel import mesh as mesh_lib
from tfm_jax.platform import backends
from tfm_jax.train.state import TrainState, lowp_opt_specs, make_optimizer
from tfm_jax.train.step import make_eval_step, make_train_step


@dataclasses.dataclass(frozen=True)
class _PlatformOnly:
    """A stand-in device for :func:`build`'s ``ops_platform`` (the op set reads the platform)."""
    platform: str


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
    opt_init: Callable            # params -> a fresh optimizer state, placed (jitted)

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

    def eval_state(self, state: TrainState) -> TrainState:
        """``state`` as :attr:`eval_step` takes it: without the optimizer state (evaluation
        never reads it; a run restored without one needs none)."""
        return state.replace(opt_state=None)

    def restore(self, ckpt: Any, step: Optional[int] = None, *,
                say: Optional[Callable[[str], None]] = None, optimizer: bool = True) -> TrainState:
        """Checkpoint ``step`` (default: the newest intact one) of ``ckpt`` (a
        :class:`~tfm_jax.train.checkpoint.Checkpointer`) in this setup's structure and shardings.
        A parameters-only checkpoint (written by ``tfm-jax import-hf``) gets a fresh optimizer
        state built here from its parameters when ``optimizer`` (``ckpt.fresh_optimizer`` then
        says so); ``optimizer=False`` leaves ``opt_state`` None for callers that only read the
        parameters."""
        state = ckpt.restore(self.abstract_state(), step=step, say=say)
        if state.opt_state is None and optimizer:
            with self.context():
                state = state.replace(opt_state=self.opt_init(state.params))
        return state

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        """The train step's batch as shapes (with its sharding): what lowering the step from
        shapes alone (memory plans, HLO checks, ``tfm-jax inspect``) passes for it."""
        cfg = self.cfg
        return {k: jax.ShapeDtypeStruct((cfg.train.batch_size, cfg.data.seq_len),
                                        jnp.float32 if k == "mask" else jnp.int32,
                                        sharding=self.batch_sharding)
                for k in data_lib.batch_keys(cfg.data.packing)}

    def shard_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return data_lib.shard_batch(batch, self.batch_sharding, self.cfg.train.batch_size)


def build(cfg: Config, devices: Optional[list] = None, ops: Optional[Ops] = None, *,
          ops_platform: Optional[str] = None) -> Setup:
    """Mesh, model, optimizer, state shardings and jitted steps for ``cfg``. ``ops``: the ops
    set to use instead of the devices' own (:func:`tfm_jax.platform.backends.resolve_ops`);
    ``ops_platform`` (e.g. ``"gpu"``): the set that platform would resolve. Both serve to lower
    a GPU run's step on CPU and read its HLO (:func:`tfm_jax.tools.inspect.lower_step`,
    :mod:`tfm_jax.quant.hlo_check`)."""
    devices = list(jax.devices() if devices is None else devices)
    check_runtime(cfg, len(devices))
    mesh = mesh_lib.make_mesh(cfg.mesh, devices)
    rules = mesh_lib.rules_tuple(cfg.mesh.rules)
    if ops is None:
        ops = backends.resolve_ops(cfg, devices if ops_platform is None else
                                   [_PlatformOnly(ops_platform)] * len(devices))
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

    def opt_init(params):
        if cfg.quant.fp8_weight_storage:   # moments of FP8 kernels: float, as the view
            from tfm_jax.quant import storage
            return tx.init(storage.dequantized_view(params))
        return tx.init(params)

    def init_fn(rng) -> TrainState:
        variables = nn.meta.unbox(init_boxed(rng))
        params = variables.pop("params")
        if calibration is not None:      # fp8_static: the scales of the calibration file
            params = fp8.apply_calibration(params, calibration)
        return TrainState(jnp.zeros((), jnp.int32), params, variables, opt_init(params))

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
    train_keys = data_lib.batch_keys(cfg.data.packing)   # + segment ids/positions (segments)
    train_shardings = {k: batch_sharding for k in train_keys}

    train_step = jax.jit(make_train_step(cfg, model, tx),
                         in_shardings=(state_shardings, train_shardings),
                         out_shardings=(state_shardings, None), donate_argnums=0)
    eval_shardings = state_shardings.replace(opt_state=None)     # (Setup.eval_state)
    eval_step = jax.jit(make_eval_step(model), in_shardings=(eval_shardings, batch_shardings))
    jit_init = jax.jit(init_fn, out_shardings=state_shardings)
    jit_opt_init = jax.jit(opt_init, in_shardings=(state_shardings.params,),
                           out_shardings=state_shardings.opt_state)
    return Setup(cfg, mesh, rules, model, tx, state_shardings, batch_sharding, train_step,
                 eval_step, jit_init, ops, jit_opt_init)


def fp8_dot_line(setup: Setup, state: TrainState) -> str:
    """Whether the compiled train step runs FP8 GEMMs (native) or upcasts (emulated), from its
    HLO (:func:`tfm_jax.quant.fp8.fp8_dot_mode`); one line for the run log."""
    from tfm_jax.quant import fp8

    with setup.context():
        text = setup.train_step.lower(state, setup.abstract_batch()).compile().as_text()
    return fp8.describe_dot_mode(fp8.fp8_dot_mode(text), setup.mesh.devices.flat[0].platform)


def evaluate(setup: Setup, state: TrainState, val_tokens: np.ndarray) -> dict[str, float]:
    """Mean validation loss (nats/token) and perplexity over ``train.eval_batches`` batches.
    The batches are dispatched back to back and fetched once at the end (no host round trip
    per batch); the sums are taken on the host in float64, as before."""
    cfg = setup.cfg
    eval_state = setup.eval_state(state)
    sums = []                    # device scalars: no host sync per batch, one at the end
    with setup.context():
        for batch in data_lib.eval_batches(val_tokens, batch_size=cfg.train.batch_size,
                                           seq_len=cfg.data.seq_len,
                                           max_batches=cfg.train.eval_batches,
                                           rows=data_lib.process_rows(cfg.train.batch_size)):
            sums.append(setup.eval_step(eval_state, setup.shard_batch(batch)))
    host = jax.device_get(sums)  # [(loss sum, tokens)] per batch
    total = math.fsum(float(s) for s, _ in host)
    count = math.fsum(float(n) for _, n in host)
    val_loss = total / max(count, 1.0)
    return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)),
            "val_tokens": int(count)}


def eval_positions(cfg: Config, val_tokens: np.ndarray) -> np.ndarray:
    """Positions in the val stream of the target tokens :func:`evaluate` scores."""
    starts = data_lib.eval_window_starts(val_tokens, batch_size=cfg.train.batch_size,
                                         seq_len=cfg.data.seq_len,
                                         max_batches=cfg.train.eval_batches)
    return (starts[:, None] + np.arange(1, cfg.data.seq_len + 1)).ravel()


def eval_span(cfg: Config, val_tokens: np.ndarray) -> np.ndarray:
    """The validation tokens :func:`evaluate` scores (its baseline must use the same text): the
    target tokens of every evaluation window."""
    starts = data_lib.eval_window_starts(val_tokens, batch_size=cfg.train.batch_size,
                                         seq_len=cfg.data.seq_len,
                                         max_batches=cfg.train.eval_batches)
    return np.asarray(val_tokens)[(starts[:, None] + np.arange(1, cfg.data.seq_len + 1)).ravel()]
