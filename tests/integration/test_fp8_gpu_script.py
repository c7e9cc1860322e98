"""benchmarks/fp8_gpu.py on CPU: detects "no GPU", runs the tiny smoke of every part (GEMMs, HLO
dot mode, the three train-step variants), writes JSON + text, and exits 0 -- so the script is
ready for a device machine (benchmarks/device_check.sh runs its GEMM part; tests/
test_device_check.py covers the device check itself)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_fp8_gpu_cpu_smoke(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fp8_gpu.py"), "--out",
                        str(tmp_path)], env=env, capture_output=True, text=True, timeout=300,
                       cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "no GPU (cpu" in p.stdout
    res = json.loads((tmp_path / "fp8_gpu.json").read_text())
    assert res["mode"] == "cpu-smoke" and res["platform"] == "cpu"
    g = res["gemm"][0]
    assert g["bf16"]["tflops"] > 0 and g["bf16"]["dot_mode"] == "none"
    # on CPU an FP8 dot is never native: emulated (or an error the script records)
    for k in ("fp8_direct", "fp8_tfm", "fp8_tfm_train"):
        assert g[k].get("dot_mode", "emulated") == "emulated", g[k]
        assert g[k].get("gemms", {}).get("fp8", 0) == 0, g[k]
    # the per-projection count ran (on CPU: no FP8 GEMM anywhere)
    pg = res["projection_gemms"]
    assert pg["counts"] and not pg["every_projection_fp8"], pg
    for v in ("bf16", "fp8_delayed", "fp8_delayed_ws"):
        assert "step_s" in res["step"][v], res["step"][v]
    assert res["step"]["fp8_delayed"]["dot_mode"] == "emulated"
    assert (tmp_path / "fp8_gpu.txt").read_text().startswith("no GPU")
    assert 0 < res["step"]["bf16"]["mfu"] < 1
