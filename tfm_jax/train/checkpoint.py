"""orbax checkpoints of the whole train state.

Saves are asynchronous (the device->host copy is synchronous, the write happens in the
background) and atomic: orbax writes ``<step>.orbax-checkpoint-tmp-*`` and renames it to
``<step>`` only once complete, so a crash mid-save leaves a temporary folder that
:meth:`Checkpointer.latest_step` never returns (and that is cleaned up on the next start).

A damaged step (a truncated or corrupt file: unreadable metadata, a failed array read) raises
:class:`~tfm_jax.core.errors.CheckpointDamaged` naming the step folder and the cause; a restore
of "the latest" step falls back to the newest intact one and says so (stderr), deleting nothing.

A checkpoint folder is checked before orbax touches it (:func:`tfm_jax.core.rundir.check_run_dir`):
a symbolic link inside it -- a step folder linked elsewhere -- is refused, since removing old
checkpoints would delete the link's target. ``read_only=True`` (the commands that only read a
run: eval, generate, convert, quantize, calibrate) opens it without creating, cleaning up or
deleting anything.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import sys
from typing import Any, Callable, Optional

import orbax.checkpoint as ocp

from tfm_jax.core.errors import CheckpointDamaged, CheckpointMismatch  # noqa: F401
from tfm_jax.core.rundir import check_run_dir


class Checkpointer:
    def __init__(self, directory: pathlib.Path | str, *, keep: int = 2, async_save: bool = True,
                 read_only: bool = False):
        self.directory = pathlib.Path(directory).absolute()
        self._manager: Optional[ocp.CheckpointManager] = None
        self._keep, self._async, self.read_only = keep, async_save, read_only

    @property
    def manager(self) -> ocp.CheckpointManager:
        if self._manager is None:
            check_run_dir(self.directory)          # no links for orbax to follow or delete
            with _quiet_orbax():     # read-only: two absl warnings that say what we asked for
                if self.read_only:
                    options = ocp.CheckpointManagerOptions(
                        read_only=True, create=False, cleanup_tmp_directories=False,
                        enable_async_checkpointing=False, save_root_metadata=False)
                else:
                    options = ocp.CheckpointManagerOptions(
                        max_to_keep=self._keep, enable_async_checkpointing=self._async,
                        cleanup_tmp_directories=True, create=True)
                self._manager = ocp.CheckpointManager(self.directory, options=options)
            if not self.read_only:
                _await_tmp_cleanup(self._manager)
        return self._manager

    def latest_step(self) -> Optional[int]:
        if not self.directory.exists():
            return None
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps()) if self.directory.exists() else []

    def save(self, step: int, state: Any, *, optimizer: bool = True) -> None:
        """Save ``state`` (a TrainState) as ``step``. ``optimizer=False`` writes a
        parameters-only checkpoint (``opt_state`` stored as None): what ``tfm-jax import-hf``
        writes, whose restore (:meth:`restore`) returns ``opt_state`` None for the caller to
        build fresh (:meth:`tfm_jax.train.setup.Setup.restore`)."""
        if self.read_only:
            raise RuntimeError(f"{self.directory} was opened read-only")
        if not optimizer:
            state = state.replace(opt_state=None)
        self.manager.save(step, args=ocp.args.StandardSave(state), force=True)

    def restore(self, abstract_state: Any, step: Optional[int] = None, *,
                say: Optional[Callable[[str], None]] = None) -> Any:
        """Restore into ``abstract_state``'s structure, dtypes and shardings (which may differ
        from the ones the checkpoint was saved with).

        ``step`` None: the newest step that reads back; a damaged newer step is skipped with one
        line through ``say`` (default: stderr) naming it and the cause. ``restored_step`` and
        ``damaged_steps`` say what happened. A given ``step`` that is damaged raises
        :class:`CheckpointDamaged`; a tree that does not match raises
        :class:`CheckpointMismatch` (never skipped: every step of a run has the same tree).
        A parameters-only step (``save(..., optimizer=False)``) comes back with ``opt_state``
        None and ``fresh_optimizer`` True."""
        self.damaged_steps: list[int] = []
        self.fresh_optimizer = False
        if step is not None:
            state = self._restore_step(step, abstract_state)
            self.restored_step = step
            return state
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        causes = []
        for s in steps:
            try:
                state = self._restore_step(s, abstract_state)
            except CheckpointDamaged as err:
                self.damaged_steps.append(s)
                causes.append(str(err))
                continue
            if causes:
                (say or _stderr)(f"{'; '.join(causes)}; restored step {s} instead, the newest "
                                 "intact one (nothing was deleted; --step N picks a step)")
            self.restored_step = s
            return state
        raise CheckpointDamaged(f"no intact checkpoint under {self.directory}: "
                                f"{'; '.join(causes)}")

    def set_aside_after(self, step: int) -> list[pathlib.Path]:
        """Rename the step folders after ``step`` -- damaged ones ``<n>.damaged``, intact ones
        ``<n>.superseded`` -- so a run continued from ``step`` can save those steps again;
        orbax ignores (and never deletes) such names. Returns the new paths."""
        damaged = set(getattr(self, "damaged_steps", []))
        later = [s for s in self.all_steps() if s > step]
        moved = []
        for s in later:
            base = self.directory / f"{s}.{'damaged' if s in damaged else 'superseded'}"
            target, i = base, 1
            while target.exists():
                target, i = base.with_name(f"{base.name}.{i}"), i + 1
            os.rename(self.directory / str(s), target)
            moved.append(target)
        if moved:
            self.close()            # the manager lists its steps once: open it again
        return moved

    def _restore_step(self, step: int, abstract_state: Any) -> Any:
        where = self.directory / str(step)
        if not where.is_dir():
            raise FileNotFoundError(f"no checkpoint {where} (steps here: "
                                    f"{', '.join(map(str, self.all_steps())) or 'none'})")
        if self._check_shapes(step, abstract_state):      # parameters only: no optimizer state
            abstract_state = abstract_state.replace(opt_state=None)
            self.fresh_optimizer = True
        try:
            with _quiet_orbax():
                return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
        except Exception as err:  # noqa: BLE001 -- names and shapes matched: the files are bad
            _drop_aborted_read_noise()
            raise CheckpointDamaged(f"checkpoint {where} is damaged ({_cause(err)})") from err

    def _check_shapes(self, step: int, abstract_state: Any) -> bool:
        """Compare the checkpoint's metadata (names and shapes, no array read) with the
        configured state, so a mismatch is reported before orbax starts any asynchronous read
        (a failing restore leaves reader threads that print tracebacks at exit). True when the
        step holds no optimizer state (saved with ``optimizer=False``) and the configured
        state has one: the comparison then leaves the optimizer out."""
        try:   # the manager's single unnamed item lives in <step>/default
            with _quiet_orbax():
                meta = ocp.StandardCheckpointHandler().metadata(self.directory / str(step) /
                                                                "default")
        except Exception as err:  # noqa: BLE001 -- a step folder without readable metadata
            _drop_aborted_read_noise()
            raise CheckpointDamaged(f"checkpoint {self.directory / str(step)} is damaged: its "
                                    f"metadata does not read ({_cause(err)})") from err
        tree = getattr(meta, "tree", meta)
        params_only = (isinstance(tree, dict) and "opt_state" in tree
                       and tree["opt_state"] is None
                       and getattr(abstract_state, "opt_state", None) is not None)
        saved = _shapes(tree)
        wanted = _shapes(abstract_state.replace(opt_state=None) if params_only
                         else abstract_state)
        if not saved:
            return params_only
        problems = [f"{k}: checkpoint {saved[k]}, configured {wanted[k]}"
                    for k in wanted if k in saved and saved[k] != wanted[k]]
        problems += [f"{k}: not in the checkpoint" for k in wanted if k not in saved]
        problems += [f"{k}: in the checkpoint, not in the configured model"
                     for k in saved if k not in wanted]
        if problems:
            more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
            raise CheckpointMismatch(
                f"checkpoint {self.directory}/{step} does not match the configured model (was it "
                f"written with a different model.* config?): {'; '.join(problems[:5])}{more}")
        return params_only

    def wait(self) -> None:
        if self._manager is not None:
            self._manager.wait_until_finished()

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()
            self._manager = None


def _drop_aborted_read_noise() -> None:
    """After a failed read, tensorstore callbacks of the aborted reads may still try to reach the
    (closed) asyncio loop orbax ran them on; Python reports each as an "unraisable"
    ``RuntimeError: Event loop is closed`` traceback, dozens of them, at random points. Those
    (and only those) are dropped once a damaged checkpoint was reported."""
    previous = sys.unraisablehook
    if getattr(previous, "_tfm_jax", False):
        return

    def hook(unraisable):
        if not (unraisable.exc_type is RuntimeError
                and str(unraisable.exc_value) == "Event loop is closed"):
            previous(unraisable)

    hook._tfm_jax = True
    sys.unraisablehook = hook


def _stderr(msg: str) -> None:
    print(f"tfm-jax: {msg}", file=sys.stderr, flush=True)


def _cause(err: BaseException) -> str:
    """The first line of the innermost message of ``err``'s chain, shortened."""
    while err.__cause__ is not None and str(err.__cause__).strip():
        err = err.__cause__
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return text if len(text) <= 200 else text[:197] + "..."


