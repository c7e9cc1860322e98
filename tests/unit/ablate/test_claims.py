"""The claims ledger (tfm_jax.ablate.claims): extraction from the studies' results files (JSON, and
the Markdown fallback), missing results, the arithmetic checks against hand-computed values,
the table, and `tfm-jax claims`."""

import json
import pathlib

import pytest

from tfm_jax.ablate import claims
from tfm_jax.ablate.claims import (ARITHMETIC, CLAIMS, CONFIRMED, MISSING, NOT_MEASURABLE, REFUTED,
                            STUDIES, VERDICTS, Sources)


def _write(root: pathlib.Path, study: str, obj) -> None:
    path = root / STUDIES[study][0]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def _rows_by_quote(rows):
    return {r["claim"]: r for r in rows}


def test_records_are_well_formed():
    for c in CLAIMS:
        assert c.section.startswith("Ch") and c.quote and c.seed_figure
        assert c.study is None or c.study in STUDIES
    # one row per claim text
    assert len({(c.section, c.quote) for c in CLAIMS}) == len(CLAIMS)


def test_empty_root_gives_missing_rows_with_commands(tmp_path):
    (tmp_path / "studies").mkdir()
    rows = claims.ledger(tmp_path)
    assert len(rows) == len(CLAIMS)
    for c, r in zip(CLAIMS, rows):
        assert r["verdict"] in VERDICTS
        if c.study is not None and c.study != "moe":
            assert r["verdict"] == MISSING, r
            assert STUDIES[c.study][1] in r["note"]        # says which command produces them
        if r["verdict"] not in (NOT_MEASURABLE, MISSING):
            assert r["command"] != "—", r                 # measured rows are reproducible


def test_arithmetic_rows():
    rows = _rows_by_quote(claims.ledger(pathlib.Path("/nonexistent")))
    # KV cache of Llama-3-8B at 4096 tokens, bf16: 2 * kv * 128 * 2 B * 32 layers * 4096
    for quote, kv, seed in (("Llama-3-8B seq 4k: KV cache MHA 640 MB", 32, 640),
                            ("... GQA (g=8) 160 MB", 8, 160), ("... MQA 20 MB", 1, 20)):
        r = rows[quote]
        mib = 2 * kv * 128 * 2 * 32 * 4096 / 2**20
        assert r["measured"] == f"{mib:,.0f} MiB" and r["verdict"] == ARITHMETIC
    r = rows["Llama: d=4096 -> hidden = (2/3)·4d = 14336"]
    assert "10,922" in r["measured"] and "14,336" in r["measured"]
    assert r["verdict"] == ARITHMETIC
    assert "16.06 GB" in rows["memory in all: MHA 14.2 GB, GQA 11.8 GB, MQA 10.9 GB"]["measured"]
    assert rows["E4M3 max representable value 448"]["verdict"] == CONFIRMED
    # the seed's own ratios: 2460/1820 = 1.352 (stated 1.35) holds
    assert rows["decode throughput GQA 2460 vs MHA 1820 tok/s"]["verdict"] == CONFIRMED


def test_ratio_finding_flags_inconsistent_numbers():
    f = claims.ratio_finding(2, 1, 3.0, "x")(Sources("."))
    assert f.verdict == ARITHMETIC and "2 / 1 = 2" in f.measured
    assert claims.ratio_finding(3, 1, 3.0, "x")(Sources(".")).verdict == CONFIRMED


def test_from_study_maps_verdicts_and_formats(tmp_path):
    _write(tmp_path, "norm", {"where": "cpu", "claims": [
        {"claim": "RMSNorm loses no accuracy against LayerNorm", "measured": -0.0028,
         "verdict": "holds", "where": "CPU x1"},
        {"claim": "RMSNorm cuts compute by ~15 %", "measured": 0.95, "verdict": "does not hold"},
        {"claim": "LayerNorm trains better", "measured": None, "verdict": "not measured"}]})
    src = Sources(tmp_path)
    f = claims.from_study("norm", "loses no accuracy")(src)
    assert (f.measured, f.verdict, f.where) == ("-0.0028", CONFIRMED, "CPU x1")
    f = claims.from_study("norm", "cuts compute")(src)
    assert (f.verdict, f.where) == (REFUTED, "cpu")        # falls back to the study's where
    assert claims.from_study("norm", "cuts compute", verdict=NOT_MEASURABLE)(src).verdict == \
        NOT_MEASURABLE
    with pytest.raises(claims.Missing, match="was not measured"):
        claims.from_study("norm", "trains better")(src)
    with pytest.raises(claims.Missing, match="no claim containing 'nothing'"):
        claims.from_study("norm", "nothing")(src)
    row = claims.evaluate(claims.Claim("Ch1.1", "q", "s", claims.from_study("norm", "nothing"),
                                       "cmd", "norm"), src)
    assert row["verdict"] == MISSING and STUDIES["norm"][1] in row["note"]


