"""Text data: tokenizers, sources, cached memory-mapped corpora, stateless batching.

Pipeline::

    tok = load_tokenizer(cfg.data.tokenizer)              # byte | tokenizer.json | .model
    corpus = corpus_for(cfg.data, tok)                    # cached token streams (or a mixture)
    rows = process_rows(batch_size)                       # this process's slice
    local = train_batch(corpus.train, corpus.train_doc_starts, step=step, seed=seed,
                        batch_size=batch_size, seq_len=seq_len, rows=rows)
    batch = shard_batch(local, NamedSharding(mesh, P("data")), batch_size)

Modules: :mod:`~tfm_jax.data.tokenizer` (the tokenizer protocol), :mod:`~tfm_jax.data.sources`
(text, jsonl, parquet, datasets), :mod:`~tfm_jax.data.documents` (tokenized corpora of
documents), :mod:`~tfm_jax.data.cache` (:class:`Corpus`), :mod:`~tfm_jax.data.batching`,
:mod:`~tfm_jax.data.packing` (concat, segments, pad), :mod:`~tfm_jax.data.mixture`,
:mod:`~tfm_jax.data.loader` (the checkpointable iterator). With the byte tokenizer and text
files, tokens are UTF-8 bytes plus PAD/BOS/EOS, so a file's bytes *are* its tokens (this module
builds that cache itself, streaming). Each split is cached once as a flat ``uint16`` stream
(every document followed by EOS) plus ``int64`` document starts, written atomically and opened
with ``np.memmap``. Batches are a pure function of ``(seed, step)``, so resumed and
multi-process runs see identical rows. Numpy-only; jax is imported lazily by the two sharding
helpers.
"""

from __future__ import annotations

import codecs
import fnmatch
import glob
import hashlib
import itertools
import json
import math
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from tfm_jax.core.errors import DataError
from tfm_jax.data import builtin, documents, sources
from tfm_jax.data.batching import (BOS_ID, EOS_ID, PAD_ID, eval_batches,  # noqa: F401
                                   eval_window_starts, process_rows, shard_batch, train_batch)
from tfm_jax.data.cache import (_STARTS_DTYPE, _TOKEN_DTYPE, FORMAT_VERSION, Corpus,  # noqa: F401
                                _cache_root, _read_meta, _SplitWriter, atomic_write,
                                check_fingerprint, content_digest, describe_fingerprint,
                                inherit_run_corpus, open_cached, record_run_corpus, run_corpus)
from tfm_jax.data.tokenizer import (ByteTokenizer, Tokenizer, auto_vocab_size,  # noqa: F401
                                    load_tokenizer, run_tokenizer)

_READ_CHUNK = 1 << 23            # 8 MiB: bounds memory while building the cache
_SKIPPED_DIRS = frozenset({"__pycache__"})   # user folders/globs (hidden dirs are skipped too)
_SNIFF_BYTES = 8192
# Identifies the rule of is_text_file in cache keys: change it when the rule changes.
TEXT_RULE = "skip: NUL in first 8 KiB, or not UTF-8; __pycache__ and hidden dirs"
_PATH_HINT = ("set data.path to an existing text file, folder or glob, "
              "or leave it unset for the built-in corpus")



VOCAB_SIZE = ByteTokenizer.vocab_size


# ----------------------------------------------------------------------------- file discovery


def _walk(root: Path, skip_dirs: frozenset[str] = frozenset(), suffix: str = "") -> list[Path]:
    """Regular, non-hidden files under ``root`` (hidden dirs pruned), sorted by relative path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in skip_dirs]
        for name in filenames:
            path = Path(dirpath, name)
            if not name.startswith(".") and name.endswith(suffix) and path.is_file():
                found.append(path)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _iter_utf8_chunks(path: Path) -> Iterator[bytes]:
    """Yields the file's bytes in chunks; ``DataError`` at the first invalid UTF-8 byte."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    consumed = 0
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_READ_CHUNK)
            pending = len(decoder.getstate()[0])  # bytes of an incomplete char held from the last chunk
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:  # e.start indexes (pending + chunk)
                raise DataError(
                    f"{path} is not valid UTF-8 (first bad byte at offset {consumed - pending + e.start}: "
                    f"{e.reason}); re-encode it as UTF-8 or remove it from the corpus") from None
            if not chunk:
                return
            consumed += len(chunk)
            yield chunk


def _is_utf8(path: Path) -> bool:
    try:
        return all(True for _ in _iter_utf8_chunks(path))
    except (DataError, OSError):
        return False


def builtin_corpus_files(cache_dir: str | None = None) -> list[Path]:
    """The default corpus: the shipped snapshot of CPython 3.11's standard-library ``.py``
    sources (:mod:`tfm_jax.data.builtin`; the same 734 files, 12.1 MB, on every Python),
    unpacked once into the corpus cache folder, sorted by relative path."""
    return _walk(builtin.root(_cache_root(cache_dir)), suffix=".py")


