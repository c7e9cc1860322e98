"""orbax checkpoints of the whole train state.

Saves are asynchronous (the device->host copy is synchronous, the write happens in the
background) and atomic: orbax writes ``<step>.orbax-checkpoint-tmp-*`` and renames it to
``<step>`` only once complete, so a crash mid-save leaves a temporary folder that
:meth:`Checkpointer.latest_step` never returns (and that is cleaned up on the next start).
"""

from __future__ import annotations

import pathlib
from typing import Any, Optional

import orbax.checkpoint as ocp

from tfm_jax.errors import CheckpointMismatch  # noqa: F401  (re-exported)


class Checkpointer:
    def __init__(self, directory: pathlib.Path | str, *, keep: int = 2, async_save: bool = True):
        self.directory = pathlib.Path(directory).absolute()
        self._manager: Optional[ocp.CheckpointManager] = None
        self._keep, self._async = keep, async_save

    @property
    def manager(self) -> ocp.CheckpointManager:
        if self._manager is None:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=self._keep, enable_async_checkpointing=self._async,
                cleanup_tmp_directories=True, create=True)
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        return self._manager

    def latest_step(self) -> Optional[int]:
        if not self.directory.exists():
            return None
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps()) if self.directory.exists() else []

    def save(self, step: int, state: Any) -> None:
        self.manager.save(step, args=ocp.args.StandardSave(state), force=True)

    def restore(self, abstract_state: Any, step: Optional[int] = None) -> Any:
        """Restore into ``abstract_state``'s structure, dtypes and shardings (which may differ
        from the ones the checkpoint was saved with)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        try:
            return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointMismatch(
                f"checkpoint {self.directory}/{step} does not match the configured model "
                f"(was it written with a different model.* config?): {err}") from err

    def wait(self) -> None:
        if self._manager is not None:
            self._manager.wait_until_finished()

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()
            self._manager = None
