"""Byte-level text data: tokenizer, cached memory-mapped corpus, stateless batching.

Pipeline::

    corpus = load_corpus(cfg.data.path, cfg.data.val_fraction, cfg.data.cache_dir)
    rows = process_rows(batch_size)                       # this process's slice
    local = train_batch(corpus.train, corpus.train_doc_starts, step=step, seed=seed,
                        batch_size=batch_size, seq_len=seq_len, rows=rows)
    batch = shard_batch(local, NamedSharding(mesh, P("data")), batch_size)

Tokens are UTF-8 bytes plus PAD/BOS/EOS, so a file's bytes *are* its tokens. Each split
is cached once as a flat ``uint16`` stream (every document followed by EOS) plus ``int64``
document starts, written atomically and opened with ``np.memmap``. Batches are a pure
function of ``(seed, step)``, so resumed and multi-process runs see identical rows.
Numpy-only; jax is imported lazily by the two sharding helpers.
"""

from __future__ import annotations

import array
import codecs
import dataclasses
import fnmatch
import functools
import glob
import hashlib
import itertools
import json
import os
import sysconfig
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from tfm_jax.core.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    import jax

FORMAT_VERSION = 1
_TOKEN_DTYPE = np.dtype("<u2")   # bytes + specials (EOS=258) do not fit uint8
_STARTS_DTYPE = np.dtype("<i8")
_READ_CHUNK = 1 << 23            # 8 MiB: bounds memory while building the cache
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test",
                            "__pycache__"})
_SKIPPED_DIRS = frozenset({"__pycache__"})   # user folders/globs (hidden dirs are skipped too)
_SNIFF_BYTES = 8192
# Identifies the rule of is_text_file in cache keys: change it when the rule changes.
TEXT_RULE = "skip: NUL in first 8 KiB, or not UTF-8; __pycache__ and hidden dirs"
_PATH_HINT = ("set data.path to an existing text file, folder or glob, "
              "or leave it unset for the built-in corpus")



# ----------------------------------------------------------------------------- tokenizer


