"""Smoke test of benchmarks/train_throughput.py on a tiny shape (no timing assertions)."""

import json
import pathlib
import re
import statistics
import sys

import jax
import pytest

pytest.importorskip("torch")

_ROOT = str(pathlib.Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks import train_throughput  # noqa: E402


def _table_rows(stdout: str) -> dict[str, tuple[float, ...]]:
    """The printed results table: framework -> (tokens/s, step ms, MFU %, best step ms)."""
    rows = {}
    for m in re.finditer(r"^(tfm_jax|torch)\s+\|\s+([\d,]+)\s+\|\s+([\d.]+)\s+\|\s+"
                         r"([\d.]+)%\s+\|\s+([\d.]+)\s*$", stdout, re.M):
        rows[m.group(1)] = (float(m.group(2).replace(",", "")), *map(float, m.group(3, 4, 5)))
    return rows


def test_train_throughput_smoke(tmp_path, capsys):
    """Every derived number is re-derived here from the raw per-step timings and the shape
    (not from the fields it was computed from), and the printed table matches the JSON."""
    batch, seq, steps = 2, 16, 2
    out_path = tmp_path / "bench.json"
    ret = train_throughput.main([
        "--d-model", "32", "--layers", "1", "--heads", "4", "--kv-heads", "2", "--seq", str(seq),
        "--batch", str(batch), "--vocab", "256", "--steps", str(steps), "--warmup", "1",
        "--peak-n", "256", "--json", str(out_path)])
    stdout = capsys.readouterr().out
    res = json.loads(out_path.read_text())
    assert res["ratio"] == ret["ratio"]
    jx, pt = res["results"]["tfm_jax"], res["results"]["torch"]
    for r in (jx, pt):
        assert len(r["step_ms_all"]) == steps and all(t > 0 for t in r["step_ms_all"])
        med_s, best_s = statistics.median(r["step_ms_all"]) / 1e3, min(r["step_ms_all"]) / 1e3
        assert r["step_ms"] == pytest.approx(1e3 * med_s, rel=1e-9)
        assert r["tokens_per_s"] == pytest.approx(batch * seq / med_s, rel=1e-9)
        assert r["best_tokens_per_s"] == pytest.approx(batch * seq / best_s, rel=1e-9)
    # ratio of medians of the raw step times (torch step / tfm_jax step)
    assert res["ratio"] == pytest.approx(statistics.median(pt["step_ms_all"])
                                         / statistics.median(jx["step_ms_all"]), rel=1e-9)
    assert res["ratio_best_step"] == pytest.approx(min(pt["step_ms_all"])
                                                   / min(jx["step_ms_all"]), rel=1e-9)
    # FLOPs/token from the shape by the PaLM formula, params by direct count
    sh = res["shape"]
    d, L, H, KV, Dh, F, V = (sh[k] for k in ("d_model", "n_layers", "n_heads", "n_kv_heads",
                                             "head_dim", "ffn_hidden", "vocab_size"))
    assert (sh["seq_len"], sh["batch_size"]) == (seq, batch)
    n_matmul = L * (d * H * Dh + 2 * d * KV * Dh + H * Dh * d + 3 * d * F) + d * V
    assert jx["n_params"] == pt["n_params"] == n_matmul + V * d + (2 * L + 1) * d
    flops_tok = 6 * n_matmul + 12 * L * seq * H * Dh
    assert res["train_flops_per_token"] == pytest.approx(flops_tok, rel=1e-12)
    peak = max(res["peak"]["jax_all"] + res["peak"]["torch_all"])
    assert res["peak"]["machine_fp32_matmul"] == peak > 0
    for r in (jx, pt):
        assert r["mfu"] == pytest.approx(batch * seq / (r["step_ms"] / 1e3) * flops_tok / peak,
                                         rel=1e-9)
    # the printed table and ratio line say what the JSON says (to their printed precision)
    table = _table_rows(stdout)
    assert set(table) == {"tfm_jax", "torch"}, stdout
    for name, r in (("tfm_jax", jx), ("torch", pt)):
        tps, step_ms, mfu_pct, best_ms = table[name]
        assert tps == pytest.approx(r["tokens_per_s"], abs=0.5)
        assert step_ms == pytest.approx(r["step_ms"], abs=0.05)
        assert mfu_pct == pytest.approx(100 * r["mfu"], abs=0.05)
        assert best_ms == pytest.approx(min(r["step_ms_all"]), abs=0.05)
    m = re.search(r"ratio tfm_jax/torch tokens/s: ([\d.]+)x \(medians; best steps: ([\d.]+)x\)",
                  stdout)
    assert m, stdout
    assert float(m.group(1)) == pytest.approx(res["ratio"], abs=0.005)
    assert float(m.group(2)) == pytest.approx(res["ratio_best_step"], abs=0.005)
    assert res["shape"]["vocab_size"] == 256 or res["vocab_note"]
    # one device, whatever XLA_FLAGS fakes (conftest: 8)
    assert res["machine"]["jax_devices_used"] == 1
    assert res["machine"]["jax_devices_visible"] == len(jax.devices())


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
    assert all(0 < v["min_ms"] <= v["median_ms"] for v in ph.values())


def test_decode_smoke(tmp_path, capsys):
    """benchmarks/decode.py end to end at a tiny shape: the JSON has the issue's layout, both
    implementations decode the same greedy ids from the same weights (exported to the peer),
    and the traffic bound is the byte count / the bandwidth measured in the run."""
    from benchmarks import decode

    out = tmp_path / "decode.json"
    res = decode.main(["--d-model", "32", "--layers", "2", "--heads", "4", "--kv-heads", "2",
                       "--ffn-hidden", "64", "--batch", "2", "--context", "16",
                       "--new-tokens", "6", "--repeats", "2", "--json", str(out)])
    text = capsys.readouterr().out
    assert "tfm_jax / torch:" in text and "greedy ids agree" in text
    # the headline ratio: the median of the interleaved rounds' ratios
    rounds = [j / t for j, t in zip(res["tfm_jax"]["tokens_per_s_runs"],
                                    res["torch"]["tokens_per_s_runs"])]
    assert res["ratio_rounds"] == pytest.approx(rounds) and len(rounds) == 2
    assert res["ratio"] == pytest.approx(statistics.median(rounds))
    assert f"{res['ratio']:.2f}x (compiled loop; median of 2 interleaved rounds" in text
    on_disk = json.loads(out.read_text())
    for name in ("tfm_jax", "torch"):
        assert on_disk[name]["tokens_per_s"] > 0
    assert on_disk["tfm_jax"]["per_step_tokens_per_s"] > 0
    # random-init weights: logits are near-uniform, so a near-tie may flip late; the first
    # greedy id of every row comes from the prefill, which must agree
    assert res["greedy_agreement"]["first_mismatch_step"] in (None, *range(1, 6))
    tr, bw = res["traffic_bytes_per_step"], res["bandwidth_bytes_per_s"]
    m = 2 * (32 * (4 + 2 * 2) * 8 + 4 * 8 * 32 + 3 * 32 * 64) + 32 * 264  # matmul params
    assert tr["weights"] == 4 * (m + 2 * 32)
    assert tr["kv"] == 2 * 2 * 2 * 8 * 16 * 2 * 4                        # 2*L*Hkv*Dh*ctx*B*4
    assert res["tfm_jax"]["bound_ms"]["dram"] == pytest.approx(1e3 * tr["total"] / bw["dram"])
    # the decoder's cache holds context + new_tokens positions: 2*L*B*max_len*Hkv*Dh*4
    assert res["tfm_jax"]["cache_bytes"] == 2 * 2 * 2 * (16 + 6) * 2 * 8 * 4


def test_moe_dispatch_smoke(devices, tmp_path, capsys):
    """benchmarks/moe_dispatch.py at a tiny shape: the three strategies agree on the loss, the
    all_to_all bytes in the HLO equal the capacity formula, the table prints (no timing
    assertions)."""
    from benchmarks import moe_dispatch

    out = tmp_path / "moe.json"
    assert moe_dispatch.main(["--tokens", "128", "--seq", "16", "--d-model", "16", "--hidden",
                              "32", "--steps", "1", "--repeats", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "target all_to_all >= 0.8x dense" in text
    res = json.loads(out.read_text())
    rows = res["rows"]
    assert set(rows) == {"dense", "all_to_all", "implicit", "ffn_k_x_F"}
    for s in ("all_to_all", "implicit"):
        assert rows[s]["loss_rel_diff"] < 1e-5
    cap = res["config"]["capacity"]                      # ceil(1.25 * 16 * 2 / 8) = 5
    assert cap == 5 and res["capacity_formula_bytes"] == 4 * 8 * cap * 16 * 4
    assert rows["all_to_all"]["all_to_all_bytes"] == res["capacity_formula_bytes"]
    assert rows["all_to_all"]["all_to_all_count"] == 4 and res["all_to_all_bytes_ok"]
