"""Tokenized corpora from documents: any source of :mod:`tfm_jax.data.sources`, any tokenizer.

The cache layout is the byte corpus's (``<split>.tokens``, ``<split>.starts``, ``meta.json``
last) plus ``<split>.bytes``: the UTF-8 bytes each token stands for (uint16; EOS 0), so bits
per byte count the evaluated text exactly. The key covers the source's files (names, sizes,
mtimes), ``text_field``, ``val_fraction`` and the tokenizer's fingerprint. A document goes to
validation iff ``sha1(name) % 1000 < val_fraction * 1000``; if that leaves a split empty the
token stream is cut at ``1 - val_fraction`` instead ("by_tokens").
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from tfm_jax.core.errors import DataError
from tfm_jax.data.cache import (_STARTS_DTYPE, FORMAT_VERSION, Corpus, _read_meta, atomic_write,
                                token_dtype)
from tfm_jax.data.tokenizer import Tokenizer

_BYTES_DTYPE = np.dtype("<u2")
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


def build(out: Path, docs: Iterable[tuple[str, str]], tok: Tokenizer, val_fraction: float,
          label: str) -> dict:
    """Tokenizes ``docs`` into ``out`` (split as in the module docstring); returns its meta.

    Raises ``DataError`` when the source holds no document with text."""
    dtype = np.dtype("<u2") if tok.vocab_size <= 1 << 16 else np.dtype("<u4")
    parts: dict[str, dict] = {s: {"ids": [], "bytes": [], "starts": [], "names": [], "n": 0}
                              for s in ("train", "val")}
    t0, n_docs, n_bytes = time.perf_counter(), 0, 0
    for name, ids, nbytes, size in _tokenize(docs, tok):
        if ids.size == 1:                      # empty text: EOS alone is no document
            continue
        split = ("val" if int(hashlib.sha1(name.encode()).hexdigest(), 16) % 1000
                 < val_fraction * 1000 else "train")
        p = parts[split]
        p["starts"].append(p["n"])
        if len(p["names"]) < _NAMES_KEPT:
            p["names"].append(name)
        p["ids"].append(ids.astype(dtype))
        p["bytes"].append(np.minimum(nbytes, 65535).astype(_BYTES_DTYPE))
        p["n"] += ids.size
        n_docs, n_bytes = n_docs + 1, n_bytes + size
    seconds = time.perf_counter() - t0
    if not n_docs:
        raise DataError(f"data source {label} holds no document with text; {_HINT}")
    streams = {s: (np.concatenate(p["ids"]) if p["ids"] else np.zeros(0, dtype),
                   np.concatenate(p["bytes"]) if p["bytes"] else np.zeros(0, _BYTES_DTYPE),
                   np.asarray(p["starts"], _STARTS_DTYPE), p["names"]) for s, p in parts.items()}
    split = "by_file"
    if not (streams["train"][0].size and streams["val"][0].size):   # one side empty: cut
        split = "by_tokens"
        ids, nbytes, starts, names = streams["train"] if streams["train"][0].size else streams["val"]
        total = ids.size
        if total < 2:
            raise DataError(f"data source {label} holds a single token; {_HINT}")
        cut = min(max(round(total * (1.0 - val_fraction)), 1), total - 1)
        head = starts[starts < cut]
        tail = np.concatenate([[0], starts[starts >= cut] - cut]).astype(_STARTS_DTYPE)
        streams = {"train": (ids[:cut], nbytes[:cut], head, names),
                   "val": (ids[cut:], nbytes[cut:], np.unique(tail), names[-1:])}
    total_tokens = sum(v[0].size for v in streams.values())
    out.mkdir(parents=True, exist_ok=True)
    for s, (ids, nbytes, starts, _) in streams.items():
        atomic_write(out / f"{s}.tokens", ids.tobytes())
        atomic_write(out / f"{s}.bytes", nbytes.tobytes())
        atomic_write(out / f"{s}.starts", starts.tobytes())
    meta = {"format_version": FORMAT_VERSION, "source": label, "split": split,
            "token_dtype": dtype.str, "tokenizer": tok.name,
            "tokenize_seconds": seconds, "num_documents": n_docs, "num_bytes": n_bytes}
    for s, (ids, _, starts, names) in streams.items():
        meta.update({f"num_{s}_tokens": int(ids.size), f"num_{s}_docs": int(starts.size),
                     f"{s}_files": names})
    meta["summary"] = (f"tokenized {n_docs:,} documents ({n_bytes / 1e6:,.2f} MB) into "
                       f"{total_tokens:,} tokens with {tok.name} in {seconds:.2f} s: "
                       f"{total_tokens / max(seconds, 1e-9):,.0f} tokens/s, "
                       f"{n_bytes / 1e6 / max(seconds, 1e-9):,.2f} MB/s")
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
    dtype = token_dtype(meta)

    def mmap(name: str, dt: np.dtype, n: int) -> np.ndarray:
        return np.memmap(out / name, dtype=dt, mode="r", shape=(n,))

    return Corpus(
        train=mmap("train.tokens", dtype, meta["num_train_tokens"]),
        val=mmap("val.tokens", dtype, meta["num_val_tokens"]),
        train_doc_starts=mmap("train.starts", _STARTS_DTYPE, meta["num_train_docs"]),
        val_doc_starts=mmap("val.starts", _STARTS_DTYPE, meta["num_val_docs"]),
        train_files=tuple(meta["train_files"]), val_files=tuple(meta["val_files"]),
        split=meta["split"], source=label, cache_dir=out,
        val_bytes=mmap("val.bytes", _BYTES_DTYPE, meta["num_val_tokens"]),
        tokenizer=meta.get("tokenizer", tok.name),
        build_summary=meta["summary"] if fresh else "")
