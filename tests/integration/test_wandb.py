"""``run.wandb``: a training run logs its metrics to Weights & Biases beside TensorBoard (offline
mode: files only, nothing sent), and a missing ``wandb`` package is one line before any I/O."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from train_support import small_cfg

ROOT = str(pathlib.Path(__file__).resolve().parents[2])


def test_offline_run_files_hold_every_logged_key(tmp_path, monkeypatch, text_corpus):
    pytest.importorskip("wandb", reason="run.wandb needs the track extra: "
                        "pip install -e '.[track]'")
    from tfm_jax import train as train_lib

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    (tmp_path / "wandb-dir").mkdir()
    cfg = small_cfg(tmp_path / "run", "train.steps=4", "train.log_every=2", "train.eval_every=2",
                    f"data.path={text_corpus}", "run.wandb=offline",
                    "run.wandb_project=tfm-jax-test")
    train_lib.train(cfg)
    runs = list((tmp_path / "wandb-dir" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs
    data = runs[0].read_bytes()
    assert b"tfm-jax-test" in data                                   # the project
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    train_keys = {k for r in rows if "loss" in r for k, v in r.items()
                  if k != "step" and isinstance(v, (int, float))}
    eval_keys = {k for r in rows if "val_loss" in r for k, v in r.items()
                 if k != "step" and isinstance(v, (int, float))}
    assert {"loss", "lr"} <= train_keys and "val_loss" in eval_keys
    missing = [k for k in ([f"train/{k}" for k in train_keys] + [f"eval/{k}" for k in eval_keys])
               if k.encode() not in data]
    assert not missing, f"keys of metrics.jsonl not in the wandb run file: {missing}"
    # the last train loss as logged (its JSON spelling) is in the file too
    last = [r for r in rows if "loss" in r][-1]
    assert json.dumps(last["loss"]).encode() in data


def test_missing_wandb_is_one_line(tmp_path, text_corpus):
    shim = tmp_path / "shim"                     # an environment without wandb
    shim.mkdir()
    (shim / "wandb.py").write_text("raise ImportError('no wandb here')\n")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{shim}", "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "tfm_jax", "train", "model.d_model=32",
                           "model.n_layers=1", "train.steps=2", f"data.path={text_corpus}",
                           "run.wandb=online", f"run.dir={out}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "tfm-jax: error: run.wandb=online needs the wandb package: pip install "
        "'tfm-jax[track]' (or set run.wandb=false)"]
    assert not out.exists()
