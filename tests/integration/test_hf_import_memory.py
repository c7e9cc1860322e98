"""benchmarks/hf_import_memory.py at a small shape: both folders import in fresh processes and
the figures are written (no memory thresholds: measurement belongs to the benchmark)."""

import json
import pathlib
import sys

_ROOT = str(pathlib.Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks import hf_import_memory  # noqa: E402


def test_hf_import_memory_smoke(tmp_path, capsys):
    out = tmp_path / "mem.json"
    res = hf_import_memory.main(["--d-model", "128", "--layers", "2", "--vocab", "4096",
                                 "--out", str(out)])
    text = capsys.readouterr().out
    assert "tfm-jax import-hf" in text and "read_hf (reader only)" in text
    d, f, v = 128, 384, 4096      # ffn_hidden 384: the default SwiGLU width at d_model 128
    m = res["model"]
    assert m["params"] == 2 * v * d + 2 * (4 * d * d + 3 * d * f + 2 * d) + d, m
    assert json.loads(out.read_text()) == res
    for what in ("read", "import"):
        assert res[what]["peak_mib"] >= res[what]["before_mib"] > 0