def _included(rel: str, include: Sequence[str] | None) -> bool:
    return not include or any(fnmatch.fnmatch(rel.rsplit("/", 1)[-1], pat)
                              or fnmatch.fnmatch(rel, pat) for pat in include)


def _resolve(path: str | None, include: Sequence[str] | None = None,
             cache_dir: str | None = None) -> tuple[list[Path], Path, str, bool]:
    """Returns (absolute files, root that relative names are taken from, label for messages,
    whether the user named this one file explicitly)."""
    if path is None:
        root = builtin.root(_cache_root(cache_dir))
        return _walk(root, suffix=".py"), root, builtin.LABEL, False
    p = Path(os.path.expanduser(path)).absolute()
    if p.is_file():
        return [p], p.parent, path, True
    only = f" matching data.include={list(include)}" if include else ""
    if p.is_dir():
        files = [f for f in _walk(p, _SKIPPED_DIRS)
                 if _included(f.relative_to(p).as_posix(), include)]
        if not files:
            raise DataError(f"data path {path!r} is a folder without (non-hidden) files{only}; "
                            f"{_PATH_HINT}")
        return files, p, path, False
    files = sorted(Path(m).absolute() for m in glob.glob(os.path.expanduser(path), recursive=True)
                   if os.path.isfile(m))
    if files:
        root = Path(os.path.commonpath([f.parent for f in files]))
        files = [f for f in files if _SKIPPED_DIRS.isdisjoint(f.relative_to(root).parts[:-1])
                 and _included(f.relative_to(root).as_posix(), include)]
    if not files:
        raise DataError(f"data path {path!r} is not an existing file or folder and, as a glob, "
                        f"matches no files{only}; {_PATH_HINT}")
    return files, Path(os.path.commonpath([f.parent for f in files])), path, False


def resolve_files(path: str | None, include: Sequence[str] | None = None,
                  cache_dir: str | None = None) -> list[Path]:
    """Corpus files for ``data.path``: None -> built-in corpus; a file -> [it]; a folder ->
    all non-hidden regular files under it (recursive, sorted; hidden and ``__pycache__``
    folders skipped); otherwise a recursive glob (sorted; files under ``__pycache__`` skipped).
    ``include`` (folder/glob only): keep files whose name or relative path matches one of these
    globs. Raises ``DataError`` when nothing matches. (Text/binary is decided when the cache is
    built: :func:`is_text_file`.)"""
    return _resolve(path, include, cache_dir)[0]


def is_text_file(path: Path) -> bool:
    """The corpus rule for files found in a folder or by a glob: text iff its first 8 KiB hold
    no NUL byte and the whole file is valid UTF-8. Other files are skipped (and counted);
    a file named explicitly as ``data.path`` is never skipped (it must be UTF-8, or an error
    names the bad byte)."""
    try:
        with open(path, "rb") as f:
            if b"\0" in f.read(_SNIFF_BYTES):
                return False
    except OSError:
        return False
    return _is_utf8(path)


def _build(out: Path, docs: list[tuple[Path, str, int]], val_fraction: float, label: str,
           skipped: Sequence[str] = ()) -> dict:
    """Streams ``docs`` (path, name, size) into ``out``; returns the metadata it wrote last."""
    is_val = [int(hashlib.sha1(name.encode()).hexdigest(), 16) % 1000 < val_fraction * 1000
              for _, name, _ in docs]
    split = "by_file" if any(is_val) and not all(is_val) else "by_bytes"
    total = sum(size + 1 for _, _, size in docs)  # + EOS per document
    cut = min(max(round(total * (1.0 - val_fraction)), 1), total - 1)  # by_bytes only
    out.mkdir(parents=True, exist_ok=True)
    train, val = _SplitWriter(out, "train"), _SplitWriter(out, "val")
    try:
        pos = 0  # position in the concatenation of all documents
        for (path, name, _), doc_in_val in zip(docs, is_val):
            doc_begin = pos
            chunks = (np.frombuffer(c, np.uint8).astype(_TOKEN_DTYPE) for c in _iter_utf8_chunks(path))
            for chunk in itertools.chain(chunks, [np.asarray([EOS_ID], _TOKEN_DTYPE)]):
                while chunk.size:
                    if split == "by_file":
                        writer, room = (val if doc_in_val else train), chunk.size
                    else:
                        writer, room = (train, cut - pos) if pos < cut else (val, chunk.size)
                    writer.write(chunk[:room], name, new_doc=pos == doc_begin)
                    pos, chunk = pos + min(room, chunk.size), chunk[room:]
        if not (train.count and val.count):
            raise DataError(f"corpus {label} changed while its cache was being built; retry")
        train.commit()
        val.commit()
    except BaseException:
        train.abort()
        val.abort()
        raise
    meta = {"format_version": FORMAT_VERSION, "source": label, "split": split,
            "val_fraction": val_fraction, "num_train_tokens": train.count, "num_val_tokens": val.count,
            "num_train_docs": len(train.starts), "num_val_docs": len(val.starts),
            "train_files": train.names, "val_files": val.names, "skipped_files": list(skipped),
            "tokenizer": ByteTokenizer().name}
    meta["digest"] = content_digest(out, meta)
    atomic_write(out / "meta.json", json.dumps(meta, indent=1).encode("utf-8"))
    return meta