def test_markdown_fallback(tmp_path):
    md = tmp_path / "studies/ablate_attention/results.md"
    md.parent.mkdir(parents=True)
    md.write_text("# Ablation\n\nWhere: cpu (X), 1 device(s)\n\n## Claims\n\n"
                  "| # | claim | source | claimed | measured | verdict | where measured |\n"
                  "|---|---|---|---|---|---|---|\n"
                  "| 1 | MHA trains 2.1x faster than one head | seed | 2.100 | 0.9164 | does not "
                  "hold | CPU x1 |\n| 2 | GQA costs only +0.12 | seed | 0.12 | 0.1488 | holds | "
                  "CPU x1 |\n\n## Runs\n\n| a | b | c | d | e | f | g |\n")
    src = Sources(tmp_path)
    assert src.results("attention")["where"] == "cpu (X), 1 device(s)"
    rows = src.results("attention")["claims"]
    assert [r["claim"] for r in rows] == ["MHA trains 2.1x faster than one head",
                                          "GQA costs only +0.12"]
    f = claims.from_study("attention", "2.1x faster")(src)
    assert (f.measured, f.verdict) == ("0.9164", REFUTED)


def test_metric_extractors(tmp_path):
    agg = {v: {"val_loss": {"mean": x}, "ffn_zero_fraction": {"mean": 0.5},
               "ffn_erank_hidden": {"mean": 250.0}, "ffn_erank_out": {"mean": 120.0}}
           for v, x in (("relu_1d", 2.5), ("relu_2d", 2.4), ("relu_4d", 2.3), ("relu_8d", 2.2))}
    _write(tmp_path, "ffn", {"where": "cpu", "aggregates": {"scalars": agg}, "claims": [
        {"claim": "4d is the best width", "measured": 0.1, "verdict": "does not hold"}]})
    src = Sources(tmp_path)
    f = claims.ffn_hidden_rank(src)
    assert f.verdict == CONFIRMED and "hidden 250 (1.95d)" in f.measured
    agg["relu_4d"]["ffn_erank_out"]["mean"] = 40.0
    _write(tmp_path, "ffn", {"where": "cpu", "aggregates": {"scalars": agg}, "claims": []})
    assert claims.ffn_hidden_rank(Sources(tmp_path)).verdict == REFUTED
    with pytest.raises(claims.Missing, match=r"nothing\[relu_1d\] not in"):
        claims.metric(Sources(tmp_path), "ffn", "nothing", "relu_1d")


def test_norm_speed_verdict(tmp_path):
    def speed(r):
        _write(tmp_path, "norm_speed", {"where": "cpu", "rows": [
            {"d": 128, "rms_over_ln_fwd": r, "rms_over_ln_fwd_bwd": 0.5}]})
        return claims.norm_speed(Sources(tmp_path)).verdict
    assert speed(0.85) == CONFIRMED
    assert speed(0.97) == REFUTED
    assert speed(0.5) == REFUTED


def test_markdown_table_and_cli(tmp_path, capsys):
    from tfm_jax import cli
    (tmp_path / "studies").mkdir()
    assert cli.main(["claims", "--root", str(tmp_path)]) == 0
    text = (tmp_path / "CLAIMS.md").read_text()
    table = [ln for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith("| #")]
    assert len(table) == len(CLAIMS)
    assert all(ln.count(" | ") == 7 for ln in table)      # '|' inside cells is escaped
    assert f"{len(CLAIMS)} claims:" in capsys.readouterr().out
    assert cli.main(["claims", "--root", str(tmp_path / "nowhere")]) == 2


def test_depth_gradients(tmp_path):
    def rows(spreads):
        out = []
        for v, (a, b) in spreads.items():
            for layer, g in enumerate((1.0, a)):
                out.append({"variant": v, "layer": layer, "grad_norm_init": {"mean": g},
                            "grad_norm_final": {"mean": g * b}})
        return out

    def verdict(spreads):
        _write(tmp_path, "norm_depth", {"where": "cpu", "aggregates": {"series": {
            "grad_norms": {"by": ["layer"], "rows": rows(spreads)}}}})
        return claims.depth_gradients(Sources(tmp_path))
    even = {"pre24_w": (1.1, 1), "pre24_nw": (1.2, 1), "post24_w": (3.0, 1),
            "post24_nw": (2.0, 1)}
    f = verdict(even)
    assert f.verdict == CONFIRMED and "post24_w: max/min over blocks 3 at init" in f.measured
    assert verdict({**even, "pre24_nw": (2.5, 1)}).verdict == REFUTED
    _write(tmp_path, "norm_depth", {"aggregates": {"series": {"g": {"rows": rows(
        {"pre24_w": (1, 1)})}}}})
    with pytest.raises(claims.Missing, match="pre24_nw"):
        claims.depth_gradients(Sources(tmp_path))


def test_moe_rows(tmp_path):
    f = claims.moe_row("cuts communication by 40", "needs Gaudi")
    with pytest.raises(claims.Missing, match="moe_study/results.json not found"):
        f(Sources(tmp_path))
    _write(tmp_path, "moe", {"where": "cpu", "claims": [
        {"claim": "the fused path cuts communication by 40 %", "measured": 0.0,
         "verdict": "does not hold", "where": "CPU x8"}]})
    r = f(Sources(tmp_path))
    assert (r.measured, r.verdict, r.where) == ("0", REFUTED, "CPU x8")
    r = claims.moe_row("sends all_to_all twice", "checked as code")(Sources(tmp_path))
    assert r.verdict == NOT_MEASURABLE and r.note == "checked as code"