@contextlib.contextmanager
def _quiet_orbax():
    """orbax logs (through absl) what it was asked to do and, on a failed read, the reader's
    traceback; the caller reports the outcome in one line instead."""
    loggers = [logging.getLogger(n) for n in ("absl", "orbax")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def _await_tmp_cleanup(manager: ocp.CheckpointManager) -> None:
    """Wait until the manager has removed the ``*.orbax-checkpoint-tmp*`` folders of an
    interrupted save. orbax (0.11+) does it in a background thread and waits only before its
    own next save (a private method, ``_maybe_await_cleanup_tmp_directory``, the one this module
    uses: tests/unit/platform/test_provenance.py fails when orbax renames it); a second manager
    on the same directory (a probe, then the run's own) would
    then remove the same folders concurrently and one ``rmtree`` fails (FileNotFoundError) --
    seen in CI after a crash mid-save. Older orbax versions clean up in the constructor: then
    there is nothing to wait for."""
    wait = getattr(manager, "_maybe_await_cleanup_tmp_directory", None)
    if callable(wait):
        wait()


def restore_latest(ckpt_dir: pathlib.Path, abstract_state: Any, *, what: str,
                   fix: str = "train the source run first") -> Any:
    """The latest checkpoint under ``ckpt_dir`` restored into ``abstract_state``'s structure and
    shardings; FileNotFoundError (``what``: the command, ``fix``: what to do) when there is none.
    The one restore of a finished run by the tools that read one (convert, quantize,
    calibrate)."""
    ckpt = Checkpointer(ckpt_dir, read_only=True)
    try:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"{what}: no checkpoint under {ckpt_dir}; {fix}")
        return ckpt.restore(abstract_state, say=lambda m: _stderr(f"{what}: {m}"))
    finally:
        ckpt.close()


def _shapes(tree: Any) -> dict[str, tuple]:
    """``{"params/embed/embedding": shape}`` for every array-like leaf (dataclass fields and dict
    keys alike, so a saved TrainState and its abstract twin give the same names)."""
    import jax

    from tfm_jax.core.roles import path_names

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(path_names(p)): tuple(x.shape) for p, x in leaves if hasattr(x, "shape")}
