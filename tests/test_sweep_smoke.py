"""benchmarks/sweep.py on tiny shapes: it runs, writes its table, JSON and plot (no timing
assertions: timing belongs in benchmarks, not in tests)."""

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import sweep  # noqa: E402


def test_quick_sweep_writes_outputs(tmp_path):
    rows = sweep.run_sweep(tmp_path, quick=True, no_torch=True)
    assert [r["case"] for r in rows] == ["tiny", "seq 16", "seq 32"]
    assert all(r["jax_tokens_per_s"] > 0 and r["torch_tokens_per_s"] is None for r in rows)
    assert json.loads((tmp_path / "sweep.json").read_text())[0]["case"] == "tiny"
    assert "| seq 32 |" in (tmp_path / "sweep.md").read_text()
    png = (tmp_path / "seq_scaling.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
