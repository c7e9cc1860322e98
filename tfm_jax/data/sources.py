"""Document sources: what ``data.path`` names, read as (name, text) documents.

Kinds (decided by the files the path resolves to):
  text     plain text files, folders, globs: a file is a document (the byte corpus's rule);
  jsonl    ``.jsonl`` files: a line is a document, its ``data.text_field``;
  parquet  ``.parquet`` files: a row is a document, its ``data.text_field`` column (pyarrow);
  datasets a ``datasets.save_to_disk`` folder (``dataset_info.json`` / ``state.json`` inside):
           its rows' ``data.text_field`` (the ``datasets`` package; a DatasetDict's ``train``).
Document names (``file:line`` / ``file:row``) decide the train/validation split, so adding
records never moves existing ones. Bad input raises ``DataError`` with one line naming the
file (and line) at fault.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from tfm_jax.core.errors import DataError

_EXTRA_HINT = "install the data extra: pip install 'tfm-jax[data]'"


def is_datasets_folder(path: str | None) -> bool:
    if path is None:
        return False
    p = Path(path).expanduser()
    return p.is_dir() and ((p / "dataset_info.json").is_file() or (p / "state.json").is_file()
                           or (p / "dataset_dict.json").is_file())


def kind_of(files: list[Path]) -> str:
    """'jsonl', 'parquet' or 'text' for a resolved file list (all files must agree)."""
    suffixes = {f.suffix.lower() for f in files}
    for kind, suffix in (("jsonl", ".jsonl"), ("parquet", ".parquet")):
        if suffix in suffixes:
            if suffixes != {suffix}:
                raise DataError(f"data.path mixes {suffix} files with others ({sorted(suffixes)}); "
                                "point it at one kind, or list several in data.mixture")
            return kind
    return "text"


def jsonl_documents(path: Path, name: str, text_field: str) -> Iterator[tuple[str, str]]:
    """(``name:line``, text) for each non-blank line of a jsonl file (1-based line numbers)."""
    try:
        f = open(path, "r", encoding="utf-8")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    with f:
        try:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as e:
                    raise DataError(f"{path}:{number}: not valid JSON ({e.msg})") from None
                if not isinstance(record, dict) or text_field not in record:
                    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                    raise DataError(f"{path}:{number}: no text field {text_field!r} (has {keys}); "
                                    "set data.text_field")
                text = record[text_field]
                if not isinstance(text, str):
                    raise DataError(f"{path}:{number}: field {text_field!r} is "
                                    f"{type(text).__name__}, not a string")
                yield f"{name}:{number}", text
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not valid UTF-8 ({e.reason}); re-encode it") from None


def parquet_documents(path: Path, name: str, text_field: str) -> Iterator[tuple[str, str]]:
    """(``name:row``, text) for each row of a parquet file's ``text_field`` column."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow; {_EXTRA_HINT}") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError
        raise DataError(f"cannot read {path} as parquet: {e}") from None
    columns = pf.schema_arrow.names
    if text_field not in columns:
        raise DataError(f"{path}: no column {text_field!r} (columns: {columns}); set data.text_field")
    row = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=4096):
        for text in batch.column(0).to_pylist():
            if text is not None:
                if not isinstance(text, str):
                    raise DataError(f"{path}: column {text_field!r} holds "
                                    f"{type(text).__name__}, not strings")
                yield f"{name}:{row}", text
            row += 1


def datasets_documents(path: str, text_field: str) -> Iterator[tuple[str, str]]:
    """(``split:row``, text) for each row of a ``save_to_disk`` folder (DatasetDict: ``train``)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"reading the datasets folder {path} needs `datasets`; {_EXTRA_HINT}") from None
    try:
        ds = datasets.load_from_disk(str(Path(path).expanduser()))
    except Exception as e:  # FileNotFoundError / datasets' own errors
        raise DataError(f"cannot load {path} with datasets.load_from_disk: {e}") from None
    split = ""
    if isinstance(ds, datasets.DatasetDict):
        split = "train" if "train" in ds else sorted(ds)[0]
        ds = ds[split]
    if text_field not in ds.column_names:
        raise DataError(f"{path}: no column {text_field!r} (columns: {ds.column_names}); "
                        "set data.text_field")
    for start in range(0, len(ds), 4096):
        for i, text in enumerate(ds[start:start + 4096][text_field]):
            if text is not None:
                yield f"{split}:{start + i}", str(text)


def fingerprint_datasets(path: str) -> list:
    """What identifies a datasets folder's content for the cache key: its files' names,
    sizes and mtimes."""
    root = Path(path).expanduser().absolute()
    return [[p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns]
            for p in sorted(root.rglob("*")) if p.is_file()]
