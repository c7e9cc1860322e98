"""Batches from a token stream: stateless training rows (a pure function of seed and step),
evaluation windows, this process's rows and global arrays."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import numpy as np

from tfm_jax.core.errors import DataError
from tfm_jax.data.tokenizer import ByteTokenizer

if TYPE_CHECKING:  # pragma: no cover
    import jax

PAD_ID, BOS_ID, EOS_ID = ByteTokenizer.PAD_ID, ByteTokenizer.BOS_ID, ByteTokenizer.EOS_ID


# ----------------------------------------------------------------------------- batching


def _check_sizes(tokens: np.ndarray, batch_size: int, seq_len: int, split: str) -> int:
    n = int(tokens.shape[0])
    if batch_size < 1 or seq_len < 1:
        raise DataError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
    if seq_len >= n:
        fix = "data.val_fraction" if split == "validation" else "1 - data.val_fraction"
        raise DataError(f"{split} split too small: data.seq_len={seq_len} must be smaller than its "
                        f"{n} tokens; use a shorter seq_len, a larger corpus or a larger {fix}")
    return n


def _select(x: np.ndarray, rows: slice | None, batch_size: int) -> np.ndarray:
    if rows is None:
        return x
    start = 0 if rows.start is None else rows.start
    stop = batch_size if rows.stop is None else rows.stop
    if rows.step not in (None, 1) or not 0 <= start <= stop <= batch_size:
        raise DataError(f"rows={rows} must be a contiguous slice of the global batch of {batch_size}")
    return x[rows]


def _as_batch(windows: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    return {"inputs": np.ascontiguousarray(windows[:, :-1], np.int32),
            "targets": np.ascontiguousarray(windows[:, 1:], np.int32),
            "mask": np.ascontiguousarray(mask, np.float32)}


def train_batch(tokens: np.ndarray, doc_starts: np.ndarray, *, step: int, seed: int, batch_size: int,
                seq_len: int, packing: bool = True, rows: slice | None = None,
                random_truncate: float = 0.0) -> dict[str, np.ndarray]:
    """Global training batch number ``step``: a pure function of (seed, step) via
    ``np.random.default_rng([seed, step])``.

    packing=True: each row is a window of ``seq_len + 1`` consecutive stream tokens with a
    uniform start in [0, N - seq_len - 1]; mask is all ones.
    packing=False: each row is BOS + a uniformly chosen document (EOS included), truncated
    to ``seq_len + 1`` and padded with PAD; mask is 1 where the *target* is a real token.

    ``rows`` (a contiguous slice of the global batch) returns exactly those rows of the
    full batch; every row's start is drawn first, so per-process loading matches
    single-process loading.

    ``random_truncate`` = f in (0, 1) (packing only): each row keeps a uniform random number
    of targets in [ceil((1 - f) * T), T] and is PAD (masked) after it -- variable-length,
    right-padded rows from a corpus whose documents are longer than T (the normalization
    study's padded batches). The lengths come from their own stream, so the windows are the
    same as without truncation.

    Returns ``{"inputs": int32 (R, T), "targets": int32 (R, T), "mask": float32 (R, T)}``
    with ``targets[:, t] == inputs[:, t + 1]``, T = seq_len, R = rows selected (default B).
    """
    n = _check_sizes(tokens, batch_size, seq_len, "train")
    if step < 0 or seed < 0:
        raise DataError(f"step and seed must be non-negative, got step={step}, seed={seed}")
    if not 0.0 <= random_truncate < 1.0:
        raise DataError(f"random_truncate={random_truncate} must be in [0, 1)")
    if random_truncate and not packing:
        raise DataError("random_truncate applies to packed rows; with packing=False rows are "
                        "already documents padded to seq_len (set one of the two)")
    rng = np.random.default_rng([seed, step])
    if packing:
        starts = _select(rng.integers(0, n - seq_len, size=batch_size), rows, batch_size)
        windows = tokens[starts[:, None] + np.arange(seq_len + 1)]
        if not random_truncate:
            return _as_batch(windows, np.ones((starts.size, seq_len), np.float32))
        low = int(np.ceil((1.0 - random_truncate) * seq_len))
        lengths = _select(np.random.default_rng([seed, step, 1]).integers(
            max(low, 1), seq_len + 1, size=batch_size), rows, batch_size)       # (R,)
        real = np.arange(seq_len) < lengths[:, None]                           # (R, T)
        # target t = window[t + 1]: PAD from target `length` on (inputs > length are PAD)
        windows = np.where(np.concatenate([np.ones_like(real[:, :1]), real], axis=1),
                           windows, PAD_ID)
        return _as_batch(windows, real)
    doc_starts = np.asarray(doc_starts, np.int64)
    if doc_starts.size == 0:
        raise DataError("packing=False needs document starts, but doc_starts is empty")
    doc = _select(rng.integers(0, doc_starts.size, size=batch_size), rows, batch_size)
    begin = doc_starts[doc]
    end = np.where(doc + 1 < doc_starts.size, doc_starts[np.minimum(doc + 1, doc_starts.size - 1)], n)
    offsets = np.arange(seq_len)
    real = offsets < np.minimum(end - begin, seq_len)[:, None]        # (R, T)
    body = np.where(real, tokens[np.minimum(begin[:, None] + offsets, n - 1)], PAD_ID)
    windows = np.concatenate([np.full((doc.size, 1), BOS_ID), body], axis=1)
    return _as_batch(windows, real)  # target t is body[t]: masked exactly where it is padding


def eval_window_starts(tokens: np.ndarray, *, batch_size: int, seq_len: int,
                       max_batches: int | None) -> np.ndarray:
    """Start offsets (num_batches * batch_size,) of the evaluation windows.

    The stream is cut into non-overlapping slots of ``seq_len`` tokens; the windows are spread
    evenly over all slots (``slot_i = floor(i * slots / needed)``), so a capped evaluation still
    samples the whole validation split, not only its first files. When every full batch is
    used (``max_batches`` None or large enough) the windows are consecutive from the start.
    Raises ``DataError`` if fewer slots than one batch exist.
    """
    n = _check_sizes(tokens, batch_size, seq_len, "validation")
    num_windows = (n - 1) // seq_len
    if num_windows < batch_size:
        raise DataError(f"validation split too small: {n} tokens = {num_windows} windows of seq_len={seq_len}, "
                        f"fewer than one eval batch of {batch_size}; use a smaller batch size or "
                        f"seq_len, or a larger data.val_fraction")
    all_batches = num_windows // batch_size
    num_batches = all_batches if max_batches is None else min(all_batches, max_batches)
    needed = num_batches * batch_size
    if num_batches == all_batches:            # every full batch: consecutive from the start
        return np.arange(needed, dtype=np.int64) * seq_len
    return (np.arange(needed, dtype=np.int64) * num_windows) // needed * seq_len


def eval_batches(tokens: np.ndarray, *, batch_size: int, seq_len: int, max_batches: int | None,
                 rows: slice | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Deterministic evaluation batches over ``tokens`` (the val stream).

    Row r of batch b holds inputs ``tokens[s : s + seq_len]`` and targets shifted by one, with
    ``s = eval_window_starts(...)[b * batch_size + r]``: non-overlapping windows spread over the
    whole stream (consecutive when all of them are used). At most ``max_batches`` full batches
    (None: all). ``rows`` selects a contiguous subset of each batch as in ``train_batch``.
    Raises ``DataError`` (eagerly) if the stream holds fewer than ``batch_size`` windows.
    """
    starts_all = eval_window_starts(tokens, batch_size=batch_size, seq_len=seq_len,
                                    max_batches=max_batches)
    num_batches = starts_all.size // batch_size
    offsets = np.arange(seq_len + 1)
    first = _select(np.arange(batch_size), rows, batch_size)

    def generate() -> Iterator[dict[str, np.ndarray]]:
        for b in range(num_batches):
            starts = starts_all[b * batch_size + first]
            windows = tokens[starts[:, None] + offsets]
            yield _as_batch(windows, np.ones((starts.size, seq_len), np.float32))

    return generate()


def process_rows(global_batch_size: int) -> slice:
    """Contiguous rows of the global batch that this process loads: block
    ``jax.process_index()`` of ``jax.process_count()`` equal blocks. Assumes the usual
    mesh layout where each process's devices hold one contiguous block of the batch."""
    import jax

    count, index = jax.process_count(), jax.process_index()
    if global_batch_size % count:
        raise DataError(f"global batch size {global_batch_size} is not divisible by the "
                        f"{count} processes; choose a multiple of {count}")
    per = global_batch_size // count
    return slice(index * per, (index + 1) * per)


def shard_batch(batch: dict[str, np.ndarray], sharding: "jax.sharding.NamedSharding",
                global_batch_size: int) -> dict[str, "jax.Array"]:
    """Assembles global ``jax.Array``s of shape (global_batch_size, ...) from this process's
    rows (``batch`` as returned with ``rows=process_rows(global_batch_size)``)."""
    import jax

    leading = {k: np.shape(v)[0] for k, v in batch.items()}
    if len(set(leading.values())) > 1:
        raise DataError(f"batch arrays disagree on their number of rows: {leading}")
    return {k: jax.make_array_from_process_local_data(
                sharding, np.asarray(v), (global_batch_size,) + np.shape(v)[1:])
            for k, v in batch.items()}
