"""The Python API's quick checks: only ``tfm_jax`` top-level names are imported (the API's
stability contract). The API on a run: tests/integration/test_api_run.py and test_api_train.py."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

import tfm_jax


def test_import_tfm_jax_imports_no_jax():
    """The CLI and ``import tfm_jax`` stay free of jax until an API name is used."""
    code = ("import sys, tfm_jax; print('jax' in sys.modules, callable(tfm_jax.load_run), "
            "'jax' in sys.modules)")
    root = pathlib.Path(tfm_jax.__file__).resolve().parents[1]      # this checkout's package
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=root).stdout.split()
    assert out == ["False", "True", "True"]


def test_the_api_names():
    assert {"load_run", "import_hf", "train", "Run"} <= set(dir(tfm_jax))
    assert callable(tfm_jax.load_run) and callable(tfm_jax.import_hf)
    assert isinstance(tfm_jax.Run, type)
    # tfm_jax.train is both the API function (callable) and the training subpackage
    assert callable(tfm_jax.train)
    from tfm_jax.train import Trainer   # noqa: F401  (the subpackage still imports as before)
    with pytest.raises(AttributeError):
        tfm_jax.no_such_name


def test_bad_input_without_a_run(tmp_path):
    with pytest.raises(Exception, match="no config.yaml there"):
        tfm_jax.load_run(tmp_path)
    with pytest.raises(Exception, match="config must be a Config"):
        tfm_jax.train(42)
    with pytest.raises(Exception, match="no_such_key"):
        tfm_jax.train("tiny", overrides={"train.no_such_key": 1}, out=tmp_path / "r")
    assert not (tmp_path / "r").exists()
