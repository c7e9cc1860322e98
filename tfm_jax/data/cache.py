"""The tokenized corpus on disk: one folder per (source, tokenizer, split rule), token streams
and document starts per split, written atomically and memory-mapped (:class:`Corpus`)."""

from __future__ import annotations

import array
import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

FORMAT_VERSION = 2                # 2: meta.json records the streams' digest
_TOKEN_DTYPE = np.dtype("<u2")   # bytes + specials (EOS=258) do not fit uint8
_STARTS_DTYPE = np.dtype("<i8")
_BYTES_DTYPE = np.dtype("<u2")   # UTF-8 bytes per token (subword caches: val.bytes)


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
      digest: sha256 of both splits' token streams and document starts (:func:`content_digest`):
        equal digests, equal training data, whatever the paths, Python or machine.
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
    digest: str = ""

    @property
    def fingerprint(self) -> dict:
        """What identifies this corpus in run directories and results files: the content digest
        plus the figures a reader recognises it by."""
        return {"digest": self.digest, "source": self.source, "tokenizer": self.tokenizer,
                "split": self.split, "train_tokens": self.num_train_tokens,
                "val_tokens": self.num_val_tokens, "train_documents": int(self.train_doc_starts.size),
                "val_documents": int(self.val_doc_starts.size)}

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
        ok = meta["format_version"] == FORMAT_VERSION and "digest" in meta and all(
            (out / name).stat().st_size == size for name, size in expected.items())
        return meta if ok else None
    except (OSError, ValueError, KeyError, TypeError):
        return None




def content_digest(out: Path, meta: dict) -> str:
    """sha256 over the published streams of a cache entry (train then val: tokens, starts),
    each prefixed by its dtype and length."""
    h = hashlib.sha256()
    for split in ("train", "val"):
        for kind, count, dtype in (("tokens", "tokens", token_dtype(meta)),
                                   ("starts", "docs", _STARTS_DTYPE)):
            h.update(f"{split}.{kind}:{dtype.str}:{meta[f'num_{split}_{count}']};".encode())
            with open(out / f"{split}.{kind}", "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
    return h.hexdigest()


def describe_fingerprint(fp: dict) -> str:
    """One line: digest prefix, token counts, tokenizer, source."""
    return (f"{fp.get('digest', '?')[:12]} ({fp.get('train_tokens', 0):,} train + "
            f"{fp.get('val_tokens', 0):,} val tokens, tokenizer {fp.get('tokenizer', '?')}, "
            f"{fp.get('source', '?')})")


def check_fingerprint(saved: dict | None, current: dict, *, what: str, allow: bool,
                      flag: str = "--allow-corpus-change") -> str:
    """Compares the corpus a run recorded (``saved``; None: the run predates fingerprints) with
    the one loaded now. Different and not ``allow``: ``DataError`` naming both and ``flag``.
    Returns a note to print ('' when they agree)."""
    from tfm_jax.core.errors import DataError

    if saved is None:
        return (f"{what}: the run records no corpus fingerprint (an imported model, or a run of "
                f"an older tfm-jax); using {describe_fingerprint(current)}")
    if saved.get("digest") == current["digest"]:
        return ""
    if not allow:
        raise DataError(f"{what}: the corpus differs from the one this run trained on: run "
                        f"{describe_fingerprint(saved)}; now {describe_fingerprint(current)}. "
                        f"Point data.* at the run's corpus, or pass {flag} to use this one")
    return (f"{what} on a different corpus than the run trained on ({flag}): run "
            f"{describe_fingerprint(saved)}; now {describe_fingerprint(current)}")


RUN_CORPUS_FILE = "corpus.json"


def run_corpus(run_dir: Path) -> dict | None:
    """The fingerprint of the corpus a run last trained on (``<run>/corpus.json``), or None."""
    try:
        return json.loads((Path(run_dir) / RUN_CORPUS_FILE).read_text("utf-8"))["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def record_run_corpus(run_dir: Path, fingerprint: dict, step: int) -> None:
    """Writes ``<run>/corpus.json``: the corpus the run trains on from ``step``, with the ones it
    trained on before (a resume with ``--allow-corpus-change``)."""
    path = Path(run_dir) / RUN_CORPUS_FILE
    try:
        history = json.loads(path.read_text("utf-8")).get("history", [])
    except (OSError, ValueError, AttributeError):
        history = []
    if not history or history[-1]["fingerprint"].get("digest") != fingerprint["digest"]:
        history.append({"from_step": int(step), "fingerprint": fingerprint})
    atomic_write(path, json.dumps({"fingerprint": fingerprint, "history": history},
                                  indent=1).encode("utf-8"))


def inherit_run_corpus(src_run: Path, dst_run: Path) -> None:
    """A run derived from another (convert, quantize) records the corpus its source trained on."""
    try:
        raw = (Path(src_run) / RUN_CORPUS_FILE).read_bytes()
    except OSError:
        return
    atomic_write(Path(dst_run) / RUN_CORPUS_FILE, raw)


def open_cached(out: Path, meta: dict, label: str, *, build_summary: str = "") -> Corpus:
    """The :class:`Corpus` of the complete cache entry ``out`` with metadata ``meta``: streams
    memory-mapped read-only (``val.bytes`` where the entry has one: subword tokenizers)."""
    dtype = token_dtype(meta)

    def mmap(name: str, dt: np.dtype, n: int) -> np.ndarray:
        return np.memmap(out / name, dtype=dt, mode="r", shape=(n,))

    has_bytes = (out / "val.bytes").is_file()
    return Corpus(
        train=mmap("train.tokens", dtype, meta["num_train_tokens"]),
        val=mmap("val.tokens", dtype, meta["num_val_tokens"]),
        train_doc_starts=mmap("train.starts", _STARTS_DTYPE, meta["num_train_docs"]),
        val_doc_starts=mmap("val.starts", _STARTS_DTYPE, meta["num_val_docs"]),
        train_files=tuple(meta["train_files"]), val_files=tuple(meta["val_files"]),
        split=meta["split"], source=label, cache_dir=out,
        skipped_files=tuple(meta.get("skipped_files", ())),
        val_bytes=(mmap("val.bytes", _BYTES_DTYPE, meta["num_val_tokens"]) if has_bytes
                   else None),
        tokenizer=meta.get("tokenizer", "byte"), build_summary=build_summary,
        digest=meta["digest"])
