"""The native-kernel cache and the BLAS finder trust only what is this user's
(tfm_jax.platform.kernels.cpu): a planted library (its constructor writes a marker file) in a
shared or tampered cache is never loaded; the key follows the compiler's version and flags; the
build has a time limit; BLAS libraries come from installed packages' metadata, not from
sys.path or the working directory. Nothing here compiles the kernels."""

import importlib.metadata
import os
import pathlib
import sys

import pytest

from tests.rundir_support import marker_library
from tfm_jax.platform.kernels import cpu


def _fake_dist(site: pathlib.Path, name: str, files: list[str]):
    """A distribution ``name`` installed in ``site`` with ``files`` (a dist-info RECORD)."""
    info = site / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "RECORD").write_text("".join(f"{f},,\n" for f in files))
    for f in files:
        (site / f).parent.mkdir(parents=True, exist_ok=True)
        (site / f).write_bytes(b"\0")
    return next(importlib.metadata.distributions(name=name, path=[str(site)]))


def test_finder_reads_the_installed_files_of_each_package(tmp_path):
    site = tmp_path / "site-packages"
    dists = {
        "scipy-openblas32": [_fake_dist(site, "scipy-openblas32",
                                        ["scipy_openblas32/lib/libscipy_openblas.so",
                                         "scipy_openblas32/__init__.py"])],
        "numpy": [_fake_dist(site, "numpy", ["numpy.libs/libscipy_openblas64_-0123abcd.so",
                                             "numpy.libs/libgfortran-0123.so"])],
        "mkl": [_fake_dist(site, "mkl", ["../lib/libmkl_rt.so.2", "../lib/libmkl_rt.so.10",
                                         "../lib/libmkl_rt.so.3.bak", "../lib/libmkl_core.so.3"])],
    }
    found = cpu.find_blas(dists=dists, prefixes=[])
    assert found["openblas"] == [site / "scipy_openblas32/lib/libscipy_openblas.so"]
    assert found["numpy-openblas"] == [site / "numpy.libs/libscipy_openblas64_-0123abcd.so"]
    assert [p.name for p in found["mkl"]] == ["libmkl_rt.so.10", "libmkl_rt.so.2"]
    # a conda env's MKL (no Python metadata) under the interpreter's own prefix
    (tmp_path / "env" / "lib").mkdir(parents=True)
    (tmp_path / "env" / "lib" / "libmkl_rt.so.3").write_bytes(b"\0")
    found = cpu.find_blas(dists={}, prefixes=[tmp_path / "env"])
    assert [p.name for p in found["mkl"]] == ["libmkl_rt.so.3"] and found["openblas"] == []


def test_blas_planted_in_the_working_directory_is_not_found(tmp_path, monkeypatch):
    """The audit: libraries were searched on every sys.path entry -- the current directory
    under ``python -m`` --, $CONDA_PREFIX and ~/.local. A scipy_openblas32 folder (with or
    without metadata) planted there is ignored."""
    planted = tmp_path / "cwd"
    _fake_dist(planted, "scipy-openblas32", ["scipy_openblas32/lib/libscipy_openblas.so"])
    (planted / "lib").mkdir()
    (planted / "lib" / "libmkl_rt.so.2").write_bytes(b"\0")
    monkeypatch.chdir(planted)
    monkeypatch.syspath_prepend(str(planted))
    monkeypatch.setenv("CONDA_PREFIX", str(planted))
    found = cpu.find_blas()
    for paths in found.values():
        assert not any(str(p).startswith(str(planted)) for p in paths), found


def _marker_lib_in(folder: pathlib.Path, tmp_path) -> tuple[pathlib.Path, pathlib.Path]:
    marker = tmp_path / "LOADED"
    lib = marker_library(tmp_path / "build", marker)
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / "libtfm_cpu_kernels.so"
    dest.write_bytes(lib.read_bytes())
    os.chmod(dest, 0o700)
    return dest, marker


@pytest.mark.skipif(sys.platform != "linux", reason="the kernels build on Linux only")
def test_planted_library_in_a_shared_cache_is_not_loaded(tmp_path, monkeypatch):
    """The audit: a library planted at the computed path of a shared $TFM_JAX_CACHE ran. A
    cache folder writable by others is refused, whatever it holds."""
    root = tmp_path / "shared"
    _, _, out_dir = cpu._build_plan(root)
    _, marker = _marker_lib_in(out_dir, tmp_path)
    os.chmod(root, 0o777)
    with pytest.raises(RuntimeError, match="writable by group or others"):
        cpu._build(root)
    assert not marker.exists()


@pytest.mark.skipif(sys.platform != "linux", reason="the kernels build on Linux only")
def test_library_without_its_recorded_sha256_is_not_loaded(tmp_path):
    """In a private cache a library whose sha256 was not recorded at build time (or differs)
    is rebuilt, never loaded; checked again just before the load."""
    lib, marker = _marker_lib_in(tmp_path / "cache" / "kernels" / "k", tmp_path)
    with pytest.raises(RuntimeError, match="sha256 does not match"):
        cpu._verify(lib)
    (lib.parent / (lib.name + ".sha256")).write_text("0" * 64 + "\n")
    with pytest.raises(RuntimeError, match="sha256 does not match"):
        cpu._verify(lib)
    (lib.parent / (lib.name + ".sha256")).write_text(cpu.file_sha256(lib) + "\n")
    cpu._verify(lib)                                     # recorded: accepted (not loaded here)
    os.chmod(lib, 0o722)
    with pytest.raises(RuntimeError, match="only you can write"):
        cpu._verify(lib)
    assert not marker.exists()


def _fake_compiler(tmp_path, version: str, body: str = "exit 1") -> str:
    cxx = tmp_path / f"cxx-{version}"
    cxx.write_text(f'#!/bin/sh\nif [ "$1" = --version ]; then echo "fakecc {version}"; exit 0; '
                   f'fi\n{body}\n')
    cxx.chmod(0o755)
    return str(cxx)


@pytest.mark.skipif(sys.platform != "linux", reason="the kernels build on Linux only")
def test_cache_key_follows_compiler_version_and_flags(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", _fake_compiler(tmp_path, "1.0"))
    a = cpu._build_plan(tmp_path)[2]
    monkeypatch.setenv("CXX", _fake_compiler(tmp_path, "2.0"))
    b = cpu._build_plan(tmp_path)[2]
    assert a != b
    monkeypatch.setattr(cpu, "_cpu_id", lambda: "same cpu")
    c = cpu._build_plan(tmp_path)[2]
    real = cpu.jax.ffi.include_dir
    monkeypatch.setattr(cpu.jax.ffi, "include_dir", lambda: real() + "/other")   # other flags
    assert cpu._build_plan(tmp_path)[2] != c


@pytest.mark.skipif(sys.platform != "linux", reason="the kernels build on Linux only")
def test_build_has_a_time_limit(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", _fake_compiler(tmp_path, "1.0", body="exec sleep 30"))
    monkeypatch.setattr(cpu, "BUILD_TIMEOUT_S", 0.5)
    with pytest.raises(RuntimeError, match=r"took more than 0.5 s"):
        cpu._build(tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("libtfm_cpu_kernels.so"))
