"""The training loop: resume, the steps, logging, evaluation, checkpoints, non-finite policy,
signals. :class:`Trainer` holds the loop's state explicitly; :func:`train` runs one.

Resume is exact: the data pipeline is a pure function of ``(seed, step)`` and the state (params,
optimizer moments, BatchNorm statistics, step) is restored whole from an orbax checkpoint.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from typing import Callable, Optional

import jax
import numpy as np

from tfm_jax import data as data_lib
from tfm_jax.data import loader as loader_lib
from tfm_jax.config import Config, ConfigError, check_runtime, check_trainable
from tfm_jax.core import interrupts, rundir, telemetry
from tfm_jax.model import count_params, train_flops_per_token
from tfm_jax.platform import backends
from tfm_jax.train.checkpoint import CheckpointMismatch, Checkpointer
from tfm_jax.train.metrics import MetricsLogger, read_metrics, require_wandb
from tfm_jax.train.setup import Setup, build, eval_positions, eval_span, evaluate, fp8_dot_line
from tfm_jax.train.state import TrainState
from tfm_jax.train.step import _jit_nonfinite_flags, describe_nonfinite


class NonFiniteError(FloatingPointError):
    """Loss or gradients became NaN/inf and ``train.on_nonfinite`` is ``stop``."""


class _Reload(Exception):
    """Internal: a non-finite step under ``train.on_nonfinite=reload`` (message: what failed)."""


class Interrupted(RuntimeError):
    """SIGINT/SIGTERM received; a checkpoint was saved. ``signum`` says which."""

    def __init__(self, msg: str, signum: int):
        super().__init__(msg)
        self.signum = signum


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    run_dir: str
    final_step: int
    # The run's "final train loss", one definition everywhere (console, metrics.jsonl, resume,
    # ablation measurements): the mean loss of the last log window with a finite step, i.e. the
    # last train row of metrics.jsonl; ``last_loss_step`` is that row's step.
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


def train(cfg: Config, *, resume: bool = False, resume_step: Optional[int] = None,
          devices: Optional[list] = None,
          corpus: Optional[data_lib.Corpus] = None,
          step_hook: Optional[Callable[[int], None]] = None,
          init_from: Optional[str] = None, init_step: Optional[int] = None,
          allow_corpus_change: bool = False) -> TrainResult:
    """Run training as configured; writes the run directory. ``step_hook(step)`` is called after
    each step (tests use it to inject interruptions). A resume on a corpus other than the one
    the run recorded (``corpus.json``) stops unless ``allow_corpus_change``."""
    backends.configure(cfg.backend)
    check_trainable(cfg)
    require_wandb(cfg.run.wandb)                  # run.wandb without wandb: one line, now
    check_runtime(cfg, len(jax.devices() if devices is None else devices))   # before any I/O
    # The run directory is data (tfm_jax.core.rundir): a new run only goes into a missing or
    # empty folder or a tfm-jax run, with no links inside; one process at a time trains it.
    rundir.claim_output_dir(cfg.run_dir, "run directory")
    # (a resume of a folder that does not exist fails in open(), creating nothing)
    lock = (rundir.RunLock(cfg.run_dir) if jax.process_index() == 0
            and (not resume or cfg.run_dir.is_dir()) else None)
    if lock is not None:
        lock.acquire()
    ckpt = Checkpointer(cfg.run_dir / "checkpoints", keep=cfg.train.keep_checkpoints,
                        async_save=cfg.train.async_checkpoint)
    try:   # closed on every exit: an orbax manager left open prints asyncio tracebacks at exit
        trainer = Trainer(cfg, ckpt, devices, step_hook)
        trainer.init_from, trainer.init_step = init_from, init_step
        trainer.open(resume, corpus, resume_step, allow_corpus_change)
        return trainer.run()
    finally:
        ckpt.close()
        if lock is not None:
            lock.release()


@dataclasses.dataclass
class _Window:
    """What one log window accumulates (reset after each train row)."""
    t0: float = dataclasses.field(default_factory=time.perf_counter)
    tokens: float = 0.0
    losses: list = dataclasses.field(default_factory=list)
    skipped: int = 0
    grad_norm: Optional[float] = None


class Trainer:
    """One training run's loop, its state held explicitly.

    :meth:`open` restores or initializes the state and writes the run header; :meth:`run` steps
    until ``train.steps`` (or a signal), handling each step's metrics one step behind the device
    (:meth:`_handle`), evaluating and checkpointing on schedule, and on a non-finite step under
    ``train.on_nonfinite=reload`` reloading the last checkpoint with a larger FP8 margin
    (:meth:`_reload`)."""

    def __init__(self, cfg: Config, ckpt: Checkpointer, devices: Optional[list],
                 step_hook: Optional[Callable[[int], None]] = None):
        self.cfg, self.ckpt, self.devices, self.step_hook = cfg, ckpt, devices, step_hook
        self.run_dir = cfg.run_dir
        self.t = cfg.train
        self.skipped, self.reloads = 0, 0
        self.last_loss, self.last_loss_step = float("nan"), None
        self.eval_row: dict = {}
        self.window = _Window()
        self.pending: Optional[tuple[int, dict]] = None
        # a new run's parameters from another run (train --init-from; fresh optimizer)
        self.init_from: Optional[str] = None
        self.init_step: Optional[int] = None

    # ---------------------------------------------------------------------------------- start

    def open(self, resume: bool, corpus: Optional[data_lib.Corpus],
             resume_step: Optional[int] = None, allow_corpus_change: bool = False) -> None:
        """Check the run directory, load the corpus, build, restore or initialize the state,
        write config.yaml and the run header."""
        cfg, ckpt, run_dir = self.cfg, self.ckpt, self.run_dir
        if not resume and ckpt.latest_step() is not None:
            raise FileExistsError(
                f"run directory {run_dir} already has checkpoints (latest step "
                f"{ckpt.latest_step()}); pass --resume to continue it, or choose another run.dir")
        if resume and ckpt.latest_step() is None:
            raise FileNotFoundError(_nothing_to_resume(cfg, ckpt.directory))
        self.tokenizer = data_lib.load_tokenizer(
            None if cfg.data.tokenizer == "none" else cfg.data.tokenizer)
        data_lib.check_vocab(self.tokenizer, cfg.model.vocab_size)
        self.corpus = corpus or data_lib.corpus_for(cfg.data, self.tokenizer)
        self.resume_notes: list[str] = []
        self.corpus_changed = False
        if resume:       # the data must be the run's (before anything is built or written)
            recorded = data_lib.run_corpus(run_dir)
            note = data_lib.check_fingerprint(recorded, self.corpus.fingerprint,
                                              what="--resume", allow=allow_corpus_change)
            if note:
                self.resume_notes.append(note)
            self.corpus_changed = recorded is not None and bool(note)
        self.setup = build(cfg, self.devices)
        if cfg.train.memory_check:           # before any state is allocated
            from tfm_jax.train import memory

            too_big = memory.check_fits(self.setup)
            if too_big:
                raise ConfigError(too_big)
        self.start_step = 0
        if resume:
            # Restore before writing anything: a resume with an incompatible config must leave
            # the run directory (its config.yaml above all) exactly as it was.
            try:
                self.state = self.setup.restore(ckpt, step=resume_step,
                                                say=self.resume_notes.append)
            except CheckpointMismatch as err:
                diff = _model_diff(run_dir / "config.yaml", cfg)
                raise CheckpointMismatch(
                    f"{err}" + (f"\n  differences from the run's config.yaml: {'; '.join(diff)}"
                                if diff else "")) from None
            self.start_step = int(self.state.step)
            moved = ckpt.set_aside_after(self.start_step)
            if moved:
                self.resume_notes.append(
                    f"checkpoints after step {self.start_step} set aside (kept, not deleted; the "
                    f"run continues from step {self.start_step}): "
                    + ", ".join(f"{p.parent.name}/{p.name}" for p in moved))
            if ckpt.fresh_optimizer:
                self.resume_notes.append(
                    f"checkpoint {self.start_step} holds parameters only (e.g. written by "
                    "'tfm-jax import-hf'): the optimizer state starts fresh")
            interrupts.note(f"before training resumed from step {self.start_step}; the run's "
                            "checkpoints are unchanged")
            # the count goes on from the resumed run's last train row (exact when the resumed
            # step was a log step; skips after the last row were not recorded)
            self.skipped = _last_train_row(run_dir, self.start_step).get("skipped", 0)
        elif self.init_from is not None:
            from tfm_jax.train import init_from as init_from_lib
            self.state = init_from_lib.init_state(self.setup, self.init_from, self.init_step,
                                                  self.devices)
            self.resume_notes.append(f"parameters from {self.init_from} (fresh optimizer "
                                     "state, step 0)")
        else:
            self.state = self.setup.init_state()
        self.step = self.start_step
        self.loader = self._open_loader(resume)
        run_dir.mkdir(parents=True, exist_ok=True)
        rundir.atomic_write(run_dir / "config.yaml", cfg.to_yaml())
        data_lib.tokenizer.copy_into(self.tokenizer, run_dir)    # eval/generate/convert read it
        if jax.process_index() == 0:
            data_lib.record_run_corpus(run_dir, self.corpus.fingerprint, self.start_step)
        self.param_paths = [jax.tree_util.keystr(p, simple=True, separator="/")
                            for p, _ in jax.tree_util.tree_flatten_with_path(self.state.params)[0]]
        self.flops_tok = train_flops_per_token(cfg.model, cfg.data.seq_len, cfg.moe)
        self.peak, peak_source = backends.peak_flops_info(
            cfg, n_devices=len(self.setup.mesh.devices.flat))
        self.unigram = data_lib.unigram_entropy(self.corpus.train, eval_span(cfg, self.corpus.val),
                                                vocab_size=self.tokenizer.vocab_size)
        # UTF-8 bytes of the evaluated text: every evaluation also reports bits per byte
        self.eval_bytes = self.corpus.bytes_of(eval_positions(cfg, self.corpus.val))
        self.rows = data_lib.process_rows(self.t.batch_size)
        self.logger = self._new_logger(self.start_step)
        if jax.process_index() == 0:          # what this run (or this resume) ran with
            import json

            from tfm_jax.platform import environment
            rundir.atomic_write(run_dir / "environment.json", json.dumps(
                environment.provenance(self.setup.ops.describe(),
                                       list(self.setup.mesh.devices.flat)), indent=1) + "\n")
        self._header(peak_source)
        self.logger.start_progress()

    def _open_loader(self, resume: bool) -> "loader_lib.TrainLoader":
        """This process's batches from ``start_step`` on; on resume the iterator state saved
        with the checkpoint (checked against this run's data and seed)."""
        t = self.t
        make = loader_lib.batch_fn(self.corpus, self.cfg.data, seed=t.seed,
                                   batch_size=t.batch_size,
                                   rows=data_lib.process_rows(t.batch_size))
        loader = loader_lib.TrainLoader(make, steps=t.steps, seed=t.seed,
                                        source=self.corpus.cache_dir.name, start=self.start_step)
        saved = loader_lib.load_state(self.ckpt.directory, self.start_step) if resume else None
        if saved is not None and not self.corpus_changed:   # (a new corpus: from start_step)
            loader.set_state(saved)
        return loader

    def _new_logger(self, step: int) -> MetricsLogger:
        run = self.cfg.run
        return MetricsLogger(self.run_dir, resume_step=step, tensorboard=run.tensorboard,
                             progress=run.progress, total_steps=self.t.steps,
                             initial_step=step, wandb=run.wandb, wandb_project=run.wandb_project,
                             wandb_config=self.cfg.to_dict(), wandb_name=run.name)

    def _header(self, peak_source: str) -> None:
        cfg, corpus, setup, log = self.cfg, self.corpus, self.setup, self.logger
        from tfm_jax.train import memory

        log.info(f"run dir {self.run_dir} | params {count_params(cfg.model, cfg.moe)['total']:,} "
                 f"| mesh {dict(setup.mesh.shape)} | corpus {corpus.num_train_tokens:,} train / "
                 f"{corpus.num_val_tokens:,} val tokens | unigram baseline {self.unigram:.3f} nats")
        if corpus.build_summary:
            log.info(corpus.build_summary)
        if corpus.skipped_files:
            log.info(f"corpus {corpus.source}: {corpus.skipped_summary()}")
        if self.start_step:
            log.info(f"resumed from step {self.start_step} of {cfg.train.steps} "
                     f"({self.ckpt.directory / str(self.start_step)})")
        for note in self.resume_notes:     # (a fresh run has none; --init-from: one)
            log.info(note)
        log.info(f"kernels: {setup.ops.describe()}")
        if cfg.train.warmup_steps > cfg.train.steps:
            log.info(f"train.warmup_steps={cfg.train.warmup_steps} exceeds train.steps="
                     f"{cfg.train.steps}: the warmup is clamped to {cfg.train.steps} steps")
        log.info(memory.summary_line(memory.state_bytes(self.state)))
        if cfg.quant.fp8:
            log.info(fp8_dot_line(setup, self.state))
        log.info(f"MFU peak: {self.peak / 1e9:,.1f} GFLOP/s ({peak_source})")

    # ----------------------------------------------------------------------------------- loop

    def run(self) -> TrainResult:
        """Train to ``train.steps``; again from the reloaded state after each non-finite step
        under ``on_nonfinite=reload``. Closes the checkpointer's pending saves and the logger."""
        with _SignalFlag() as sig, self.setup.context():
            try:
                while True:
                    try:
                        self._steps(sig)
                        break
                    except _Reload as err:
                        self._reload(str(err))
                if not self.eval_row:       # resumed at the last step: report its evaluation
                    self.eval_row = self._evaluate()
            finally:
                self.ckpt.wait()
                self.ckpt.close()
                self.logger.close()
        already_finished = self.start_step >= self.t.steps
        if already_finished:
            self.last_loss, self.last_loss_step = _last_logged_loss(self.run_dir,
                                                                    self.start_step)
        return TrainResult(self.state, str(self.run_dir), self.step, self.last_loss,
                           self.eval_row, self.unigram, self.skipped, self.setup,
                           already_finished, self.last_loss_step)

    def _steps(self, sig: "_SignalFlag") -> None:
        t, cfg, ckpt = self.t, self.cfg, self.ckpt
        while self.step < t.steps:
            if self.loader.step != self.step:      # reloaded from a checkpoint
                self.loader.seek(self.step)
            batch = next(self.loader)
            self.state, metrics = self.setup.train_step(self.state, self.setup.shard_batch(batch))
            self.step += 1
            step = self.step
            if self.pending is not None:
                self._handle(*self.pending)
            self.pending = (step, metrics)
            if self.step_hook is not None:
                self.step_hook(step)
            stop = sig.signum    # read once: a signal may land at any point below
            evaluate_now = step % t.eval_every == 0 or step == t.steps
            save_now = step % t.checkpoint_every == 0 or step == t.steps
            if evaluate_now or save_now or stop is not None:
                self._flush()    # never evaluate or save a state not checked finite
            t_pause = time.perf_counter()
            if evaluate_now:
                self.eval_row = self._evaluate()
                self.logger.log(step, self.eval_row, kind="eval")
            if save_now:
                self._save(step)
            self.window.t0 += time.perf_counter() - t_pause      # eval/save: not training time
            if stop is not None:
                if ckpt.latest_step() != step:
                    self._save(step)
                ckpt.wait()
                raise Interrupted(f"{signal.Signals(stop).name} at step {step}: checkpoint saved "
                                  f"to {ckpt.directory}; continue with --resume", stop)
        self._flush()

    def _evaluate(self) -> dict:
        """The validation row: loss, perplexity, tokens and bits per byte (``val_bpb``)."""
        row = evaluate(self.setup, self.state, self.corpus.val)
        if self.eval_bytes:
            row["val_bpb"] = data_lib.bits_per_byte(row["val_loss"], row["val_tokens"],
                                                    self.eval_bytes)
        return row

    def _save(self, step: int) -> None:
        """Checkpoint ``step`` with the loader state beside it (the batches it has handed out)."""
        loader_lib.save_state(self.ckpt.directory, step, self.loader.get_state())
        self.ckpt.save(step, self.state)
        loader_lib.prune_states(self.ckpt.directory, self.ckpt.all_steps() + [step])

    def _flush(self) -> None:
        if self.pending is not None:
            self._handle(*self.pending)
            self.pending = None

    def _handle(self, step_done: int, m: dict) -> None:
        """Host-side handling of step ``step_done``'s metrics (one step behind the device).

        Every log step writes a train row, also when steps were skipped (``on_nonfinite=skip``):
        ``loss`` is the mean over the window's finite steps (null if none), ``skipped`` the
        count since the start of the run. The console gets the first skipped step in full and
        then one line per log window that skipped any."""
        t, w = self.t, self.window
        m = jax.device_get(m)
        if step_done == self.start_step + 1:      # includes compilation: keep out of tokens/s
            w.t0 = time.perf_counter()
        if not bool(m["finite"]):
            self._nonfinite(step_done, m)
        else:
            w.losses.append(float(m["loss"]))
            w.grad_norm = float(m["grad_norm"])
            if step_done != self.start_step + 1:
                w.tokens += float(m["tokens"])
        if step_done % t.log_every == 0 or step_done == t.steps:
            self._log_window(step_done, m)

    def _nonfinite(self, step_done: int, m: dict) -> None:
        """A non-finite step: stop, reload (raises :class:`_Reload`) or count it as skipped."""
        # Parameters at detection time (one step later: a failing step keeps the state, so they
        # are the failing step's unless the following step succeeded).
        param_flags = jax.device_get(_jit_nonfinite_flags(self.state.params))
        msg = f"non-finite loss/gradients at step {step_done}: " + describe_nonfinite(
            m, param_flags, self.param_paths)
        if self.t.on_nonfinite == "reload":
            raise _Reload(msg)
        if self.t.on_nonfinite == "stop":
            raise NonFiniteError(msg + ". Lower train.lr, enable train.grad_clip, or set "
                                 "train.on_nonfinite=skip. Last good checkpoint: "
                                 f"{self.ckpt.latest_step()}")
        self.skipped += 1
        self.window.skipped += 1
        if self.skipped == 1:
            self.logger.warn(msg + " (update skipped; further skipped steps are counted per log "
                             "window and in metrics.jsonl's 'skipped')")

    def _log_window(self, step_done: int, m: dict) -> None:
        w = self.window
        dt = time.perf_counter() - w.t0
        tps = w.tokens / dt if w.tokens else None
        if w.skipped and self.skipped > 1:
            self.logger.warn(f"step {step_done}: {w.skipped} step(s) skipped (non-finite) in "
                             f"this log window, {self.skipped} in all")
        if w.losses:
            self.last_loss, self.last_loss_step = float(np.mean(w.losses)), step_done
        self.logger.log(step_done, {
            "loss": float(np.mean(w.losses)) if w.losses else None,
            "lr": float(m["lr"]), "grad_norm": w.grad_norm, "tokens_per_s": tps,
            "mfu": tps * self.flops_tok / self.peak if (self.peak and tps) else None,
            "skipped": self.skipped,
            **telemetry.flatten(m.get("telemetry", {}))},   # whatever was sown, by path
            nullable=("loss",))
        self.window = _Window()

    def _reload(self, msg: str) -> None:
        """on_nonfinite=reload: the last checkpoint (or a fresh init if none), quant.margin + 1,
        config.yaml rewritten (a later --resume keeps the margin), metrics.jsonl cut back to
        the reloaded step, one warning and a ``reload`` row."""
        t = self.t
        if self.reloads >= t.max_reloads:
            raise NonFiniteError(f"{msg}. train.on_nonfinite=reload: {self.reloads} reload(s) "
                                 f"done, train.max_reloads={t.max_reloads} reached; lower "
                                 "train.lr or raise quant.margin")
        self.reloads += 1
        self.ckpt.wait()
        margin = self.cfg.quant.margin + 1
        cfg = self.cfg.model_copy(update={"quant": self.cfg.quant.model_copy(
            update={"margin": margin})})
        self.cfg, self.setup = cfg, build(cfg, self.devices)
        latest = self.ckpt.latest_step()
        self.state = (self.setup.init_state() if latest is None
                      else self.setup.restore(self.ckpt))
        self.step, self.pending = int(self.state.step), None
        rundir.atomic_write(self.run_dir / "config.yaml", cfg.to_yaml())
        where = (f"checkpoint {latest}" if latest is not None
                 else "the initial state (no checkpoint yet)")
        self.logger.warn(f"{msg}; reloaded {where} with quant.margin={margin} (reload "
                         f"{self.reloads} of at most {t.max_reloads}, train.on_nonfinite=reload)")
        self.logger.close()
        self.logger = self._new_logger(self.step)
        self.logger.log(self.step, {"reload": self.reloads, "margin": margin}, kind="reload")
        self.window = _Window()
