"""Training: the state and its optimizer by parameter role (:mod:`~tfm_jax.train.state`), the
jitted steps (:mod:`~tfm_jax.train.step`), the set-up of a run (:mod:`~tfm_jax.train.setup`),
the loop (:mod:`~tfm_jax.train.loop`), orbax checkpoints, metrics (jsonl + TensorBoard) and
memory accounting.

``from tfm_jax.train import build, train`` is the entry point. The package itself is callable:
``tfm_jax.train(config, ...)`` is the Python API's :func:`tfm_jax.api.train` (which returns a
:class:`~tfm_jax.tools.run.Run`), since ``tfm_jax.train`` names this package once it is imported.
"""

import sys
import types

from tfm_jax.train.loop import Interrupted, NonFiniteError, Trainer, TrainResult, train
from tfm_jax.train.setup import Setup, build, eval_positions, eval_span, evaluate, fp8_dot_line
from tfm_jax.train.state import TrainState, lowp_opt_specs, lr_schedule, make_optimizer
from tfm_jax.train.step import (describe_nonfinite, input_mask, leaf_sumsq, make_eval_step,
                                make_train_step, masked_ce_sum, nonfinite_flags)

__all__ = ["Interrupted", "NonFiniteError", "Setup", "TrainResult", "TrainState", "Trainer",
           "build", "describe_nonfinite", "eval_positions", "eval_span", "evaluate", "fp8_dot_line", "input_mask",
           "leaf_sumsq", "lowp_opt_specs", "lr_schedule", "make_eval_step", "make_optimizer",
           "make_train_step", "masked_ce_sum", "nonfinite_flags", "train"]


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        """``tfm_jax.train(config, *, overrides=None, out=None, resume=False) -> Run``: see
        :func:`tfm_jax.api.train`."""
        # Looked up at call time through the top-level package (which imports the API lazily):
        # the API sits above this layer, so this package does not import it.
        return getattr(sys.modules["tfm_jax"], "api").train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
