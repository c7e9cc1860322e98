"""Training: the state and its optimizer by parameter role (:mod:`~tfm_jax.train.state`), the
jitted steps (:mod:`~tfm_jax.train.step`), the set-up of a run (:mod:`~tfm_jax.train.setup`),
the loop (:mod:`~tfm_jax.train.loop`), orbax checkpoints, metrics (jsonl + TensorBoard) and
memory accounting.

``from tfm_jax.train import build, train`` is the entry point.
"""

from tfm_jax.train.loop import Interrupted, NonFiniteError, Trainer, TrainResult, train
from tfm_jax.train.setup import Setup, build, eval_positions, eval_span, evaluate, fp8_dot_line
from tfm_jax.train.state import TrainState, lowp_opt_specs, lr_schedule, make_optimizer
from tfm_jax.train.step import (describe_nonfinite, input_mask, leaf_sumsq, make_eval_step,
                                make_train_step, masked_ce_sum, nonfinite_flags)

__all__ = ["Interrupted", "NonFiniteError", "Setup", "TrainResult", "TrainState", "Trainer",
           "build", "describe_nonfinite", "eval_positions", "eval_span", "evaluate", "fp8_dot_line", "input_mask",
           "leaf_sumsq", "lowp_opt_specs", "lr_schedule", "make_eval_step", "make_optimizer",
           "make_train_step", "masked_ce_sum", "nonfinite_flags", "train"]
