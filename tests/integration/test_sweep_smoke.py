"""benchmarks/sweep.py on tiny shapes: it runs, writes its table, JSON and plot (no timing
assertions: timing belongs in benchmarks, not in tests)."""

import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from benchmarks import sweep  # noqa: E402


@pytest.mark.slow   # benchmark script smoke
def test_quick_sweep_writes_outputs(tmp_path):
    rows = sweep.run_sweep(tmp_path, quick=True, no_torch=True)
    assert [r["case"] for r in rows] == ["tiny", "seq 16", "seq 32"]
    assert all(r["jax_tokens_per_s"] > 0 and r["torch_tokens_per_s"] is None for r in rows)
    assert json.loads((tmp_path / "sweep.json").read_text())[0]["case"] == "tiny"
    assert "| seq 32 |" in (tmp_path / "sweep.md").read_text()
    png = (tmp_path / "seq_scaling.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


@pytest.mark.slow   # 12 s: benchmark script smoke
def test_profile_step_phases_and_ablations_run():
    from benchmarks import profile_step
    shape = dict(vocab_size=256, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16,
                 ffn_hidden=64)
    ph = profile_step.phases(shape, 16, 2, 2)
    assert set(ph) == {"forward", "forward+backward", "forward+backward+adamw",
                       "full train step"}
    ab = profile_step.ablations(shape, 16, 2, 2)
    assert len(ab) == 4 and all(v["min_ms"] > 0 for v in ab.values())
    tr = profile_step.trace(shape, 16, 2, top=5)
    assert tr["rows"] and {"phase", "kind", "module", "ms"} <= set(tr["rows"][0])