def load_corpus(path: str | None, val_fraction: float = 0.05, cache_dir: str | None = None,
                include: Sequence[str] | None = None, *, tokenizer: Tokenizer | None = None,
                text_field: str = "text") -> Corpus:
    """Resolves ``path`` (see ``resolve_files``), builds or reuses its token cache, memory-maps it.

    Split: each non-empty file is a document and goes to validation iff
    ``int(sha1(relative_path).hexdigest(), 16) % 1000 < val_fraction * 1000``, so adding
    files never moves existing ones. Relative paths are taken from the folder (folder
    path), the snapshot folder (built-in), or the files' common parent (file or glob). If
    that leaves a split empty (e.g. a single file) the split falls back to "by_bytes":
    the concatenated stream (documents + EOS) is cut so that the last ``val_fraction`` of
    it is validation.

    Cache: ``<cache_dir>/<key>/`` where cache_dir defaults to ``$TFM_JAX_CACHE/corpus``
    or ``~/.cache/tfm_jax/corpus``; key = sha1 of the resolved paths, relative names,
    sizes, mtimes, val_fraction and format version. Files are written to temp names and
    published with ``os.replace`` (``meta.json`` last), so an interrupted build is simply
    rebuilt next time. Building streams file by file in 8 MiB chunks.

    Folders and globs: ``include`` (``data.include``) keeps files whose name or relative path
    matches one of its globs; files that are not text by :func:`is_text_file` (a NUL byte in
    the first 8 KiB, or not valid UTF-8: ``.pyc``, images, ...) are skipped and listed in
    ``Corpus.skipped_files``. The rule and ``include`` are part of the cache key.

    Raises ``DataError`` for a missing path, an empty corpus (also: every file skipped), a
    ``data.path`` file that is not UTF-8 (naming file and byte offset), or ``val_fraction``
    outside (0, 1).
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    tok = tokenizer or ByteTokenizer()
    if sources.is_datasets_folder(path):
        key = documents.cache_key(["datasets", str(Path(path).expanduser().resolve()),
                                   sources.fingerprint_datasets(path)], tok, text_field, val_fraction)
        return documents.open_corpus(_cache_root(cache_dir) / key,
                                     sources.datasets_documents(path, text_field), tok,
                                     val_fraction, str(path))
    files, root, label, explicit = _resolve(path, include, cache_dir)
    kind = sources.kind_of(files)
    if kind != "text" or not isinstance(tok, ByteTokenizer):
        return _document_corpus(files, root, label, explicit, kind, tok, val_fraction, cache_dir,
                                include, text_field)
    names = [f.relative_to(root).as_posix() for f in files]
    stats = [f.stat() for f in files]
    key = hashlib.sha1(json.dumps(
        [FORMAT_VERSION, float(val_fraction), "explicit file" if explicit else TEXT_RULE,
         sorted(include or []),
         [[str(f.resolve()), n, s.st_size, s.st_mtime_ns] for f, n, s in zip(files, names, stats)]]
    ).encode("utf-8")).hexdigest()[:24]
    out = _cache_root(cache_dir) / key
    meta = _read_meta(out)
    if meta is None:
        docs = [(f, n, s.st_size) for f, n, s in zip(files, names, stats) if s.st_size > 0]
        if not docs:
            raise DataError(f"corpus {label} is empty: all {len(files)} file(s) have 0 bytes; "
                            f"{_PATH_HINT}")
        skipped = [] if explicit else [n for f, n, _ in docs if not is_text_file(f)]
        if skipped:
            docs = [d for d in docs if d[1] not in set(skipped)]
            if not docs:
                raise DataError(
                    f"corpus {label}: all {len(skipped)} non-empty file(s) skipped as not text "
                    f"(a NUL byte in the first 8 KiB, or not valid UTF-8), e.g. "
                    f"{', '.join(skipped[:3])}; point data.path at text files or set "
                    f"data.include, e.g. ['*.py', '*.md']")
        meta = _build(out, docs, val_fraction, label, skipped)

    return open_cached(out, meta, label)


def _document_corpus(files: list[Path], root: Path, label: str, explicit: bool, kind: str,
                     tok: Tokenizer, val_fraction: float, cache_dir: str | None,
                     include: Sequence[str] | None, text_field: str) -> Corpus:
    """A corpus of records (jsonl/parquet) or of text files under a subword tokenizer."""
    names = [f.relative_to(root).as_posix() for f in files]
    stats = [f.stat() for f in files]
    key = documents.cache_key(
        [kind, "explicit file" if explicit else TEXT_RULE, sorted(include or []),
         [[str(f.resolve()), n, s.st_size, s.st_mtime_ns] for f, n, s in zip(files, names, stats)]],
        tok, text_field if kind != "text" else "", val_fraction)

    def docs() -> Iterator[tuple[str, str]]:
        for f, name, st in zip(files, names, stats):
            if kind == "jsonl":
                yield from sources.jsonl_documents(f, name, text_field)
            elif kind == "parquet":
                yield from sources.parquet_documents(f, name, text_field)
            elif st.st_size and (explicit or is_text_file(f)):
                yield name, b"".join(_iter_utf8_chunks(f)).decode("utf-8")

    return documents.open_corpus(_cache_root(cache_dir) / key, docs(), tok, val_fraction, label)


def batch_keys(packing) -> tuple[str, ...]:
    """The arrays of a training batch under ``data.packing`` (evaluation: the first three)."""
    from tfm_jax.data.packing import mode_of

    extra = ("segment_ids", "positions") if mode_of(packing) == "segments" else ()
    return ("inputs", "targets", "mask") + extra


def check_vocab(tok: Tokenizer, vocab_size: int) -> None:
    """``DataError`` when ``model.vocab_size`` cannot hold the tokenizer's ids."""
    if vocab_size < tok.vocab_size:
        raise DataError(f"model.vocab_size={vocab_size} is smaller than the {tok.vocab_size} ids "
                        f"of the tokenizer {tok.name}; set model.vocab_size=auto or >= "
                        f"{tok.vocab_size}")


