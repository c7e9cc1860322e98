"""The provenance record of a results file (tfm_jax.ablate.provenance) against git and os."""

import os
import pathlib
import subprocess
import types

from tfm_jax.ablate.provenance import git_state, provenance

ROOT = pathlib.Path(__file__).resolve().parents[3]


def test_provenance_records_git_machine_device_load_and_command():
    dev = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")
    p = provenance("tfm-jax ablate x --seeds 0,1", [dev, dev], corpus={"sha256": "ab"})
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain",
                                 "--untracked-files=no"], capture_output=True,
                                text=True).stdout.strip())
    assert p["git"] == {"commit": head, "dirty": dirty}
    assert p["device"] == {"platform": "gpu", "device_kind": "NVIDIA H100 80GB HBM3",
                           "count": 2}
    assert p["machine"]["cores"] == os.cpu_count() and p["machine"]["cpu"]
    assert p["versions"]["jax"] and p["versions"]["python"]
    assert len(p["load_start"]) == 3 and p["load_end"] is None   # the runner fills the end
    assert p["command"] == "tfm-jax ablate x --seeds 0,1" and p["corpus"] == {"sha256": "ab"}


def test_git_state_outside_a_checkout(tmp_path):
    assert git_state(tmp_path) == {"commit": None, "dirty": None}
