"""Tokenized corpora from documents: any source of :mod:`tfm_jax.data.sources`, any tokenizer.

The cache layout is the byte corpus's (``<split>.tokens``, ``<split>.starts``, ``meta.json``
last) plus ``<split>.bytes``: the UTF-8 bytes each token stands for (uint16; EOS 0), so bits
per byte count the evaluated text exactly. The key covers the source's files (names, sizes,
mtimes), ``text_field``, ``val_fraction`` and the tokenizer's fingerprint. A document goes to
validation iff ``sha1(name) % 1000 < val_fraction * 1000``; if that leaves a split empty the
token stream is cut at ``1 - val_fraction`` instead ("by_tokens").
"""

from __future__ import annotations

import array
import hashlib
import itertools
import json
import os
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from tfm_jax.core.errors import DataError
from tfm_jax.data.cache import (_BYTES_DTYPE, _STARTS_DTYPE, FORMAT_VERSION, Corpus, _read_meta,
                                atomic_write, content_digest, open_cached)
from tfm_jax.data.tokenizer import Tokenizer

_BATCH_DOCS = 256            # documents tokenized per call (HF tokenizers batch in parallel)
_NAMES_KEPT = 1000           # document names listed in meta.json per split


def cache_key(parts: list, tok: Tokenizer, text_field: str, val_fraction: float) -> str:
    return hashlib.sha1(json.dumps([FORMAT_VERSION, "documents", float(val_fraction), text_field,
                                    tok.fingerprint, parts]).encode("utf-8")).hexdigest()[:24]


def _tokenize(docs: Iterable[tuple[str, str]], tok: Tokenizer
              ) -> Iterator[tuple[str, np.ndarray, np.ndarray, int]]:
    """(name, ids, bytes per id, utf-8 bytes) per document, EOS appended (0 bytes)."""
    eos = np.asarray([tok.eos_id], np.int64)
    batched = getattr(tok, "token_bytes_batch", None)
    it = iter(docs)
    while chunk := list(itertools.islice(it, _BATCH_DOCS)):
        names, texts = zip(*chunk)
        encoded = batched(list(texts)) if batched else [tok.token_bytes(t) for t in texts]
        for name, (ids, nbytes) in zip(names, encoded):
            yield (name, np.concatenate([ids.astype(np.int64), eos]),
                   np.concatenate([nbytes, [0]]), int(nbytes.sum()))


class _Split:
    """One split's token and byte streams, appended to temp files in ``out`` (memory does not
    grow with the corpus), then published (``commit``) or cut in two (``cut``)."""

    def __init__(self, out: Path, name: str, dtype: np.dtype):
        self.out, self.name, self.dtype = out, name, dtype
        self.tmp = {k: out / f".{name}.{k}.{os.getpid()}.tmp" for k in ("tokens", "bytes")}
        self.fh = {k: open(p, "wb") for k, p in self.tmp.items()}
        self.n, self.starts, self.names = 0, array.array("q"), []

    def add(self, name: str, ids: np.ndarray, nbytes: np.ndarray) -> None:
        self.starts.append(self.n)
        if len(self.names) < _NAMES_KEPT:
            self.names.append(name)
        self.fh["tokens"].write(ids.astype(self.dtype).tobytes())
        self.fh["bytes"].write(np.minimum(nbytes, 65535).astype(_BYTES_DTYPE).tobytes())
        self.n += ids.size

    def close(self) -> None:
        for f in self.fh.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()

    def commit(self) -> tuple[int, int, list]:
        for k, p in self.tmp.items():
            os.replace(p, self.out / f"{self.name}.{k}")
        atomic_write(self.out / f"{self.name}.starts", np.asarray(self.starts, _STARTS_DTYPE).tobytes())
        return self.n, len(self.starts), self.names

    def cut(self, at: int) -> dict[str, tuple[int, int, list]]:
        """Publishes tokens [0, at) as train and [at, n) as val (documents of both kept)."""
        for k, dt in (("tokens", self.dtype), ("bytes", _BYTES_DTYPE)):
            mm = np.memmap(self.tmp[k], dtype=dt, mode="r", shape=(self.n,))
            for split, part in (("train", mm[:at]), ("val", mm[at:])):
                with open(self.out / f".{split}.{k}.cut", "wb") as f:
                    for i in range(0, part.size, 1 << 24):     # 16 M tokens at a time
                        f.write(np.asarray(part[i:i + (1 << 24)]).tobytes())
                os.replace(self.out / f".{split}.{k}.cut", self.out / f"{split}.{k}")
            del mm
        starts = np.asarray(self.starts, _STARTS_DTYPE)
        head = starts[starts < at]
        tail = np.unique(np.concatenate([[0], starts[starts >= at] - at])).astype(_STARTS_DTYPE)
        atomic_write(self.out / "train.starts", head.tobytes())
        atomic_write(self.out / "val.starts", tail.tobytes())
        self.abort()
        return {"train": (at, head.size, self.names), "val": (self.n - at, tail.size,
                                                              self.names[-1:])}

    def abort(self) -> None:
        for f in self.fh.values():
            f.close()
        for p in self.tmp.values():
            p.unlink(missing_ok=True)


