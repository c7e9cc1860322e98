"""The memory check before training (tfm_jax.train.memory.check_fits, train.memory_check): a
step that will not fit stops the run with one line before any state is allocated or written."""

import pytest

from tfm_jax.config import ConfigError
from tfm_jax.train import memory
from train_support import small_cfg


def test_available_bytes_on_cpu_is_a_positive_figure(devices):
    have, source = memory.available_bytes(devices[:1])
    assert have is not None and have > 0 and source


def test_step_that_does_not_fit_stops_before_anything_is_written(tmp_path, monkeypatch, devices):
    from tfm_jax import train as train_lib

    run = tmp_path / "run"
    seen = {}

    def tiny_host(devices):
        seen["devices"] = len(devices)
        return 1 << 10, "a 1 KiB test figure"
    monkeypatch.setattr(memory, "available_bytes", tiny_host)
    # the compiled step's own figure is read in tests/integration/test_shared_runs.py (under a
    # real 'ulimit -v'); here a fixed estimate keeps the test free of a compile
    monkeypatch.setattr(memory, "peak_memory", lambda *a: {"peak_estimate": 3 << 20})
    cfg = small_cfg(run, "mesh.data=1", "train.steps=2")
    with pytest.raises(ConfigError) as e:
        train_lib.train(cfg, devices=devices[:1])
    msg = str(e.value)
    assert "\n" not in msg and "a 1 KiB test figure" in msg and "train.memory_check=false" in msg
    assert "compiled train step needs about 3.00 MiB" in msg and seen["devices"] == 1
    assert not (run / "config.yaml").exists() and not (run / "checkpoints").exists()
