"""The README's main job, end to end, as a user runs it: `tfm-jax train` with no arguments
(default tiny config, built-in corpus, one CPU device). Slow (a few minutes): `pytest -m slow`."""

import json
import os
import re
import subprocess
import sys

import pytest
import yaml


@pytest.mark.slow
def test_default_train_beats_unigram_and_samples(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "tfm_jax", "train", f"run.dir={tmp_path}/run",
                           "run.progress=false"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = re.search(r"val loss ([\d.]+) nats/token .* vs unigram baseline ([\d.]+)", proc.stdout)
    assert m, proc.stdout[-2000:]
    val, unigram = float(m.group(1)), float(m.group(2))
    assert val < unigram - 1.0, (val, unigram)
    steps = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["steps"]
    rows = [json.loads(line)
            for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == steps and "val_loss" in rows[-1]
    sample = (tmp_path / "run" / "samples.txt").read_text()
    assert sample.startswith("def ") and len(sample) > 50
    assert "run directory:" in proc.stdout
