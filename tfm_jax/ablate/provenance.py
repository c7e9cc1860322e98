"""What produced a results file: the one place a study's provenance is written.

:func:`provenance` returns the record every ``results.json`` of ``tfm-jax ablate`` carries
under ``"provenance"``: the git commit and whether the tree was dirty, package versions, the
machine (CPU model, cores), the device kind, the load average (the runner calls it at the
start and adds ``load_end`` at the end) and the exact command line. ``corpus`` is filled by
the caller when the runs' corpus fingerprint is known (None otherwise). No jax import unless
``devices`` is given.
"""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import platform
import subprocess
import sys
from typing import Any, Optional

PACKAGES = ("tfm-jax", "jax", "jaxlib", "flax", "optax", "numpy", "ml_dtypes", "scipy")


def git_state(root: Optional[pathlib.Path] = None) -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool or None}`` of the checkout holding ``root``
    (default: this package's folder); None values outside a git checkout."""
    root = root or pathlib.Path(__file__).resolve().parents[2]

    def git(*args: str) -> Optional[str]:
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True,
                                 text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit.strip(), "dirty": None if status is None else bool(status.strip())}


def versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, Optional[str]]:
    out: dict[str, Optional[str]] = {"python": platform.python_version()}
    for p in packages:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            out[p] = None
    return out


def cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def load_average() -> Optional[list[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def device_info(devices: Optional[list]) -> dict[str, Any]:
    """``{"platform": "cpu", "device_kind": "cpu", "count": 1}`` of the run's devices."""
    if devices is None:
        import jax

        devices = jax.devices()
    d = list(devices)[0]
    return {"platform": d.platform, "device_kind": getattr(d, "device_kind", d.platform),
            "count": len(list(devices))}


def provenance(command: Optional[str] = None, devices: Optional[list] = None, *,
               corpus: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The provenance record of a results file (see the module docstring)."""
    return {"git": git_state(), "versions": versions(),
            "machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                        "system": f"{platform.system()} {platform.release()}"},
            "device": device_info(devices),
            "load_start": load_average(), "load_end": None,
            "command": command if command is not None else " ".join(sys.argv),
            "argv": list(sys.argv),
            # the corpus fingerprint of the runs: filled by the caller when known
            "corpus": corpus}


__all__ = ["git_state", "load_average", "provenance", "versions"]