class ByteTokenizer:
    """UTF-8 byte tokenizer: ids 0..255 are bytes, then PAD=256, BOS=257, EOS=258."""

    PAD_ID = 256
    BOS_ID = 257
    EOS_ID = 258
    vocab_size = 259

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> np.ndarray:
        """Returns int32 ids of shape ``(len(text.encode('utf-8')) + add_bos + add_eos,)``."""
        body = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)
        head, tail = [self.BOS_ID] * add_bos, [self.EOS_ID] * add_eos
        return np.concatenate([np.asarray(head, np.int32), body, np.asarray(tail, np.int32)])

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Inverse of ``encode`` for ids of any shape; drops every id outside 0..255 (specials).

        Invalid byte sequences (e.g. sampled by a half-trained model) become U+FFFD instead
        of raising; valid UTF-8 round-trips exactly."""
        ids = np.asarray(ids).reshape(-1)
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"decode expects integer token ids, got dtype {ids.dtype}")
        data = ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tobytes()
        return data.decode("utf-8", errors="replace")


PAD_ID, BOS_ID, EOS_ID = ByteTokenizer.PAD_ID, ByteTokenizer.BOS_ID, ByteTokenizer.EOS_ID
VOCAB_SIZE = ByteTokenizer.vocab_size


# ----------------------------------------------------------------------------- file discovery


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).absolute()


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


@functools.lru_cache(maxsize=1)
def _builtin_files() -> tuple[Path, ...]:  # the stdlib does not change under a running process
    return tuple(p for p in _walk(_stdlib_root(), _EXCLUDED_DIRS, ".py") if _is_utf8(p))


def builtin_corpus_files() -> list[Path]:
    """The default corpus: this interpreter's standard-library ``.py`` sources.

    Recursive under ``sysconfig.get_paths()["stdlib"]``, excluding any path with a
    directory component in {site-packages, dist-packages, test, tests, idle_test,
    __pycache__} or starting with ".", sorted by relative path. Files that are not
    valid UTF-8 are silently dropped (for the built-in corpus only; user corpora
    raise instead). CPython 3.11 on Linux: ~734 files, ~12 MB.
    """
    return list(_builtin_files())


def _included(rel: str, include: Sequence[str] | None) -> bool:
    return not include or any(fnmatch.fnmatch(rel.rsplit("/", 1)[-1], pat)
                              or fnmatch.fnmatch(rel, pat) for pat in include)


def _resolve(path: str | None, include: Sequence[str] | None = None
             ) -> tuple[list[Path], Path, str, bool]:
    """Returns (absolute files, root that relative names are taken from, label for messages,
    whether the user named this one file explicitly)."""
    if path is None:
        root = _stdlib_root()
        return builtin_corpus_files(), root, f"<built-in corpus: Python stdlib at {root}>", False
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


def resolve_files(path: str | None, include: Sequence[str] | None = None) -> list[Path]:
    """Corpus files for ``data.path``: None -> built-in corpus; a file -> [it]; a folder ->
    all non-hidden regular files under it (recursive, sorted; hidden and ``__pycache__``
    folders skipped); otherwise a recursive glob (sorted; files under ``__pycache__`` skipped).
    ``include`` (folder/glob only): keep files whose name or relative path matches one of these
    globs. Raises ``DataError`` when nothing matches. (Text/binary is decided when the cache is
    built: :func:`is_text_file`.)"""
    return _resolve(path, include)[0]


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


# ----------------------------------------------------------------------------- corpus cache


@dataclasses.dataclass(frozen=True, repr=False)
class Corpus:
    """Train/validation token streams of one corpus (memory-mapped, read-only).

    Attributes:
      train, val: ``np.memmap`` uint16, shape (num_tokens,); each document followed by EOS.
      train_doc_starts, val_doc_starts: ``np.memmap`` int64, shape (num_docs,); offsets of
        document starts into the stream (always begins with 0).
      train_files, val_files: relative names of the documents in each split.
      split: "by_file" (hash of relative path) or "by_bytes" (fallback, see ``load_corpus``).
      source: the data path (or built-in label); cache_dir: where the streams live.
      skipped_files: relative names of the files a folder/glob matched that are not text
        (:func:`is_text_file`), left out of both splits.
    """

    train: np.ndarray
    val: np.ndarray
    train_doc_starts: np.ndarray
    val_doc_starts: np.ndarray
    train_files: tuple[str, ...]
    val_files: tuple[str, ...]
    split: str
    source: str
    cache_dir: Path
    skipped_files: tuple[str, ...] = ()

    def skipped_summary(self) -> str:
        """'N files skipped (binary/not UTF-8), e.g. a, b, c', or '' when none were."""
        n = len(self.skipped_files)
        if not n:
            return ""
        return (f"{n} file{'s' if n > 1 else ''} skipped (binary/not UTF-8), e.g. "
                + ", ".join(self.skipped_files[:3]))

    @property
    def num_train_tokens(self) -> int:
        return int(self.train.shape[0])

    @property
    def num_val_tokens(self) -> int:
        return int(self.val.shape[0])

    @property
    def files(self) -> dict[str, tuple[str, ...]]:
        """Document names per split: ``{"train": (...), "val": (...)}``."""
        return {"train": self.train_files, "val": self.val_files}

    def __repr__(self) -> str:
        return (f"Corpus(source={self.source!r}, split={self.split!r}, files={len(self.train_files)}"
                f"+{len(self.val_files)}, tokens={self.num_train_tokens}+{self.num_val_tokens}, "
                f"skipped={len(self.skipped_files)}, cache_dir='{self.cache_dir}')")


def _cache_root(cache_dir: str | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("TFM_JAX_CACHE") or "~/.cache/tfm_jax").expanduser() / "corpus"


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file and ``os.replace`` (readers never see it torn)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _SplitWriter:
    """Streams one split's tokens to a temp file; ``commit`` publishes it atomically."""

    def __init__(self, out: Path, split: str):
        self.out, self.split = out, split
        fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{split}.tokens.", suffix=".tmp")
        self.tmp, self.fh = Path(tmp), os.fdopen(fd, "wb")
        self.count, self.starts, self.names = 0, array.array("q"), []

    def write(self, tokens: np.ndarray, name: str, new_doc: bool) -> None:
        if new_doc or not self.starts:  # (a by_bytes val split may begin mid-document)
            self.starts.append(self.count)
            self.names.append(name)
        self.fh.write(tokens.tobytes())
        self.count += tokens.size

    def commit(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        os.replace(self.tmp, self.out / f"{self.split}.tokens")
        atomic_write(self.out / f"{self.split}.starts", np.asarray(self.starts, _STARTS_DTYPE).tobytes())

    def abort(self) -> None:
        self.fh.close()
        self.tmp.unlink(missing_ok=True)


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
            "train_files": train.names, "val_files": val.names, "skipped_files": list(skipped)}
    atomic_write(out / "meta.json", json.dumps(meta, indent=1).encode("utf-8"))
    return meta


