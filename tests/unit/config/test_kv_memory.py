"""KV-cache memory arithmetic (tfm_jax.config.sizing) and ``tfm-jax kv-cache``, against hand
computations: Llama-3-8B (32 layers, 8 K/V heads, head_dim 128) caches 131,072 bytes per token
in bf16."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from tfm_jax.config import sizing as kvm
from tfm_jax.config import load_config, param_counts

ROOT = str(pathlib.Path(__file__).resolve().parents[3])


@pytest.fixture(scope="module")
def llama():
    return load_config("llama3-8b")


def test_llama3_8b_by_hand(llama):
    r = kvm.kv_cache_bytes(llama, seq=4096, batch=1, dtype="bf16")
    # 2 (K and V) * 8 kv heads * 128 head_dim * 2 bytes = 4096 bytes per token and layer
    assert r["bytes_per_token_per_layer"] == 2 * 8 * 128 * 2 == 4096
    assert r["bytes_per_token"] == 4096 * 32 == 131072
    assert r["bytes_per_layer"] == 4096 * 4096 == 16 * 2**20
    assert r["total_bytes"] == 131072 * 4096 == 512 * 2**20
    assert r["kind"] == "GQA" and r["scale_bytes"] == 0
    assert r["total_with_scales"] == r["total_bytes"]
    # weights: Llama-3-8B's 8,030,261,248 parameters at 2 bytes
    assert param_counts(llama.model)["total"] == 8_030_261_248
    assert r["weights_bytes"] == 2 * 8_030_261_248
    assert r["kv_share"] == pytest.approx(512 * 2**20 / (512 * 2**20 + 2 * 8_030_261_248))


def test_mha_mqa_ratios_and_batch(llama):
    mha = kvm.kv_cache_bytes(llama, 4096, 1, "bf16", n_kv_heads=32)
    mqa = kvm.kv_cache_bytes(llama, 4096, 1, "bf16", n_kv_heads=1)
    assert (mha["kind"], mqa["kind"]) == ("MHA", "MQA")
    assert mha["total_bytes"] == 2 * 2**30 and mqa["total_bytes"] == 64 * 2**20
    big = kvm.kv_cache_bytes(llama, 1000, 7, "fp32", n_kv_heads=4)
    assert big["total_bytes"] == 2 * 4 * 128 * 4 * 32 * 1000 * 7
    # MHA has larger K/V projections: 2 * 32 layers * 4096 * (32 - 8) * 128 more parameters
    assert mha["weights_bytes"] - kvm.kv_cache_bytes(llama, 1, 1, "bf16")["weights_bytes"] == \
        2 * (2 * 32 * 4096 * 24 * 128)


def test_quantized_scales_reported_apart(llama):
    r = kvm.kv_cache_bytes(llama, 4096, 2, "int8")
    assert r["total_bytes"] == 2 * 8 * 128 * 1 * 32 * 4096 * 2
    assert r["scale_bytes"] == 2 * 8 * 4 * 32 * 4096 * 2          # K and V, per token and head
    assert r["total_with_scales"] == r["total_bytes"] + r["scale_bytes"]
    per_tok = kvm.kv_cache_bytes(llama, 4096, 2, "fp8", scale_per="token")
    assert per_tok["scale_bytes"] == 2 * 1 * 4 * 32 * 4096 * 2
    assert kvm.kv_cache_bytes(llama, 4096, 2, "float8_e4m3fn")["dtype"] == "fp8"


@pytest.mark.parametrize("kwargs, match", [
    ({"dtype": "fp4"}, "fp4.*fp32, bf16"),
    ({"n_kv_heads": 3}, "must divide n_heads=32"),
    ({"seq": 0}, "must be positive"),
])
def test_bad_input(llama, kwargs, match):
    args = {"seq": 16, "batch": 1, "dtype": "bf16", **kwargs}
    with pytest.raises(ValueError, match=match):
        kvm.kv_cache_bytes(llama, **args)


def test_table_rows(llama):
    rows = kvm.kv_table(llama, 4096)
    assert [(r["kind"], r["n_kv_heads"], r["config"]) for r in rows] == [
        ("MHA", 32, False), ("GQA", 8, True), ("MQA", 1, False)]
    assert kvm.human_bytes(2**31) == "2.00 GiB" and kvm.human_bytes(10) == "10 B"


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    code = ("import sys, json; from tfm_jax.cli import main; rc = main(sys.argv[1:]); "
            "heavy = [m for m in ('jax', 'flax', 'orbax.checkpoint') if m in sys.modules]; "
            "print('HEAVY', json.dumps(heavy)); sys.exit(rc)")
    return subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_cli_json_and_light():
    proc = _cli("kv-cache", "--config", "configs/llama3-8b.yaml", "--seq", "4096", "--batch",
                "1", "--dtype", "bf16", "--json")
    assert proc.returncode == 0, proc.stderr
    text, heavy = proc.stdout.rsplit("HEAVY", 1)
    assert json.loads(heavy) == []                     # config + arithmetic only, no jax
    out = json.loads(text)
    gqa = out["variants"]["GQA"]
    assert gqa["bytes_per_token"] == 131072 and isinstance(gqa["total_bytes"], int)
    assert gqa["total_bytes"] == 512 * 2**20
    assert out["variants"]["MHA"]["total_bytes"] == 2**31
    assert out["variants"]["MQA"]["total_bytes"] == 2**26
    assert out["seq"] == 4096 and out["dtype"] == "bf16"


def test_cli_table_and_errors():
    proc = _cli("kv-cache", "--config", "llama3-8b", "--dtype", "int8")
    assert proc.returncode == 0, proc.stderr
    assert "GQA (config)" in proc.stdout and "excludes the scales" in proc.stdout
    assert "256.00 MiB" in proc.stdout                  # int8 GQA at the config's 4096 tokens
    bad = _cli("kv-cache", "--config", "llama3-8b", "--dtype", "fp4")
    assert bad.returncode == 2 and "fp4" in bad.stderr and "Traceback" not in bad.stderr


def test_docs_kv_table_uses_the_calculators_binary_units():
    """docs/inference.md's Llama-3-8B table shows the calculator's own figures in binary units
    (human_bytes: GiB/MiB) for every computed column; only the seed's quoted columns keep MB/GB."""
    import pathlib
    import re

    from tfm_jax.config import load_config
    from tfm_jax.config.sizing import human_bytes, kv_table

    doc = (pathlib.Path(__file__).resolve().parents[3] / "docs" / "inference.md").read_text()
    rows = {r["kind"]: r for r in kv_table(load_config("llama3-8b"), seq=4096, batch=1,
                                           dtype="bf16")}
    for kind in ("MHA", "GQA", "MQA"):
        line = next(ln for ln in doc.splitlines() if ln.startswith(f"| {kind} ("))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[4] == human_bytes(rows[kind]["weights_bytes"]), line
        assert re.sub(r"[*]|\s*\(.*\)", "", cells[2]).replace(".00", "") == \
            human_bytes(rows[kind]["total_bytes"]).replace(".00", ""), line
