"""Smoke test of benchmarks/long_context.py on tiny shapes (no timing assertions)."""

import json
import pathlib
import statistics
import sys

import jax

_ROOT = str(pathlib.Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks import long_context  # noqa: E402


def test_long_context_smoke(tmp_path, capsys):
    out = long_context.main(["--quick", "--impls", "flash", "block", "xla_sdpa",
                             "--max-unrolled", "2", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "long_context.json").read_text())
    assert res["rows"] == json.loads(json.dumps(out["rows"]))
    assert (tmp_path / "long_context.png").stat().st_size > 0
    rows = {(r["impl"], r["seq"]): r for r in res["rows"]}
    assert set(rows) == {(i, t) for i in ("flash", "block", "xla_sdpa")
                         for t in long_context.QUICK_SEQ}
    # block-causal at T=40 with block_q=8 would unroll 5 query blocks > --max-unrolled 2
    block40 = rows[("block", 40)]
    assert block40["status"] == "skipped" and "5 unrolled" in block40["note"]
    assert rows[("block", 16)]["status"] == "ok"
    for r in res["rows"]:
        if r["status"] != "ok":
            continue
        assert len(r["ms_all"]) == 1 and r["ms"] == statistics.median(r["ms_all"]) > 0
        m = r["memory_bytes"]
        assert m["total"] == m["temp"] + m["argument"] + m["output"] > 0
        # arguments: q (B,T,H,D), k, v (B,T,Hkv,D), dO (B,T,H,D), float32
        assert m["argument"] == 4 * r["seq"] * (2 * 4 + 2 * 2) * 8
    md = (tmp_path / "long_context.md").read_text()
    assert "| implementation | T=16 | T=40 |" in md
    for name in ("flash", "block", "xla_sdpa"):
        assert f"| {name} |" in md
    assert "block T=40: 5 unrolled query blocks" in md
    assert "wrote" in capsys.readouterr().out


def test_memory_cap_marks_the_run_not_run():
    args = long_context.parse_args(["--quick", "--mem-cap-gb", "0"])
    core, _ = long_context.make_core("dense", args)
    row = long_context.measure("dense", core, 16, args, jax.devices()[0])
    assert row["status"] == "skipped" and "> --mem-cap-gb 0" in row["note"]
    assert row["memory_bytes"]["total"] > 0 and "ms" not in row
    assert long_context._cell(row).startswith("not run (")
