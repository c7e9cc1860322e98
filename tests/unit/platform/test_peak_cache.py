"""The MFU denominator on CPU: the matmul peak is measured once per machine and cached in a JSON
file (keyed by CPU model, jax version, devices and dtype), re-measured when the file is corrupt,
written atomically, and overridden by train.peak_flops."""

import json
import math

import pytest

from tfm_jax.platform import backends
from tfm_jax.config import load_config


PROBE = 1e3    # FLOP/s the start-up probe reports in these tests (far below any real matmul)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache dir, and a count of real measurements (the real function is called)."""
    monkeypatch.setenv("TFM_JAX_CACHE", str(tmp_path / "cache"))
    calls = []
    real = backends.measured_matmul_peak.__wrapped__

    def counted(n=1024, dtype="float32", seconds=0.5):
        if seconds == backends.PEAK_PROBE_SECONDS:   # start-up probes: not counted, and a fixed
            return PROBE                             # rate, so they never race the real value
        calls.append(dtype)
        return real(256, dtype, 0.05)          # small: the test checks caching, not speed

    monkeypatch.setattr(backends.measured_matmul_peak, "__wrapped__", counted)
    return tmp_path / "cache" / backends.PEAK_CACHE_FILE, calls


def test_measured_once_then_read_from_the_file(cache):
    path, calls = cache
    flops, source = backends.cached_matmul_peak("float32")
    assert calls == ["float32"] and flops > 0 and math.isfinite(flops)
    assert "measured now" in source and str(path) in source
    entries = json.loads(path.read_text())
    key = backends.peak_cache_key("float32")
    assert entries[key]["flops"] == flops
    import jax
    assert jax.__version__ in key and backends._cpu_model() in key
    assert f"x{jax.device_count()}" in key and key.endswith("float32")

    again, source2 = backends.cached_matmul_peak("float32")    # a second run: the file
    assert again == flops and calls == ["float32"] and "cached in" in source2
    # another dtype is another key: measured, and both entries kept
    backends.cached_matmul_peak("bfloat16")
    assert calls == ["float32", "bfloat16"]
    assert set(json.loads(path.read_text())) == {key, backends.peak_cache_key("bfloat16")}


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"%s": {"flops": -1}}',
                                     '{"%s": {"flops": "fast"}}', ""])
def test_corrupt_cache_is_measured_again(cache, content):
    path, calls = cache
    path.parent.mkdir(parents=True)
    path.write_text(content.replace("%s", backends.peak_cache_key("float32")))
    flops, source = backends.cached_matmul_peak("float32")
    assert calls == ["float32"] and flops > 0 and "measured now" in source
    assert json.loads(path.read_text())[backends.peak_cache_key("float32")]["flops"] == flops


def test_cache_written_atomically(cache, monkeypatch):
    """A write that fails half-way (here: os.replace) leaves the old file intact and no temp
    file; the run still gets its measured peak."""
    path, calls = cache
    backends.cached_matmul_peak("float32")
    before = path.read_text()

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(backends.os, "replace", fail)
    flops, _ = backends.cached_matmul_peak("bfloat16")          # new key: measure + write
    assert flops > 0 and calls == ["float32", "bfloat16"]
    assert path.read_text() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_peak_flops_override_and_source(cache):
    path, calls = cache
    cfg = load_config(None, ["train.peak_flops=1e11"])
    assert backends.peak_flops_info(cfg, 8) == (1e11, "train.peak_flops")   # CPU: not x devices
    assert calls == [] and not path.exists()
    flops, source = backends.peak_flops_info(load_config(None), 8)
    assert flops == backends.peak_flops(load_config(None), 8) and calls == ["float32"]
    assert source.startswith("CPU float32 matmul peak")


def test_startup_probe_raises_a_low_cached_peak_and_never_lowers_it(cache):
    """A peak cached on a busy machine is replaced by a faster probe; a slower probe (this
    machine can't do 1e18 FLOP/s) leaves the cached value alone."""
    path, calls = cache
    key = backends.peak_cache_key("float32")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({key: {"flops": 1.0, "measured": "then"}}))
    flops, source = backends.cached_matmul_peak("float32")
    assert flops == PROBE and "probe" in source and calls == []
    assert json.loads(path.read_text())[key]["flops"] == flops
    path.write_text(json.dumps({key: {"flops": 1e18, "measured": "then"}}))
    flops, source = backends.cached_matmul_peak("float32")
    assert flops == 1e18 and "best so far" in source
    assert json.loads(path.read_text())[key]["flops"] == 1e18
