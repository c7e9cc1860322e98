"""Run telemetry: ``metrics.jsonl``, TensorBoard event files, optionally Weights & Biases (the
same scalars, ``run.wandb``) and a progress bar.

Only process 0 writes, without following links (:mod:`tfm_jax.core.rundir`). On resume, rows past the resumed step are dropped (from the JSONL file and,
via ``purge_step``, from TensorBoard), so a resumed run's logs read as one uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import pathlib
from typing import Any, Optional

import jax
from tqdm.auto import tqdm

from tfm_jax.config import ConfigError
from tfm_jax.core import rundir

WANDB_MISSING = ("run.wandb={mode} needs the wandb package: pip install 'tfm-jax[track]' "
                 "(or set run.wandb=false)")


def require_wandb(mode) -> None:
    """One line (ConfigError) if ``run.wandb`` is set and ``wandb`` is not installed."""
    if mode:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError(WANDB_MISSING.format(mode=mode)) from None


def _open_wandb(run_dir: pathlib.Path, mode: str, project: str, name: Optional[str],
                config: Optional[dict]):
    """A wandb run for this run directory: its id derives from the directory, so a resumed
    run (or a reloaded logger) continues the same wandb run. Files go under <run dir>/wandb
    unless $WANDB_DIR says otherwise."""
    require_wandb(mode)
    import wandb

    run_id = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]
    return wandb.init(project=project, name=name or run_dir.name, id=run_id, resume="allow",
                      mode=mode, config=config, dir=os.environ.get("WANDB_DIR") or str(run_dir),
                      settings=wandb.Settings(console="off", silent=True))


def _truncate_jsonl(path: pathlib.Path, last_step: int) -> None:
    if not path.exists() and not path.is_symlink():
        return
    if path.is_symlink():                 # never read or rewrite a link's target
        rundir.atomic_write(path, b"")    # raises RunDirError
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= last_step]
    rundir.atomic_write(path, "".join(line + "\n" for line in keep))


class MetricsLogger:
    def __init__(self, run_dir: pathlib.Path, *, resume_step: int = 0, tensorboard: bool = True,
                 progress: bool = True, total_steps: int = 0, initial_step: int = 0,
                 wandb: Any = False, wandb_project: str = "tfm-jax",
                 wandb_config: Optional[dict] = None, wandb_name: Optional[str] = None):
        self.enabled = jax.process_index() == 0
        self.path = pathlib.Path(run_dir) / "metrics.jsonl"
        self._tb = None
        self._wandb = None
        self._bar = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step:
            _truncate_jsonl(self.path, resume_step)
        elif self.path.exists():
            self.path.unlink()
        self._file = rundir.open_append(self.path)     # refuses a symbolic link
        if tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(pathlib.Path(run_dir) / "events"),
                                     purge_step=resume_step or None)
        if wandb:
            self._wandb = _open_wandb(pathlib.Path(run_dir), wandb, wandb_project, wandb_name,
                                      wandb_config)
        # The bar opens at start_progress() (or the first row), after the run's header lines.
        # Only on a terminal: in a log file a bar is a stream of redraws, so there each row is
        # one plain line instead (``progress`` False: neither).
        self._progress, self._total = progress, total_steps
        self._bar_args = (dict(total=total_steps, initial=initial_step, unit="step",
                               dynamic_ncols=True, desc="train")
                          if progress and sys.stderr.isatty() else None)

    def start_progress(self) -> None:
        """Open the progress bar (a no-op without one, or once open)."""
        if self.enabled and self._bar is None and self._bar_args is not None:
            self._bar = tqdm(**self._bar_args)

    def log(self, step: int, row: dict[str, Any], kind: str = "train",
            nullable: tuple[str, ...] = ()) -> None:
        """Append ``row`` at ``step``. Keys whose value is None are left out, except those in
        ``nullable``, written as JSON null (e.g. a train row's loss when every step of its
        window was skipped)."""
        if not self.enabled:
            return
        row = {"step": step, **{k: v for k, v in row.items() if v is not None or k in nullable}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        scalars = {f"{kind}/{k}": v for k, v in row.items()
                   if k != "step" and isinstance(v, (int, float))}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None and scalars:
            self._wandb.log(scalars, step=step)
        self.start_progress()
        if self._bar is not None:
            # postfix first, then the update that redraws: the bar shows this window's row
            if kind == "train":
                post = {"loss": "n/a" if row.get("loss") is None else f"{row['loss']:.3f}"}
                if row.get("skipped"):
                    post["skipped"] = str(row["skipped"])
                if row.get("tokens_per_s") is not None:
                    post["tok/s"] = f"{row['tokens_per_s']:.0f}"
                if row.get("mfu") is not None:
                    post["mfu"] = f"{100 * row['mfu']:.1f}%"
                self._bar.set_postfix(post, refresh=False)
            self._bar.update(step - self._bar.n)
        if kind == "train" and self._bar is None and self._progress:
            self.info(f"step {step}/{self._total}: " + ", ".join(
                [f"loss {'n/a' if row.get('loss') is None else format(row['loss'], '.4f')}"]
                + ([f"tok/s {row['tokens_per_s']:,.0f}"] if row.get("tokens_per_s") else [])
                + ([f"mfu {100 * row['mfu']:.1f}%"] if row.get("mfu") else [])))
        elif kind != "train" and (self._bar is not None or self._progress):
            self.info(f"step {step}: " + ", ".join(
                f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                for k, v in row.items() if k != "step"))

    def info(self, msg: str) -> None:
        if self.enabled:
            (self._bar.write if self._bar is not None else print)(msg)

    warn = info

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._file.close()


def read_metrics(run_dir: str | pathlib.Path) -> list[dict[str, Any]]:
    """All rows of a run's ``metrics.jsonl``."""
    path = pathlib.Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
