"""The training input pipeline: a deterministic, checkpointable iterator of this process's batches.

Batch ``s`` is a pure function of ``(seed, s)`` (:func:`tfm_jax.data.train_batch`, or the
``segments`` packer); the iterator over steps is grain's (``grain.MapDataset.range(...).map``
then ``to_iter_dataset``: background prefetch, ``get_state``/``set_state``). Each process
loads only its rows of the global batch (``process_rows``), so a multi-process run reads the
same global batch as one process. The iterator's state (``{"step": next step, "seed", "source"}``)
is written beside each checkpoint (``<checkpoints>/loader_state/<step>.json``) and checked on
resume, so an interrupted and resumed run reads exactly the batches of an uninterrupted one.
Without grain installed the same contract holds with a plain (non-prefetching) iterator.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from tfm_jax import data as data_lib
from tfm_jax.core.errors import DataError

STATE_DIR = "loader_state"


def batch_fn(corpus: data_lib.Corpus, data_cfg, *, seed: int, batch_size: int,
             rows: Optional[slice]) -> Callable[[int], dict[str, np.ndarray]]:
    """step -> this process's rows of global training batch ``step``."""
    from tfm_jax.data import mixture, packing

    mode = packing.mode_of(data_cfg.packing)
    if isinstance(corpus, mixture.Mixture):
        parts = [batch_fn(c, data_cfg, seed=seed, batch_size=batch_size, rows=rows)
                 for c in corpus.parts]
        return lambda step: mixture.mixed_batch(parts, corpus.weights, step=int(step), seed=seed,
                                                batch_size=batch_size, rows=rows)

    def make(step: int) -> dict[str, np.ndarray]:
        if mode == "segments":
            return packing.segment_batch(corpus.train, corpus.train_doc_starts, step=int(step),
                                         seed=seed, batch_size=batch_size,
                                         seq_len=data_cfg.seq_len, rows=rows)
        return data_lib.train_batch(   # looked up at call time (tests patch it)
            corpus.train, corpus.train_doc_starts, step=int(step), seed=seed,
            batch_size=batch_size, seq_len=data_cfg.seq_len, packing=mode == "concat",
            rows=rows, random_truncate=data_cfg.random_truncate)

    return make


class TrainLoader:
    """``next(loader)`` -> the batch of the next step; ``get_state()`` / ``set_state()``.

    ``seek(step)`` repositions (a reload after a non-finite step); ``source`` identifies the
    data (the corpus cache folder) so a resume on other data is refused."""

    def __init__(self, make: Callable[[int], dict], *, steps: int, seed: int, source: str,
                 start: int = 0, prefetch: int = 2):
        self.make, self.steps, self.seed, self.source = make, steps, seed, source
        self.prefetch = prefetch
        self.seek(start)

    def seek(self, step: int) -> None:
        self.step = int(step)
        try:
            import grain
        except ImportError:  # the same batches, loaded in the caller's thread
            self._it = None
            return
        ds = grain.MapDataset.range(self.step, max(self.steps, self.step)).map(self.make)
        self._it = iter(ds.to_iter_dataset(grain.ReadOptions(
            num_threads=1, prefetch_buffer_size=self.prefetch)))

    def __iter__(self) -> "TrainLoader":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.step >= self.steps:
            raise StopIteration
        batch = self.make(self.step) if self._it is None else next(self._it)
        self.step += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"step": self.step, "seed": self.seed, "source": self.source}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("seed") != self.seed or state.get("source") != self.source:
            raise DataError(f"the checkpoint's data loader read seed {state.get('seed')} of "
                            f"{state.get('source')}, this run seed {self.seed} of {self.source}: "
                            "resume with the run's own data and train.seed")
        self.seek(int(state["step"]))


def save_state(ckpt_dir: str | Path, step: int, state: dict[str, Any]) -> None:
    """Writes the loader state of checkpoint ``step`` (and drops those of deleted steps)."""
    folder = Path(ckpt_dir) / STATE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    from tfm_jax.core import rundir            # a run-directory write: never through a link
    rundir.atomic_write(folder / f"{step}.json", json.dumps(state))


def prune_states(ckpt_dir: str | Path, keep: list[int]) -> None:
    folder = Path(ckpt_dir) / STATE_DIR
    for f in folder.glob("*.json") if folder.is_dir() else []:
        if f.stem.isdigit() and int(f.stem) not in keep:
            f.unlink(missing_ok=True)


def load_state(ckpt_dir: str | Path, step: int) -> Optional[dict[str, Any]]:
    """The loader state saved with checkpoint ``step`` (None: a checkpoint written without one)."""
    f = Path(ckpt_dir) / STATE_DIR / f"{step}.json"
    try:
        return json.loads(f.read_text("utf-8"))
    except (OSError, ValueError):
        return None
