"""Provenance and dependency bounds: a run's environment.json (tfm_jax.platform.environment.
provenance), the installed core libraries inside pyproject's bounds, and the one private orbax
method tfm_jax.train.checkpoint relies on (fails when orbax renames or drops it)."""

import importlib.metadata
import pathlib
import shutil
import subprocess
import tomllib

import numpy as np
import pytest
from packaging.requirements import Requirement

from tfm_jax.platform import environment

ROOT = pathlib.Path(__file__).resolve().parents[3]
CORE = ("jax", "flax", "optax", "orbax-checkpoint", "numpy", "pydantic")


def test_core_dependencies_have_upper_bounds_and_installed_versions_fit():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    reqs = {Requirement(d).name.lower(): Requirement(d) for d in deps}
    for name in CORE:
        spec = reqs[name].specifier
        assert any(s.operator == "<" for s in spec), f"{name}: no upper bound in pyproject"
        installed = importlib.metadata.version(name)
        assert spec.contains(installed, prereleases=True), (name, installed, str(spec))


def test_provenance_records_versions_platform_kernels(devices):
    rec = environment.provenance("kernels line", devices[:1])
    for name in CORE:
        assert rec["packages"][name] == importlib.metadata.version(name)
    assert rec["kernels"] == "kernels line" and rec["devices"]["count"] == 1
    assert rec["python"] and rec["platform"]["machine"]


@pytest.mark.skipif(shutil.which("git") is None, reason="no git")
def test_git_commit_of_a_checkout_and_none_elsewhere(tmp_path):
    assert environment.git_commit(str(tmp_path / "x.py")) is None        # not a checkout
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git[:3] + ["init", "-q"], check=True)
    (repo / "a.py").write_text("x = 1\n")
    subprocess.run(git + ["add", "a.py"], check=True)
    subprocess.run(git + ["commit", "-qm", "one"], check=True)
    sha = subprocess.run(git[:3] + ["rev-parse", "HEAD"], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert environment.git_commit(str(repo / "a.py")) == {"commit": sha, "dirty": False}
    (repo / "a.py").write_text("x = 2\n")
    assert environment.git_commit(str(repo / "a.py")) == {"commit": sha, "dirty": True}


def test_orbax_private_cleanup_wait_still_exists_and_works(tmp_path):
    """checkpoint._await_tmp_cleanup calls CheckpointManager._maybe_await_cleanup_tmp_directory
    (orbax >= 0.11 cleans interrupted saves in a background thread). If orbax renames it, the
    wait silently does nothing and two managers race on the same folders: fail here instead."""
    import orbax.checkpoint as ocp

    from tfm_jax.train.checkpoint import Checkpointer

    assert callable(getattr(ocp.CheckpointManager, "_maybe_await_cleanup_tmp_directory", None)), \
        "orbax dropped CheckpointManager._maybe_await_cleanup_tmp_directory: update " \
        "tfm_jax/train/checkpoint.py:_await_tmp_cleanup"
    ckpt = Checkpointer(tmp_path, keep=2, async_save=False)
    ckpt.save(1, {"w": np.zeros((2,), np.float32)})
    ckpt.close()
    leftover = tmp_path / "2.orbax-checkpoint-tmp-99"
    (leftover / "default").mkdir(parents=True)
    ckpt = Checkpointer(tmp_path, keep=2, async_save=False)
    try:
        assert ckpt.latest_step() == 1
        assert not leftover.exists()        # cleaned, and waited for, when the manager opened
    finally:
        ckpt.close()
