"""Training: state and optimizer (by parameter role), the step, the loop, orbax checkpoints,
metrics (jsonl + TensorBoard), memory accounting and signal handling.

``from tfm_jax.train import build, train`` is the entry point; the loop lives in
:mod:`~tfm_jax.train.loop`.
"""

from tfm_jax.train.loop import (NonFiniteError, Interrupted, TrainState, lr_schedule,
    make_optimizer, input_mask, masked_ce_sum, nonfinite_flags, leaf_sumsq, make_train_step,
    make_eval_step, Setup, build, lowp_opt_specs, fp8_dot_line, evaluate, eval_span,
    describe_nonfinite, TrainResult, train)

