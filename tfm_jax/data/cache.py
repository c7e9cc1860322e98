"""The tokenized corpus on disk: one folder per (source, tokenizer, split rule), token streams
and document starts per split, written atomically and memory-mapped (:class:`Corpus`)."""

from __future__ import annotations

import array
import dataclasses
import json
import os
import tempfile
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
_TOKEN_DTYPE = np.dtype("<u2")   # bytes + specials (EOS=258) do not fit uint8
_STARTS_DTYPE = np.dtype("<i8")


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
    val_bytes: np.ndarray | None = None    # UTF-8 bytes per val token (None: byte tokens)
    tokenizer: str = "byte"                # the tokenizer's name
    build_summary: str = ""                # the tokenization throughput line (built now only)

    def bytes_of(self, positions: np.ndarray) -> int:
        """UTF-8 bytes of the validation tokens at ``positions`` (EOS and other specials: 0)."""
        if self.val_bytes is None:
            return int(np.count_nonzero(np.asarray(self.val)[positions] < 256))
        return int(np.asarray(self.val_bytes)[positions].sum(dtype=np.int64))

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
    """Write ``data`` to ``path`` via a temp file and ``os.replace`` (readers never see it torn;
    private to the user, never through a link): :func:`tfm_jax.core.rundir.atomic_write`."""
    from tfm_jax.core import rundir

    rundir.atomic_write(path, data, mode=0o600)


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


def token_dtype(meta: dict) -> np.dtype:
    """The stream's token dtype: uint16 unless the metadata names another (large vocabularies)."""
    return np.dtype(meta.get("token_dtype", _TOKEN_DTYPE.str))


def _read_meta(out: Path) -> dict | None:
    """Metadata of a complete cache entry in ``out``, or None if absent/stale/partial."""
    try:
        meta = json.loads((out / "meta.json").read_text("utf-8"))
        expected = {f"{split}.{kind}": meta[f"num_{split}_{count}"] * dtype.itemsize
                    for split in ("train", "val") for kind, count, dtype in
                    [("tokens", "tokens", token_dtype(meta)), ("starts", "docs", _STARTS_DTYPE)]}
        ok = meta["format_version"] == FORMAT_VERSION and all(
            (out / name).stat().st_size == size for name, size in expected.items())
        return meta if ok else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


