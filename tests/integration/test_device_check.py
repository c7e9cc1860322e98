"""benchmarks/device_check.py (+ device_check.sh) in --dry mode on CPU: each part runs in its own
process, writes its JSON, and a part past its cap is killed and recorded, so the script is
ready for its first run on a device machine. Fast: the quick parts; slow: every part via the
shell wrapper."""

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import device_check  # noqa: E402


def _env():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    return env


def _check_quick_parts(parts):
    env = parts["env"]
    assert env["part_status"] == "done" and env["platform"] == "cpu", env
    assert env["device_count"] == 1 and env["jax"] and "modules" in env["plugins"]
    plugin = parts["plugin"]
    assert plugin["part_status"] == "done"
    if plugin["status"] == "skipped":      # no jax[cuda] here
        assert "no CUDA PJRT plugin" in plugin["reason"]
    tests = parts["tests"]
    assert tests["status"] == "ok" and tests["failed"] == [], tests
    assert tests["counts"]["passed"] >= 1 and tests["platform"] == "cpu"
    g = parts["fp8"]["gemm"][0]
    assert parts["fp8"]["mode"] == "cpu-smoke" and g["bf16"]["tflops"] > 0
    assert g["fp8_tfm"].get("dot_mode", "emulated") == "emulated"


def test_dry_quick_parts(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "device_check.py"), "--out",
                        str(tmp_path), "--dry", "--parts", "plugin,tests,fp8"], env=_env(),
                       capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((tmp_path / "device_check.json").read_text())
    assert res["mode"].startswith("dry") and list(res["parts"]) == ["env", "plugin", "tests",
                                                                    "fp8"]
    _check_quick_parts(res["parts"])
    assert "===== tests: done" in (tmp_path / "device_check.log").read_text()


def test_part_past_its_cap_is_killed_and_recorded(tmp_path):
    with open(tmp_path / "log", "w") as log:
        t0 = time.monotonic()
        r = device_check.run_part("mfu", True, 2, log)
    assert time.monotonic() - t0 < 20
    assert r["part_status"].startswith("killed at its 2 s cap") and r["cap_s"] == 2


def test_budget_left_too_small_skips_parts(tmp_path):
    assert device_check.main(["--out", str(tmp_path), "--dry", "--parts", "env,mfu",
                              "--budget", "9"]) == 0
    res = json.loads((tmp_path / "device_check.json").read_text())
    assert res["parts"]["env"]["part_status"].startswith("not run")
    assert res["parts"]["mfu"]["part_status"].startswith("not run")


def test_plugin_probe_reports_devices_and_a_computation():
    """The fresh-process probe the plugin part runs (here on the CPU platform; on the GPU with
    the CUDA plugin registered by path), and its error record for an unknown platform."""
    ok = device_check._run_python(["-c", device_check._DEVICES_SNIPPET], _env(), 120)
    assert ok["status"] == "ok" and ok["platform"] == "cpu" and ok["compute_ok"] is True, ok
    bad = device_check._run_python(["-c", device_check._DEVICES_SNIPPET],
                                   {**_env(), "JAX_PLATFORMS": "no_such_plugin"}, 120)
    assert bad["status"] == "error" and "no_such_plugin" in bad["output_tail"], bad


def test_pytest_output_parsing_counts_a_cut_short_run():
    text = ("tests/test_a.py::test_x PASSED   [ 10%]\n"
            "tests/test_a.py::test_y[e4m3] FAILED   [ 20%]\n"
            "tests/test_b.py::test_z SKIPPED (needs the 8 fake CPU devices)   [ 30%]\n"
            "FAILED tests/test_a.py::test_y[e4m3] - AssertionError: not close\n")
    r = device_check._parse_pytest(text)
    assert r["counts"] == {"passed": 1, "failed": 1, "skipped": 1}
    assert r["failed"] == ["tests/test_a.py::test_y[e4m3]"]
    assert r["failure_lines"] == ["tests/test_a.py::test_y[e4m3]: AssertionError: not close"]


def test_unknown_part_is_refused(capsys):
    with pytest.raises(SystemExit):
        device_check.main(["--out", "/tmp/x", "--parts", "env,nope"])
    assert "unknown ['nope']" in capsys.readouterr().err


@pytest.mark.slow
def test_dry_every_part_through_the_shell_script(tmp_path):
    env = {**_env(), "OUT": str(tmp_path), "PYTHON": sys.executable}
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "device_check.sh"), "--dry"],
                       env=env, capture_output=True, text=True, timeout=2400, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((tmp_path / "device_check.json").read_text())
    parts = res["parts"]
    assert list(parts) == list(device_check.PARTS)
    assert all(r["part_status"] == "done" for r in parts.values()), {
        k: r["part_status"] for k, r in parts.items()}
    _check_quick_parts(parts)
    bf16 = parts["mfu"]["bf16"]
    assert bf16["status"] == "ok" and 0 < bf16["mfu"] < 1 and bf16["params"] > 0
    assert parts["mfu"]["bf16_cudnn"]["status"] == "skipped"
    moe = parts["moe"]
    assert moe["devices"] == device_check.DRY_MOE_DEVICES
    for d in ("dense", "all_to_all", "implicit"):
        assert moe[d]["status"] == "ok" and moe[d]["step_s"] > 0, moe[d]
    assert parts["decode"]["tfm_jax"]["tokens_per_s"] > 0
    for name in ("env.txt", "device_check.log"):
        assert (tmp_path / name).is_file()


def test_dry_mfu_prints_memory_plan_and_precision_compares_with_f32(tmp_path):
    """The mfu part compiles from shapes and prints the step's memory plan before running; the
    precision part records each policy's loss against f32."""
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "device_check.py"), "--out",
                        str(tmp_path), "--dry", "--parts", "mfu,precision"], env=_env(),
                       capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((tmp_path / "device_check.json").read_text())
    log = (tmp_path / "device_check.log").read_text()
    bf16 = res["parts"]["mfu"]["bf16"]
    assert bf16["status"] == "ok", bf16
    plan = bf16["memory_plan"]
    assert plan["total"] == plan["argument"] + plan["output"] - plan["alias"] + plan["temp"]
    assert plan["argument"] > 0 and plan["limit"] is None and plan["fits"] is None   # CPU
    # printed before the step ran (the first timed line comes after it)
    assert log.index("bf16 (remat none) memory plan:") < log.index("mfu bf16:")
    prec = res["parts"]["precision"]["results"]
    assert set(prec) == {"f32", "bf16-master"}
    assert abs(prec["bf16-master"]["train_vs_f32_pct"]) < 2.0, prec


def test_memory_plan_checks_the_card_limit():
    from benchmarks import fp8_gpu

    class Stats:
        argument_size_in_bytes, output_size_in_bytes = 10 * 2**30, 10 * 2**30
        alias_size_in_bytes, temp_size_in_bytes = 9 * 2**30, 50 * 2**30

    class Compiled:
        def memory_analysis(self):
            return Stats()

    class Card:
        def __init__(self, gib):
            self.gib = gib

        def memory_stats(self):
            return {"bytes_limit": self.gib * 2**30}

    big = fp8_gpu.memory_plan(Compiled(), Card(127))
    assert big["total"] == 61 * 2**30 and big["fits"] is True
    small = fp8_gpu.memory_plan(Compiled(), Card(64))       # 61 > 0.95 * 64
    assert small["fits"] is False and "does NOT fit" in fp8_gpu.describe_plan(small)
