"""``data.packing``: how documents become rows of a batch.

* ``concat`` (``true``): rows are windows of the document stream (documents separated by EOS);
* ``pad`` (``false``): one document per row, padded and masked;
* ``segments``: whole documents packed first-fit into rows, each with its segment id (1, 2, ...
  per row; 0 = padding) and its own positions 0, 1, ...; attention (every core) and the loss
  stay inside each document.

A ``segments`` document is its EOS-prefixed tokens (the EOS before it is the "document start"
context, as in the stream) up to and including its own EOS: inputs ``[EOS, d0 .. dn-1]``,
targets ``[d0 .. dn-1, EOS]``, so no target belongs to another document. Batch ``s`` is a pure
function of ``(seed, s)``: documents are drawn uniformly (``default_rng([seed, s, 2])``) and
placed in the first row with room; a document that fits in no row is cut to fill the row
with the most room (so every row ends full). Documents longer than a row are cut to it.
"""

from __future__ import annotations

import numpy as np

from tfm_jax.core.errors import DataError

MODES = ("concat", "segments", "pad")


def mode_of(packing) -> str:
    """``data.packing`` (a mode, or the booleans of earlier configs) -> a mode name."""
    if packing is True:
        return "concat"
    if packing is False:
        return "pad"
    if packing not in MODES:
        raise DataError(f"data.packing={packing!r}: expected one of {', '.join(MODES)}")
    return packing


def first_fit(lengths_iter, batch_size: int, seq_len: int) -> list[list[tuple[int, int]]]:
    """Packs pieces first-fit: ``lengths_iter`` yields (doc, length); returns per row the
    (doc, kept length) placed in it, in order, stopping once every row is full."""
    rows: list[list[tuple[int, int]]] = [[] for _ in range(batch_size)]
    room = np.full(batch_size, seq_len, np.int64)
    for doc, length in lengths_iter:
        length = min(length, seq_len)
        fits = np.flatnonzero(room >= length)
        r = int(fits[0]) if fits.size else int(np.argmax(room))
        keep = min(length, int(room[r]))
        rows[r].append((doc, keep))
        room[r] -= keep
        if not room.any():
            break
    return rows


def segment_batch(tokens: np.ndarray, doc_starts: np.ndarray, *, step: int, seed: int,
                  batch_size: int, seq_len: int, rows: slice | None = None,
                  eos_id: int | None = None) -> dict[str, np.ndarray]:
    """Global batch ``step`` packed by documents (module docstring). Returns ``inputs``,
    ``targets`` int32 (R, T), ``mask`` float32 (R, T) (1 on real targets), ``segment_ids``
    int32 (R, T) (0 on padding) and ``positions`` int32 (R, T) (restart at 0 per document)."""
    from tfm_jax.data.batching import _select

    n = int(tokens.shape[0])
    starts = np.asarray(doc_starts, np.int64)
    if starts.size == 0 or n < 2:
        raise DataError("data.packing=segments needs documents, but the stream holds none")
    if step < 0 or seed < 0:
        raise DataError(f"step and seed must be non-negative, got step={step}, seed={seed}")
    ends = np.append(starts[1:], n)                                 # doc i: [start, end), EOS last
    eos = int(tokens[n - 1]) if eos_id is None else eos_id          # every document ends in EOS
    rng = np.random.default_rng([seed, step, 2])

    def draws():
        while True:
            for doc in rng.integers(0, starts.size, size=max(batch_size, 16)):
                yield int(doc), int(ends[doc] - starts[doc])        # targets = doc + its EOS

    packed = first_fit(draws(), batch_size, seq_len)
    sel = _select(np.arange(batch_size), rows, batch_size)
    out = {k: np.zeros((sel.size, seq_len), np.int32)
           for k in ("inputs", "targets", "segment_ids", "positions")}
    for i, r in enumerate(sel):
        col = 0
        for seg, (doc, keep) in enumerate(packed[r], start=1):
            body = np.asarray(tokens[starts[doc]:starts[doc] + keep], np.int32)
            out["inputs"][i, col] = eos
            out["inputs"][i, col + 1:col + keep] = body[:keep - 1]
            out["targets"][i, col:col + keep] = body
            out["segment_ids"][i, col:col + keep] = seg
            out["positions"][i, col:col + keep] = np.arange(keep)
            col += keep
    out["mask"] = (out["segment_ids"] > 0).astype(np.float32)
    pad = out["segment_ids"] == 0
    out["inputs"][pad] = eos
    out["targets"][pad] = eos
    return out
