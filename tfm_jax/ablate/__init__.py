"""The generic ablation runner: ``tfm-jax ablate experiments/<name>.yaml``.

An experiment file (:mod:`tfm_jax.ablate.spec`) names a base config, variants (override sets),
seeds, extra per-run measurements (:mod:`tfm_jax.ablate.measurements`, a registry of plain
functions), plots and the claims to judge. :func:`run_experiment`
(:mod:`tfm_jax.ablate.runner`) trains every (variant, seed) as a normal run under
``runs/ablate/<name>/<variant>/seed<k>`` (resumable), then writes ``results.json``,
``results.md`` (mean ± std over seeds, the claims table) and PNG plots
(:mod:`tfm_jax.ablate.report`, :mod:`tfm_jax.ablate.plots`).
"""

from tfm_jax.ablate.measurements import MEASUREMENTS, RunContext, Series, register
# The component probes (normalization, FFN, heads) register themselves in MEASUREMENTS.
from tfm_jax.ablate import probes as _probes  # noqa: F401
from tfm_jax.ablate.spec import Experiment, ExperimentError, load_experiment

__all__ = ["MEASUREMENTS", "Experiment", "ExperimentError", "RunContext", "Series",
           "load_experiment", "register", "run_experiment"]


def run_experiment(*args, **kwargs):
    """:func:`tfm_jax.ablate.runner.run_experiment` (imported on first use: it needs jax)."""
    from tfm_jax.ablate.runner import run_experiment as run

    return run(*args, **kwargs)
