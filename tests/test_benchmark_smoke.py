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


def test_gemm_rates_smoke(tmp_path, capsys):
    from benchmarks import gemm_rates
    out = gemm_rates.main(["--iters", "1", "--repeats", "1", "--json", str(tmp_path / "g.json")])
    rows = json.loads((tmp_path / "g.json").read_text())["rows"]
    assert len(rows) == len(out["rows"]) == 6 * 4
    for r in rows:
        flops = 2.0 * r["n"] * r["k"] * r["m"]
        assert r["jax_gflops"] == pytest.approx(flops / (r["jax_ms"] / 1e3) / 1e9, rel=1e-9)
        assert r["ratio"] == pytest.approx(r["torch_ms"] / r["jax_ms"], rel=1e-9)
    assert "jax/torch speed" in capsys.readouterr().out


def test_profile_step_torch_phases_tiny():
    from benchmarks import profile_step
    shape = dict(vocab_size=256, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8,
                 ffn_hidden=64)
    ph = profile_step.torch_phases(shape, 16, 2, 2)
    assert set(ph) == {"torch forward", "torch forward+backward", "torch full step (AdamW)"}
    assert all(v["median_ms"] > 0 for v in ph.values())