def _read_meta(out: Path) -> dict | None:
    """Metadata of a complete cache entry in ``out``, or None if absent/stale/partial."""
    try:
        meta = json.loads((out / "meta.json").read_text("utf-8"))
        expected = {f"{split}.{kind}": meta[f"num_{split}_{count}"] * dtype.itemsize
                    for split in ("train", "val") for kind, count, dtype in
                    [("tokens", "tokens", _TOKEN_DTYPE), ("starts", "docs", _STARTS_DTYPE)]}
        ok = meta["format_version"] == FORMAT_VERSION and all(
            (out / name).stat().st_size == size for name, size in expected.items())
        return meta if ok else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_corpus(path: str | None, val_fraction: float = 0.05, cache_dir: str | None = None,
                include: Sequence[str] | None = None) -> Corpus:
    """Resolves ``path`` (see ``resolve_files``), builds or reuses its token cache, memory-maps it.

    Split: each non-empty file is a document and goes to validation iff
    ``int(sha1(relative_path).hexdigest(), 16) % 1000 < val_fraction * 1000``, so adding
    files never moves existing ones. Relative paths are taken from the folder (folder
    path), the stdlib root (built-in), or the files' common parent (file or glob). If
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
    files, root, label, explicit = _resolve(path, include)
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

    def mmap(name: str, dtype: np.dtype, n: int) -> np.ndarray:
        return np.memmap(out / name, dtype=dtype, mode="r", shape=(n,))

    return Corpus(
        train=mmap("train.tokens", _TOKEN_DTYPE, meta["num_train_tokens"]),
        val=mmap("val.tokens", _TOKEN_DTYPE, meta["num_val_tokens"]),
        train_doc_starts=mmap("train.starts", _STARTS_DTYPE, meta["num_train_docs"]),
        val_doc_starts=mmap("val.starts", _STARTS_DTYPE, meta["num_val_docs"]),
        train_files=tuple(meta["train_files"]), val_files=tuple(meta["val_files"]),
        split=meta["split"], source=label, cache_dir=out,
        skipped_files=tuple(meta.get("skipped_files", ())))


def unigram_entropy(train_tokens: np.ndarray, eval_tokens: np.ndarray) -> float:
    """Cross-entropy (nats/token) of ``eval_tokens`` under an add-one-smoothed unigram
    model over the 259-token vocabulary fit on ``train_tokens``: the baseline an LM must beat."""
    def counts(tokens: np.ndarray) -> np.ndarray:
        tokens = np.asarray(tokens).reshape(-1)
        total = np.zeros(VOCAB_SIZE, np.int64)
        for i in range(0, tokens.size, _READ_CHUNK):  # bincount upcasts; keep temporaries small
            c = np.bincount(tokens[i:i + _READ_CHUNK], minlength=VOCAB_SIZE)
            if c.size > VOCAB_SIZE:
                raise DataError(f"token id {c.size - 1} is outside the vocabulary (size {VOCAB_SIZE})")
            total += c
        return total

    train_counts, eval_counts = counts(train_tokens), counts(eval_tokens)
    if eval_counts.sum() == 0:
        raise DataError("unigram_entropy needs at least one eval token")
    log_p = np.log(train_counts + 1.0) - np.log(train_counts.sum() + VOCAB_SIZE)
    return float(-(eval_counts * log_p).sum() / eval_counts.sum())


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
