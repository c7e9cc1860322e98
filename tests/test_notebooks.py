"""Execute every ``notebooks/*.ipynb`` top to bottom in a fresh Jupyter kernel.

The kernel is a subprocess of this test and inherits its environment, including the 8 fake CPU
devices that ``conftest.py`` puts in ``XLA_FLAGS`` -- the notebooks must work with 1 or 8 devices.
``01_quickstart`` takes about 15 s here (2 CPU cores), so the test is not marked slow.
"""

from __future__ import annotations

import pathlib

import pytest

nbformat = pytest.importorskip("nbformat", reason="notebook tests need the dev extra: "
                               "pip install -e '.[dev]'")
nbclient = pytest.importorskip("nbclient", reason="notebook tests need the dev extra: "
                               "pip install -e '.[dev]'")

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))


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


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path, monkeypatch):
    # The kernel inherits this environment: its tempfile.mkdtemp() run directories land under
    # tmp_path (cleaned up by pytest) instead of piling up in /tmp.
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, kernel_name=_kernel_name(), timeout=300,
        resources={"metadata": {"path": str(tmp_path)}})   # kernel cwd
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as err:
        pytest.fail(f"{path.name} failed:\n{err}", pytrace=False)
    errors = [out for cell in nb.cells if cell.cell_type == "code"
              for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    assert not errors, f"{path.name}: error outputs {errors}"
