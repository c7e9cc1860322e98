"""benchmarks/fp8_scaling_overhead.py on a tiny shape (no timing assertions): the per-round
ratios it keeps are the ones its median is taken over, and the results record provenance."""

import json
import pathlib
import sys

_ROOT = str(pathlib.Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks import fp8_scaling_overhead as bench  # noqa: E402


def test_overhead_rounds_and_provenance(tmp_path):
    out = tmp_path / "overhead.json"
    res = bench.main(["--shapes", "64x32x16", "--repeats", "3", "--iters", "1",
                      "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    (row,) = res["rows"]
    assert row["shape"] == [64, 32, 16] and res["repeats"] == 3
    rounds = row["amax_scale_over_gemm_rounds"]
    assert len(rounds) == 3 and all(r > 0 for r in rounds)
    # a ratio of medians: a_i >= c * g_i for every round gives median(a) >= c * median(g), so it
    # lies within the per-round ratios' range
    assert min(rounds) <= row["amax_scale_over_gemm"] * 1.0000001
    assert max(rounds) >= row["amax_scale_over_gemm"] * 0.9999999
    assert row["amax_scale_over_gemm"] == row["median_s"]["amax_scale"] / row["median_s"]["gemm"]
    prov = res["provenance"]
    assert prov["command"].startswith("python -m benchmarks.fp8_scaling_overhead --shapes")
    assert prov["load_start"] is not None and prov["load_end"] is not None
    assert set(prov["git"]) == {"commit", "dirty"} and prov["device"]["platform"] == "cpu"
