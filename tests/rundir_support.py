"""Harmless proofs for the run-directory safety tests: a tiny shared library whose constructor
only writes a marker file (built here with the system C compiler; the test is skipped without
one), so a test can tell whether anything ever loaded it."""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest

_SOURCE = r"""
#include <stdio.h>
__attribute__((constructor)) static void tfm_marker(void) {
    FILE *f = fopen(MARKER, "w");
    if (f) { fputs("loaded\n", f); fclose(f); }
}
"""


def marker_library(folder: pathlib.Path, marker: pathlib.Path,
                   name: str = "libmarker.so") -> pathlib.Path:
    """``folder/name``: a shared library whose constructor writes ``marker`` when loaded."""
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        pytest.skip("no C compiler (cc/gcc/clang) to build the marker library")
    folder.mkdir(parents=True, exist_ok=True)
    src = folder / "marker.c"
    src.write_text(_SOURCE)
    out = folder / name
    subprocess.run([cc, "-shared", "-fPIC", f'-DMARKER="{marker}"', str(src), "-o", str(out)],
                   check=True, capture_output=True, timeout=60)
    return out
