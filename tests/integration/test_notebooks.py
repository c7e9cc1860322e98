"""Execute every ``notebooks/*.ipynb`` top to bottom in a fresh Jupyter kernel.

The kernel is a subprocess of this test and inherits its environment, including the 8 fake CPU
devices that ``conftest.py`` puts in ``XLA_FLAGS`` -- the notebooks must work with 1 or 8 devices
-- and ``TFM_JAX_NB_QUICK=1``, which the notebooks read to shrink their training runs and sweeps
(fewer steps, fewer variants). All five together took 206-241 s of CPU time on the 2-core
development VM (5-10 min wall clock under load from other jobs; notebooks/README.md), the
issue's budget being 5 min, so the test is not marked slow.

The notebooks are stored without outputs (readable diffs, small repository) and are thin: they
import ``tfm_jax`` and define no layers; both are checked here without running anything.
"""

from __future__ import annotations

import pathlib
import re

import pytest

nbformat = pytest.importorskip("nbformat", reason="notebook tests need the dev extra: "
                               "pip install -e '.[dev]'")
nbclient = pytest.importorskip("nbclient", reason="notebook tests need the dev extra: "
                               "pip install -e '.[dev]'")

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parents[2] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = {"01_quickstart", "02_components", "03_attention", "04_low_precision", "05_moe"}
# A notebook explores the package; layers, modules and training loops live in tfm_jax.
FORBIDDEN = [(re.compile(r"^\s*class\s", re.M), "a class definition"),
             (re.compile(r"\bnn\.(Module|compact)\b"), "a Flax module")]


def _kernel_name() -> str:
    """The ipykernel ``python3`` kernel. jupyter_client lists it even when no kernelspec is
    installed on disk (it falls back to ipykernel's built-in spec), and it runs the kernel with
    this interpreter (``sys.executable``), so no ``ipykernel install`` is needed."""
    from jupyter_client.kernelspec import KernelSpecManager, NATIVE_KERNEL_NAME

    specs = KernelSpecManager().find_kernel_specs()
    assert NATIVE_KERNEL_NAME in specs, (
        f"no '{NATIVE_KERNEL_NAME}' Jupyter kernel found (have: {sorted(specs)}); "
        "install ipykernel in this environment: pip install -e '.[dev]'")
    return NATIVE_KERNEL_NAME


def test_notebooks_found():
    assert NOTEBOOKS, f"no notebooks in {NOTEBOOK_DIR}"
    missing = EXPECTED - {p.stem for p in NOTEBOOKS}
    assert not missing, f"notebooks missing from {NOTEBOOK_DIR}: {sorted(missing)}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_stored_clean(path):
    """No outputs or execution counts in the stored file, and no layer code in its cells."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    dirty = [i for i, c in enumerate(code) if c.get("outputs") or c.get("execution_count")]
    assert not dirty, (f"{path.name}: code cells {dirty} hold outputs; clear them before "
                       "committing (Jupyter: Edit > Clear Outputs of All Cells)")
    for i, cell in enumerate(code):
        for pattern, what in FORBIDDEN:
            assert not pattern.search(cell.source), (
                f"{path.name}, code cell {i}: {what}; notebooks import tfm_jax and define no "
                "layers -- put the code in the package (with a test) and call it")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path, monkeypatch):
    # The kernel inherits this environment: its tempfile.mkdtemp() run directories land under
    # tmp_path (cleaned up by pytest) instead of piling up in /tmp.
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("TFM_JAX_NB_QUICK", "1")            # the notebooks' small settings
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, kernel_name=_kernel_name(), timeout=600,
        resources={"metadata": {"path": str(tmp_path)}})   # kernel cwd
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as err:
        pytest.fail(f"{path.name} failed:\n{err}", pytrace=False)
    errors = [out for cell in nb.cells if cell.cell_type == "code"
              for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    assert not errors, f"{path.name}: error outputs {errors}"
