"""Tokenizers behind one protocol (byte, HF tokenizers, sentencepiece): round trips, special ids,
bytes per token, the trained BPE folder that transformers' AutoTokenizer loads, model.vocab_size
auto / mismatch, one-line errors."""

import json

import numpy as np
import pytest

from tfm_jax.config import ConfigError, load_config
from tfm_jax.core.errors import DataError
from tfm_jax.data import tokenizer as tok_lib

TEXTS = ["def f(x):\n    return x * 2\n", "the quick brown fox jumps over the lazy dog",
         "naïve café — ünïcode 😀 ok", "  leading spaces and trailing  "] * 8
HARD = "héllo wörld 😀 — tabs\tand\nnewlines  "


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe")
    tok_lib.train_bpe(iter(TEXTS), 300, out)
    return out


def test_byte_tokenizer_is_a_tokenizer():
    t = tok_lib.load_tokenizer("byte")
    assert isinstance(t, tok_lib.Tokenizer) and t.vocab_size == 259
    assert (t.bos_id, t.eos_id, t.pad_id) == (257, 258, 256)
    ids, nbytes = t.token_bytes(HARD)
    assert t.decode(ids) == HARD and nbytes.sum() == len(HARD.encode())


def test_trained_bpe_round_trips_and_counts_bytes(bpe_dir):
    t = tok_lib.load_tokenizer(bpe_dir)
    assert isinstance(t, tok_lib.HFTokenizer) and isinstance(t, tok_lib.Tokenizer)
    assert 259 < t.vocab_size <= 300
    assert {t.bos_id, t.eos_id, t.pad_id} == {0, 1, 2}               # <s> </s> <pad>
    for text in TEXTS[:4] + [HARD, ""]:
        ids = t.encode(text)
        assert t.decode(ids) == text
        got_ids, nbytes = t.token_bytes(text)
        assert np.array_equal(got_ids, ids) and nbytes.sum() == len(text.encode("utf-8"))
    # merges learned: fewer tokens than bytes on the training text
    assert len(t.encode(TEXTS[1])) < len(TEXTS[1].encode())
    wrapped = t.encode("abc", add_bos=True, add_eos=True)
    assert wrapped[0] == t.bos_id and wrapped[-1] == t.eos_id
    assert t.decode(wrapped) == "abc"
    files = {p.name for p in bpe_dir.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= files


def test_save_and_load_keep_the_fingerprint(bpe_dir, tmp_path):
    t = tok_lib.load_tokenizer(bpe_dir / "tokenizer.json")
    copy = tok_lib.copy_into(t, tmp_path)
    again = tok_lib.run_tokenizer(tmp_path, "gone/tokenizer.json")     # the run's copy wins
    assert copy == tmp_path / "tokenizer" and again.fingerprint == t.fingerprint
    assert tok_lib.copy_into(tok_lib.ByteTokenizer(), tmp_path / "b") is None


def test_sentencepiece_model(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(TEXTS * 4))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"),
                                   vocab_size=300, pad_id=3, byte_fallback=True,
                                   minloglevel=2)
    t = tok_lib.load_tokenizer(tmp_path / "sp.model")
    assert isinstance(t, tok_lib.SentencePieceTokenizer) and t.vocab_size == 300
    assert (t.bos_id, t.eos_id, t.pad_id) == (1, 2, 3)
    for text in (TEXTS[1], HARD):
        ids, nbytes = t.token_bytes(text)
        assert np.array_equal(ids, t.encode(text)) and nbytes.sum() == len(text.encode())
    assert t.decode(t.encode(TEXTS[1], add_bos=True, add_eos=True)) == TEXTS[1]
    saved = tok_lib.load_tokenizer(t.save(tmp_path / "copy"))
    assert saved.fingerprint == t.fingerprint


def test_bad_tokenizer_specs_get_one_line(tmp_path):
    with pytest.raises(DataError, match="not 'byte', an existing tokenizer.json"):
        tok_lib.load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither tokenizer.json nor tokenizer.model"):
        tok_lib.load_tokenizer(tmp_path / "empty")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot read the tokenizer"):
        tok_lib.load_tokenizer(tmp_path / "broken.json")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="expected a tokenizer.json"):
        tok_lib.load_tokenizer(tmp_path / "x.txt")


def test_vocab_size_auto_and_mismatch(bpe_dir):
    size = tok_lib.load_tokenizer(bpe_dir).vocab_size
    cfg = load_config(None, [f"data.tokenizer={bpe_dir}", "model.vocab_size=auto"])
    assert cfg.model.vocab_size == 384 and cfg.model.vocab_size >= size
    assert load_config(None, ["model.vocab_size=auto"]).model.vocab_size == 384   # byte: 259
    with pytest.raises(ConfigError, match=f"smaller than the {size} ids of the tokenizer"):
        load_config(None, [f"data.tokenizer={bpe_dir}", "model.vocab_size=100"])
    with pytest.raises(ConfigError, match="needs a tokenizer, but data.tokenizer=none"):
        load_config(None, ["data.tokenizer=none", "model.vocab_size=auto"])


def test_declared_specials_win_over_the_usual_names(bpe_dir, tmp_path):
    for name in ("tokenizer.json", "special_tokens_map.json"):
        (tmp_path / name).write_text((bpe_dir / name).read_text())
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "</s>", "eos_token": {"content": "<pad>"}, "pad_token": "<s>"}))
    t = tok_lib.load_tokenizer(tmp_path)
    assert (t.bos_id, t.eos_id, t.pad_id) == (1, 2, 0)
