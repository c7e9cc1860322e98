"""orbax checkpoints of the whole train state.

Saves are asynchronous (the device->host copy is synchronous, the write happens in the
background) and atomic: orbax writes ``<step>.orbax-checkpoint-tmp-*`` and renames it to
``<step>`` only once complete, so a crash mid-save leaves a temporary folder that
:meth:`Checkpointer.latest_step` never returns (and that is cleaned up on the next start).

A checkpoint folder is checked before orbax touches it (:func:`tfm_jax.core.rundir.check_run_dir`):
a symbolic link inside it -- a step folder linked elsewhere -- is refused, since removing old
checkpoints would delete the link's target. ``read_only=True`` (the commands that only read a
run: eval, generate, convert, quantize, calibrate) opens it without creating, cleaning up or
deleting anything.
"""

from __future__ import annotations

import pathlib
from typing import Any, Optional

import orbax.checkpoint as ocp

from tfm_jax.core.errors import CheckpointMismatch  # noqa: F401  (re-exported)
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

    def save(self, step: int, state: Any) -> None:
        if self.read_only:
            raise RuntimeError(f"{self.directory} was opened read-only")
        self.manager.save(step, args=ocp.args.StandardSave(state), force=True)

    def restore(self, abstract_state: Any, step: Optional[int] = None) -> Any:
        """Restore into ``abstract_state``'s structure, dtypes and shardings (which may differ
        from the ones the checkpoint was saved with)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        self._check_shapes(step, abstract_state)
        try:
            return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointMismatch(
                f"checkpoint {self.directory}/{step} does not match the configured model "
                f"(was it written with a different model.* config?): {err}") from err

    def _check_shapes(self, step: int, abstract_state: Any) -> None:
        """Compare the checkpoint's metadata (names and shapes, no array read) with the
        configured state, so a mismatch is reported before orbax starts any asynchronous read
        (a failing restore leaves reader threads that print tracebacks at exit)."""
        try:   # the manager's single unnamed item lives in <step>/default
            meta = ocp.StandardCheckpointHandler().metadata(self.directory / str(step) /
                                                            "default")
        except Exception:  # noqa: BLE001 -- no readable metadata: let restore decide
            return
        saved = _shapes(getattr(meta, "tree", meta))
        wanted = _shapes(abstract_state)
        if not saved:
            return
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

    def wait(self) -> None:
        if self._manager is not None:
            self._manager.wait_until_finished()

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()
            self._manager = None


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
        return ckpt.restore(abstract_state)
    finally:
        ckpt.close()


def _shapes(tree: Any) -> dict[str, tuple]:
    """``{"params/embed/embedding": shape}`` for every array-like leaf (dataclass fields and dict
    keys alike, so a saved TrainState and its abstract twin give the same names)."""
    import jax

    from tfm_jax.core.roles import path_names

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(path_names(p)): tuple(x.shape) for p, x in leaves if hasattr(x, "shape")}