def bits_per_byte(mean_loss: float, n_tokens: int, n_bytes: int) -> float:
    """Bits per UTF-8 byte of text scored at ``mean_loss`` nats per token over ``n_tokens``
    tokens standing for ``n_bytes`` bytes: comparable across tokenizers."""
    if n_bytes <= 0:
        raise DataError("bits per byte needs evaluated text of at least one byte")
    return mean_loss * n_tokens / (n_bytes * math.log(2.0))


def corpus_for(data_cfg, tokenizer: Tokenizer | None = None) -> Corpus:
    """:func:`load_corpus` with a ``DataConfig``'s path, split, cache, include and text field;
    with ``data.mixture`` a :class:`~tfm_jax.data.mixture.Mixture` of its sources."""
    if getattr(data_cfg, "mixture", None):
        from tfm_jax.data import mixture

        parts = [load_corpus(m.path, data_cfg.val_fraction, data_cfg.cache_dir,
                             include=data_cfg.include, tokenizer=tokenizer,
                             text_field=m.text_field or data_cfg.text_field)
                 for m in data_cfg.mixture]
        return mixture.combine(parts, [m.weight for m in data_cfg.mixture])
    return load_corpus(data_cfg.path, data_cfg.val_fraction, data_cfg.cache_dir,
                       include=data_cfg.include, tokenizer=tokenizer,
                       text_field=getattr(data_cfg, "text_field", "text"))


def unigram_entropy(train_tokens: np.ndarray, eval_tokens: np.ndarray,
                    vocab_size: int = VOCAB_SIZE) -> float:
    """Cross-entropy (nats/token) of ``eval_tokens`` under an add-one-smoothed unigram
    model over the ``vocab_size``-token vocabulary (default: the byte tokenizer's 259) fit on
    ``train_tokens``: the baseline an LM must beat."""
    def counts(tokens: np.ndarray) -> np.ndarray:
        tokens = np.asarray(tokens).reshape(-1)
        total = np.zeros(vocab_size, np.int64)
        for i in range(0, tokens.size, _READ_CHUNK):  # bincount upcasts; keep temporaries small
            c = np.bincount(tokens[i:i + _READ_CHUNK], minlength=vocab_size)
            if c.size > vocab_size:
                raise DataError(f"token id {c.size - 1} is outside the vocabulary (size {vocab_size})")
            total += c
        return total

    train_counts, eval_counts = counts(train_tokens), counts(eval_tokens)
    if eval_counts.sum() == 0:
        raise DataError("unigram_entropy needs at least one eval token")
    log_p = np.log(train_counts + 1.0) - np.log(train_counts.sum() + vocab_size)
    return float(-(eval_counts * log_p).sum() / eval_counts.sum())


