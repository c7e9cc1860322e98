"""Bring your own data, end to end: `tfm-jax tokenizer train` on a jsonl file, a run on it with
that tokenizer, model.vocab_size=auto and segment packing (it learns; the run stores its
tokenizer; eval reports bits per byte; generate decodes with it), transformers' AutoTokenizer
loads the trained folder, and an interrupted + resumed run on such data ends with exactly the
uninterrupted run's metrics and parameters."""

import json
import math
import os
import signal
import subprocess
import sys

import chex
import numpy as np
import pytest

from tfm_jax.config import load_config
from tfm_jax.train import Interrupted, train
from tfm_jax.train.checkpoint import Checkpointer
from tfm_jax.train.metrics import read_metrics
from train_support import SMALL, params_np

from test_cli import ROOT, TIMEOUT, env  # noqa: F401  (the subprocess environment fixture)

WORDS = ("the model reads a token and the next token follows from attention over the keys "
         "values and queries of every head grouped by key value heads").split()


@pytest.fixture(scope="module")
def jsonl(tmp_path_factory):
    r = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("byod") / "docs.jsonl"
    with open(path, "w") as f:
        for i in range(300):
            words = r.choice(WORDS, size=int(r.integers(8, 40)))
            f.write(json.dumps({"id": i, "text": " ".join(words) + "."}) + "\n")
    return path


def _cli(args, env):
    return subprocess.run([sys.executable, "-m", "tfm_jax", *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def bpe(jsonl, env, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "bpe"
    r = _cli(["tokenizer", "train", "--vocab-size", "320", "--out", str(out),
              f"data.path={jsonl}"], env)
    assert r.returncode == 0, r.stderr
    assert "byte-level BPE" in r.stdout and f"data.tokenizer={out}" in r.stdout
    return out


def test_autotokenizer_loads_the_trained_folder(bpe):
    transformers = pytest.importorskip("transformers", reason="transformers (the [dev] extra) "
                                       "is not installed")
    from tfm_jax.data import load_tokenizer
    hf, ours = transformers.AutoTokenizer.from_pretrained(str(bpe)), load_tokenizer(bpe)
    text = "the model reads ünïcode 😀 too"
    assert hf(text, add_special_tokens=False)["input_ids"] == list(ours.encode(text))
    assert hf.decode(list(ours.encode(text))) == text
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (
        ours.bos_id, ours.eos_id, ours.pad_id)


def test_bpe_jsonl_run_learns_and_eval_reports_bits_per_byte(bpe, jsonl, env, tmp_path):
    run_dir = tmp_path / "run"
    common = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1",
              "data.seq_len=32", "train.batch_size=8", "train.warmup_steps=2",
              "train.eval_every=40", "train.checkpoint_every=40", "train.eval_batches=2",
              "train.log_every=10", "train.sample_tokens=8", "run.progress=false",
              "train.steps=40", "train.lr=1e-2"]
    r = _cli(["train", f"data.path={jsonl}", f"data.tokenizer={bpe}", "model.vocab_size=auto",
              "data.packing=segments", f"run.dir={run_dir}", *common], env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "tokenized 300 documents" in r.stdout and "tokens/s" in r.stdout
    saved = load_config(str(run_dir / "config.yaml"))
    assert saved.model.vocab_size == 384 and saved.data.packing == "segments"
    assert (run_dir / "tokenizer" / "tokenizer.json").is_file()
    rows = [x for x in read_metrics(run_dir) if "loss" in x]
    ev = [x for x in read_metrics(run_dir) if "val_loss" in x][-1]
    assert rows[-1]["loss"] < 0.6 * rows[0]["loss"]                 # it learns
    r = _cli(["eval", "--run-dir", str(run_dir)], env)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout[r.stdout.index("{"):])
    assert out["val_loss"] == pytest.approx(ev["val_loss"], rel=1e-6)
    assert out["val_loss"] < out["unigram_baseline"]
    # a BPE token stands for several bytes: bits per byte well below bits per token
    assert 0 < out["val_bpb"] < out["val_loss"] / math.log(2) / 2
    r = _cli(["generate", "--run-dir", str(run_dir), "--prompt", "the model", "--tokens", "6",
              "--temperature", "0"], env)
    assert r.returncode == 0 and r.stdout.startswith("the model"), r.stderr[-3000:]


def test_vocab_mismatch_is_one_line(bpe, jsonl, env):
    r = _cli(["train", f"data.path={jsonl}", f"data.tokenizer={bpe}", "model.vocab_size=300"],
             env)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "model.vocab_size=300 is smaller than the" in r.stderr


@pytest.mark.parametrize("packing", ["segments", "concat"])
def test_interrupted_and_resumed_run_reads_the_same_batches(bpe, jsonl, tmp_path, devices,
                                                           packing):
    common = SMALL + [f"data.path={jsonl}", f"data.tokenizer={bpe}", "model.vocab_size=auto",
                      f"data.packing={packing}", f"data.cache_dir={tmp_path / 'cache'}",
                      "train.steps=10", "train.checkpoint_every=4", "train.eval_every=5"]
    run = lambda name, **kw: train(load_config(None, common + [f"run.dir={tmp_path / name}"]),  # noqa
                                   devices=devices[:1], **kw)
    full = run("full")

    def interrupt_at_6(step):
        if step == 6:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted):
        run("cut", step_hook=interrupt_at_6)
    assert Checkpointer(tmp_path / "cut" / "checkpoints").latest_step() == 6
    state = json.loads((tmp_path / "cut" / "checkpoints" / "loader_state" / "6.json").read_text())
    assert state["step"] == 6
    resumed = run("cut", resume=True)
    chex.assert_trees_all_equal(params_np(full.state), params_np(resumed.state))
    metrics = lambda d: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu")}  # noqa
                         for r in read_metrics(d) if "loss" in r or "val_loss" in r]
    assert metrics(tmp_path / "full") == metrics(tmp_path / "cut")
    assert full.eval == resumed.eval
