"""Smoke test of benchmarks/train_throughput.py on a tiny shape (no timing assertions)."""

import json
import pathlib
import sys

import jax
import pytest

pytest.importorskip("torch")

_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks import train_throughput  # noqa: E402


def test_train_throughput_smoke(tmp_path, capsys):
    out_path = tmp_path / "bench.json"
    ret = train_throughput.main([
        "--d-model", "32", "--layers", "1", "--heads", "4", "--kv-heads", "2", "--seq", "16",
        "--batch", "2", "--vocab", "256", "--steps", "2", "--warmup", "1", "--peak-n", "256",
        "--json", str(out_path)])
    res = json.loads(out_path.read_text())
    assert res["ratio"] == ret["ratio"]
    jx, pt = res["results"]["tfm_jax"], res["results"]["torch"]
    assert jx["tokens_per_s"] > 0 and pt["tokens_per_s"] > 0
    assert res["ratio"] == pytest.approx(jx["tokens_per_s"] / pt["tokens_per_s"], rel=1e-12)
    assert len(jx["step_ms_all"]) == 2 and len(pt["step_ms_all"]) == 2
    assert jx["n_params"] == pt["n_params"]            # the same model in both frameworks
    assert res["shape"]["vocab_size"] == 256 or res["vocab_note"]
    # one device, whatever XLA_FLAGS fakes (conftest: 8)
    assert res["machine"]["jax_devices_used"] == 1
    assert res["machine"]["jax_devices_visible"] == len(jax.devices())
    assert 0 < jx["mfu"] and 0 < pt["mfu"]
    assert "ratio tfm_jax/torch tokens/s" in capsys.readouterr().out
