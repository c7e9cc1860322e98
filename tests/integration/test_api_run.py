"""The Python API on a run directory: only ``tfm_jax`` top-level names are imported (the API's
stability contract; the run directory is set up by a shared helper, which trains nothing).

Every figure is checked against an independent float64 numpy computation from the logits, and
the logits against the model's own ``apply``. Training through the API, and agreement with
``tfm-jax eval`` / ``tfm-jax generate``: test_api_train.py; the quick checks:
tests/unit/test_api.py.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import tfm_jax
from train_support import write_initialized_run

TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
        "model.multiple_of=16", "data.seq_len=16", "train.batch_size=8",
        "train.eval_batches=1", "train.sample_tokens=0", "run.progress=false",
        "run.tensorboard=false"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, text_corpus):
    """(the run as written, the run opened by ``tfm_jax.load_run``)."""
    out = tmp_path_factory.mktemp("api-run")
    cfg = write_initialized_run(out, TINY + [f"data.path={text_corpus}"])
    return cfg, tfm_jax.load_run(out)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _mean_nll(run, windows: np.ndarray) -> float:
    """Mean next-token NLL of (N, T + 1) windows from the run's logits (float64 numpy)."""
    lp = _log_softmax(run.logits(windows[:, :-1]))
    return float(-np.take_along_axis(lp, windows[:, 1:, None], -1).mean())


def test_load_run_opens_the_run(trained):
    cfg, loaded = trained
    assert loaded.step == 0
    assert loaded.config.model == cfg.model and loaded.config.run_dir == cfg.run_dir
    assert "step=0" in repr(loaded) and str(cfg.run_dir) in repr(loaded)
    assert loaded.decode(loaded.encode("héllo")) == "héllo"
    assert loaded.encode("ab") == [97, 98]


def test_logits_equal_the_models_apply(trained):
    _, run = trained
    ids = np.random.default_rng(0).integers(0, 259, size=(3, 16))     # 3 rows: not 8-divisible
    got = run.logits(ids)
    assert got.shape == (3, 16, run.config.model.vocab_size) and got.dtype == np.float32
    rows = np.zeros((8, 16), np.int64)          # the model's own apply: batch over 8 devices
    rows[:3] = ids
    with run.setup.context():
        ref = np.asarray(run.setup.model.apply(run.variables, rows, train=False))[:3]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # causal: a row's first positions do not depend on its later tokens
    other = ids.copy()
    other[:, 8:] = (other[:, 8:] + 1) % 259
    np.testing.assert_allclose(run.logits(other)[:, :8], got[:, :8], rtol=1e-5, atol=1e-5)


def test_evaluate_equals_the_logits_cross_entropy(trained, text_corpus):
    """The run's validation split, and a file: loss and bits per byte from numpy."""
    _, run = trained
    docs = ["def f(x):\n    return x * 2\n" * 3, "héllo wörld, " * 5]   # 161 tokens: 1 batch
    path = text_corpus.parent / "eval.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    res = run.evaluate(path, batches=1)
    stream = np.concatenate([np.append(run.encode(d), run.tokenizer.eos_id) for d in docs])
    t, b = run.config.data.seq_len, run.config.train.batch_size
    windows = stream[np.arange(b)[:, None] * t + np.arange(t + 1)]   # consecutive windows
    ref = _mean_nll(run, windows)
    assert res["tokens"] == b * t
    assert res["loss"] == pytest.approx(ref, rel=1e-5)
    assert res["perplexity"] == pytest.approx(math.exp(ref), rel=1e-5)
    n_bytes = int((windows[:, 1:] < 256).sum())          # byte tokens; EOS stands for no byte
    assert res["bits_per_byte"] == pytest.approx(ref * b * t / (n_bytes * math.log(2)),
                                                 rel=1e-5)
    assert set(run.evaluate(batches=1)) >= {"loss", "perplexity", "bits_per_byte", "tokens"}


def test_generate_greedy_is_the_argmax_of_the_logits(trained):
    """Greedy decoding through the KV cache vs argmax of full forwards (one compiled shape:
    right-padded rows of 16, read at the last real position)."""
    _, run = trained
    prompts = ["def f(", "return"]
    got = run.generate(prompts, max_new_tokens=6)
    rows = [[run.tokenizer.eos_id] + run.encode(p) for p in prompts]
    new = [[], []]
    live = [True, True]
    for _ in range(6):
        padded = np.zeros((2, 16), np.int64)
        for i, r in enumerate(rows):
            padded[i, :len(r) + len(new[i])] = r + new[i]
        last = run.logits(padded)
        for i, r in enumerate(rows):
            nxt = int(np.argmax(last[i, len(r) + len(new[i]) - 1]))
            live[i] = live[i] and nxt != run.tokenizer.eos_id
            if live[i]:
                new[i].append(nxt)
    assert got == [run.decode(n) for n in new]
    assert run.generate(prompts[0], max_new_tokens=6) == got[0]          # str in, str out
    cut = got[0][2:4]
    assert run.generate(prompts[0], max_new_tokens=6, stop=[cut]) == got[0][:got[0].find(cut)]


def test_bad_ids_are_one_clear_error(trained):
    _, run = trained
    with pytest.raises(Exception, match=r"integer array \(B, T\)"):
        run.logits(np.zeros((2, 3), np.float32))
    with pytest.raises(Exception, match=r"token ids must lie in \[0, "):
        run.logits(np.full((1, 4), 10**6))
