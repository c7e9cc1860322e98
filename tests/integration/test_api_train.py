"""``tfm_jax.train`` trains as ``tfm-jax train`` does, and the returned Run agrees with the CLI:
``run.evaluate()`` with ``tfm-jax eval`` and greedy ``run.generate`` with ``tfm-jax generate
--temperature 0`` (subprocesses on 1 CPU device; the API runs in this process on 8)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

import tfm_jax
from train_support import cli_env

ROOT = str(pathlib.Path(__file__).resolve().parents[2])
TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
        "model.multiple_of=16", "data.seq_len=32", "train.batch_size=8", "train.steps=6",
        "train.warmup_steps=1", "train.eval_batches=2", "train.log_every=2",
        "train.sample_tokens=0", "run.progress=false", "run.tensorboard=false"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return cli_env(tmp_path_factory.mktemp("tfm_jax_cache"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, text_corpus):
    out = tmp_path_factory.mktemp("api-train") / "run"
    return tfm_jax.train("tiny", overrides=TINY + [f"data.path={text_corpus}"], out=out)


def _cli(env, *args) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "tfm_jax", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_train_returns_the_trained_run(trained):
    run_dir = trained.config.run_dir
    assert trained.step == 6
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2, 4, 6]
    reopened = tfm_jax.load_run(run_dir)
    assert reopened.step == 6
    ids = [[reopened.tokenizer.eos_id] + reopened.encode("def f(x):")]
    assert (reopened.logits(ids) == trained.logits(ids)).all()


def test_evaluate_equals_tfm_jax_eval(trained, env):
    res = trained.evaluate()
    cli = json.loads(_cli(env, "eval", "--run-dir", trained.config.run_dir).stdout)
    assert cli["step"] == res["step"] == 6
    assert cli["val_tokens"] == res["tokens"]
    assert res["loss"] == pytest.approx(cli["val_loss"], rel=1e-5)
    assert res["perplexity"] == pytest.approx(cli["val_ppl"], rel=1e-5)
    assert res["bits_per_byte"] == pytest.approx(cli["val_bpb"], rel=1e-5)
    assert res["corpus_digest"] == cli["corpus_digest"]


def test_evaluate_on_another_corpus_than_recorded(trained, tmp_path):
    import shutil

    from tfm_jax.core.errors import DataError

    run_dir = tmp_path / "run"
    shutil.copytree(trained.config.run_dir, run_dir)
    saved = json.loads((run_dir / "corpus.json").read_text())
    saved["fingerprint"]["digest"] = "0" * 64           # the run trained on something else
    (run_dir / "corpus.json").write_text(json.dumps(saved))
    run = tfm_jax.load_run(run_dir)
    with pytest.raises(DataError, match="000000000000.*allow_corpus_change=True"):
        run.evaluate()
    res = run.evaluate(allow_corpus_change=True)
    assert res["loss"] == pytest.approx(trained.evaluate()["loss"], rel=1e-6)


def test_greedy_generate_equals_tfm_jax_generate(trained, env):
    prompts = ["def ", "class A"]
    got = trained.generate(prompts, max_new_tokens=12)
    out = json.loads(_cli(env, "generate", "--run-dir", trained.config.run_dir, "--prompt",
                          prompts[0], "--prompt", prompts[1], "--tokens", 12,
                          "--temperature", 0, "--json").stdout)
    assert [c["text"] for c in out["completions"]] == [p + g for p, g in zip(prompts, got)]
