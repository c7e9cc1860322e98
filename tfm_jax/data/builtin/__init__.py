"""The built-in corpus: a frozen snapshot of the CPython 3.11 standard library's ``.py`` sources.

The default corpus (``data.path`` unset) must be the same bytes on every Python a user runs, so
golden losses and studies reproduce across interpreters: reading the running interpreter's own
standard library would train 3.11 and 3.13 on different data. The snapshot
(``python-3.11-stdlib.tar.xz``, 734 files, 12,118,641 bytes; the ``.py`` files of CPython 3.11.7's
``Lib/`` without ``test``/``tests``/``idle_test``/``site-packages`` folders and files that are not
UTF-8) ships with the package under the Python Software Foundation License (``LICENSE.txt`` beside
it). On first use it is verified (sha256) and unpacked into the corpus cache folder, once, by
whichever process gets there first.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from tfm_jax.core.errors import DataError
from tfm_jax.core.rundir import file_sha256

ARCHIVE = Path(__file__).with_name("python-3.11-stdlib.tar.xz")
ARCHIVE_SHA256 = "3b4472675c52d14845afad7f53243f7890525adc0443719027b1384814f212cd"
LABEL = "<built-in corpus: CPython 3.11 standard library snapshot>"
NUM_FILES = 734


def _safe_name(name: str) -> bool:
    p = PurePosixPath(name)
    return bool(p.parts) and not p.is_absolute() and ".." not in p.parts


def _unpack(dest: Path) -> None:
    """Regular files of the archive into ``dest`` (which must not exist yet)."""
    with tarfile.open(ARCHIVE, "r:xz") as tar:
        for member in tar:
            if not member.isfile() or not _safe_name(member.name):
                raise DataError(f"built-in corpus archive {ARCHIVE} holds an unexpected entry "
                                f"{member.name!r}; reinstall tfm-jax")
            target = dest / member.name
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            with open(target, "wb") as out:
                shutil.copyfileobj(src, out)
            os.utime(target, (member.mtime, member.mtime))


def root(cache_root: Path) -> Path:
    """The folder holding the unpacked snapshot (unpacked now if it is not there yet)."""
    final = cache_root / f"builtin-{ARCHIVE_SHA256[:16]}"
    if (final / ".complete").is_file():
        return final
    if not ARCHIVE.is_file():
        raise DataError(f"the built-in corpus archive {ARCHIVE} is missing; reinstall tfm-jax "
                        "or set data.path to your own text")
    if file_sha256(ARCHIVE) != ARCHIVE_SHA256:
        raise DataError(f"the built-in corpus archive {ARCHIVE} is damaged (sha256 differs from "
                        "the released one); reinstall tfm-jax")
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_root, prefix=".builtin-"))
    try:
        _unpack(tmp)
        (tmp / ".complete").write_text(ARCHIVE_SHA256 + "\n")
        try:
            os.rename(tmp, final)     # atomic; another process may have won the race
        except OSError:
            if not (final / ".complete").is_file():
                raise DataError(f"{final} is an incomplete copy of the built-in corpus; remove "
                                "that folder and run again") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
