"""``data.mixture``: several sources, each training row drawn from one of them by weight.

Every source is its own cached corpus (same tokenizer). Row ``i`` of global batch ``s`` comes
from source ``j`` with probability ``w_j / sum(w)`` (``default_rng([seed, s, 3])``), and is
row ``i`` of source ``j``'s own batch ``s`` -- so the batch stays a pure function of
``(seed, s)`` and per-process loading matches single-process loading. Validation (and the
unigram baseline) use all sources' held-out streams, concatenated.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Callable

import numpy as np

from tfm_jax.data.cache import Corpus


@dataclasses.dataclass(frozen=True, repr=False)
class Mixture(Corpus):
    """A :class:`Corpus` view of several (its streams: the concatenation) plus ``parts``."""

    parts: tuple[Corpus, ...] = ()
    weights: tuple[float, ...] = ()

    def __repr__(self) -> str:
        return f"Mixture({', '.join(f'{w:g} x {c!r}' for c, w in zip(self.parts, self.weights))})"


def combine(parts: list[Corpus], weights: list[float]) -> Mixture:
    def cat(arrays, offsets=None):
        arrays = [np.asarray(a) for a in arrays]
        if offsets is not None:
            arrays = [a + o for a, o in zip(arrays, offsets)]
        return np.concatenate(arrays) if arrays else np.zeros(0)

    def offsets(streams):
        return np.cumsum([0] + [int(s.shape[0]) for s in streams[:-1]])

    val_bytes = None
    if any(c.val_bytes is not None for c in parts):
        val_bytes = cat([c.val_bytes if c.val_bytes is not None else
                         (np.asarray(c.val) < 256).astype(np.uint16) for c in parts])
    summary = "; ".join(c.build_summary for c in parts if c.build_summary)
    return Mixture(
        train=cat([c.train for c in parts]), val=cat([c.val for c in parts]),
        train_doc_starts=cat([c.train_doc_starts for c in parts], offsets([c.train for c in parts])),
        val_doc_starts=cat([c.val_doc_starts for c in parts], offsets([c.val for c in parts])),
        train_files=sum((c.train_files for c in parts), ()),
        val_files=sum((c.val_files for c in parts), ()), split="mixture",
        source=" + ".join(f"{w:g} x {c.source}" for c, w in zip(parts, weights)),
        cache_dir=Path("mixture-" + "-".join(c.cache_dir.name for c in parts)),
        val_bytes=val_bytes, tokenizer=parts[0].tokenizer, build_summary=summary,
        parts=tuple(parts), weights=tuple(float(w) for w in weights),
        digest=hashlib.sha256(json.dumps([[c.digest, float(w)] for c, w in zip(parts, weights)]
                                         ).encode("utf-8")).hexdigest())


def mixed_batch(per_source: list[Callable[[int], dict]], weights: tuple[float, ...], *,
                step: int, seed: int, batch_size: int, rows: slice | None) -> dict:
    """Rows of global batch ``step`` (module docstring); ``per_source[j](step)`` gives source
    ``j``'s rows ``rows`` of its own batch ``step``."""
    from tfm_jax.data.batching import _select

    p = np.asarray(weights, np.float64) / np.sum(weights)
    pick = _select(np.random.default_rng([seed, step, 3]).choice(len(p), size=batch_size, p=p),
                   rows, batch_size)
    out = None
    for j in np.unique(pick):
        b = per_source[j](step)
        if out is None:
            out = {k: np.array(v) for k, v in b.items()}
        where = pick == j
        for k, v in b.items():
            out[k][where] = v[where]
    return out