def build(out: Path, docs: Iterable[tuple[str, str]], tok: Tokenizer, val_fraction: float,
          label: str) -> dict:
    """Tokenizes ``docs`` into ``out`` (split as in the module docstring), streaming; returns
    its meta. Raises ``DataError`` when the source holds no document with text."""
    dtype = np.dtype("<u2") if tok.vocab_size <= 1 << 16 else np.dtype("<u4")
    out.mkdir(parents=True, exist_ok=True)
    splits = {s: _Split(out, s, dtype) for s in ("train", "val")}
    t0, n_docs, n_bytes = time.perf_counter(), 0, 0
    try:
        for name, ids, nbytes, size in _tokenize(docs, tok):
            if ids.size == 1:                      # empty text: EOS alone is no document
                continue
            split = ("val" if int(hashlib.sha1(name.encode()).hexdigest(), 16) % 1000
                     < val_fraction * 1000 else "train")
            splits[split].add(name, ids, nbytes)
            n_docs, n_bytes = n_docs + 1, n_bytes + size
        seconds = time.perf_counter() - t0
        for sp in splits.values():
            sp.close()
        if not n_docs:
            raise DataError(f"data source {label} holds no document with text; {_HINT}")
        if splits["train"].n and splits["val"].n:
            split, counts = "by_file", {s: sp.commit() for s, sp in splits.items()}
        else:                                      # one side empty: cut the token stream
            full = splits["train"] if splits["train"].n else splits["val"]
            if full.n < 2:
                raise DataError(f"data source {label} holds a single token; {_HINT}")
            at = min(max(round(full.n * (1.0 - val_fraction)), 1), full.n - 1)
            split, counts = "by_tokens", full.cut(at)
    finally:
        for sp in splits.values():
            sp.abort()
    total_tokens = sum(c[0] for c in counts.values())
    meta = {"format_version": FORMAT_VERSION, "source": label, "split": split,
            "token_dtype": dtype.str, "tokenizer": tok.name,
            "tokenize_seconds": seconds, "num_documents": n_docs, "num_bytes": n_bytes}
    for s, (n_tokens, n_starts, names) in counts.items():
        meta.update({f"num_{s}_tokens": n_tokens, f"num_{s}_docs": n_starts,
                     f"{s}_files": names})
    meta["summary"] = (f"tokenized {n_docs:,} documents ({n_bytes / 1e6:,.2f} MB) into "
                       f"{total_tokens:,} tokens with {tok.name} in {seconds:.2f} s: "
                       f"{total_tokens / max(seconds, 1e-9):,.0f} tokens/s, "
                       f"{n_bytes / 1e6 / max(seconds, 1e-9):,.2f} MB/s")
    meta["digest"] = content_digest(out, meta)
    atomic_write(out / "meta.json", json.dumps(meta).encode("utf-8"))
    return meta


_HINT = "point data.path at files with text (or check data.text_field)"


def open_corpus(out: Path, docs: Iterable[tuple[str, str]] | None, tok: Tokenizer,
                val_fraction: float, label: str) -> Corpus:
    """The cached corpus in ``out`` (built from ``docs`` first if absent or stale)."""
    meta = _read_meta(out)
    fresh = meta is None
    if fresh:
        if docs is None:
            raise DataError(f"no cached corpus in {out}")
        meta = build(out, docs, tok, val_fraction, label)
    return open_cached(out, {**meta, "tokenizer": meta.get("tokenizer", tok.name)}, label,
                       build_summary=meta["summary"] if fresh else "")
