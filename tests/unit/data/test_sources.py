"""Document sources (jsonl, parquet, datasets folders, text under a subword tokenizer), their
caches, mixtures, and the one-line errors of bad input."""

import json

import numpy as np
import pytest

from tfm_jax.config import ConfigError, load_config
from tfm_jax.core.errors import DataError
from tfm_jax import data
from tfm_jax.data import loader, mixture, tokenizer as tok_lib

DOCS = [f"document {i}: " + "lorem ipsum dolor sit amet " * (1 + i % 4) + "ünï 😀"
        for i in range(40)]


def _jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def _decode_all(corpus, tok):
    """Every document of both splits, as text (each stream: documents followed by EOS)."""
    out = []
    for stream, starts in ((corpus.train, corpus.train_doc_starts), (corpus.val, corpus.val_doc_starts)):
        bounds = list(map(int, starts)) + [int(stream.shape[0])]
        out += [tok.decode(stream[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    return out


def test_jsonl_documents_round_trip_with_bytes_per_token(tmp_path):
    f = _jsonl(tmp_path / "d.jsonl", DOCS)
    (tmp_path / "d.jsonl").write_text(f.read_text() + "\n   \n")          # blank lines: skipped
    tok = tok_lib.ByteTokenizer()
    c = data.load_corpus(str(f), 0.2, str(tmp_path / "cache"), tokenizer=tok)
    assert sorted(_decode_all(c, tok)) == sorted(DOCS) and c.split == "by_file"
    assert all(n.startswith("d.jsonl:") for n in c.train_files)
    # bytes per val token: EOS 0, each byte 1 -> the val documents' UTF-8 bytes exactly
    val_docs = _decode_all(c, tok)[len(c.train_doc_starts):]
    assert c.bytes_of(np.arange(c.num_val_tokens)) == sum(len(d.encode()) for d in val_docs)
    assert "tokenized 40 documents" in c.build_summary and "tokens/s" in c.build_summary
    again = data.load_corpus(str(f), 0.2, str(tmp_path / "cache"), tokenizer=tok)
    assert again.cache_dir == c.cache_dir and again.build_summary == ""     # from the cache


def test_cache_is_keyed_by_the_tokenizer(tmp_path):
    f = _jsonl(tmp_path / "d.jsonl", DOCS)
    bpe = tok_lib.train_bpe(iter(DOCS), 300, tmp_path / "bpe")
    byte = data.load_corpus(str(f), 0.2, str(tmp_path / "cache"), tokenizer=tok_lib.ByteTokenizer())
    sub = data.load_corpus(str(f), 0.2, str(tmp_path / "cache"), tokenizer=bpe)
    assert sub.cache_dir != byte.cache_dir and sub.num_train_tokens < byte.num_train_tokens
    assert sorted(_decode_all(sub, bpe)) == sorted(DOCS)
    # a text folder under a subword tokenizer: a file is a document
    (tmp_path / "txt").mkdir()
    for i, d in enumerate(DOCS[:10]):
        (tmp_path / "txt" / f"{i}.txt").write_text(d)
    t = data.load_corpus(str(tmp_path / "txt"), 0.2, str(tmp_path / "cache"), tokenizer=bpe)
    assert sorted(_decode_all(t, bpe)) == sorted(DOCS[:10])


def test_bad_sources_get_one_line(tmp_path):
    cache = str(tmp_path / "cache")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: no text field 'text' \(has \['body'\]\)"):
        data.load_corpus(str(bad), cache_dir=cache)
    bad.write_text(json.dumps({"text": "ok"}) + "\n{oops\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        data.load_corpus(str(bad), cache_dir=cache)
    bad.write_text(json.dumps({"text": 3}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: field 'text' is int"):
        data.load_corpus(str(bad), cache_dir=cache)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(DataError, match="holds no document with text"):
        data.load_corpus(str(empty), cache_dir=cache)
    with pytest.raises(DataError, match="matches no files"):
        data.load_corpus(str(tmp_path / "nothing*.jsonl"), cache_dir=cache)
    (tmp_path / "mixed").mkdir()
    _jsonl(tmp_path / "mixed" / "a.jsonl", DOCS[:2])
    (tmp_path / "mixed" / "b.txt").write_text("x")
    with pytest.raises(DataError, match="mixes .jsonl files with others"):
        data.load_corpus(str(tmp_path / "mixed"), cache_dir=cache)


def test_parquet_source_with_text_field(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow (the [data] extra) is not installed")
    import pyarrow.parquet as pq
    for part in range(2):
        pq.write_table(pa.table({"body": DOCS[part::2], "n": list(range(20))}),
                       tmp_path / f"p{part}.parquet")
    tok = tok_lib.ByteTokenizer()
    c = data.load_corpus(str(tmp_path / "*.parquet"), 0.2, str(tmp_path / "cache"),
                         tokenizer=tok, text_field="body")
    assert sorted(_decode_all(c, tok)) == sorted(DOCS)
    with pytest.raises(DataError, match=r"p0.parquet: no column 'text' \(columns: \['body', 'n'\]\)"):
        data.load_corpus(str(tmp_path / "*.parquet"), cache_dir=str(tmp_path / "cache"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="cannot read .*x.parquet as parquet"):
        data.load_corpus(str(tmp_path / "junk"), cache_dir=str(tmp_path / "cache"))


def test_datasets_save_to_disk_folder(tmp_path):
    datasets = pytest.importorskip("datasets", reason="datasets (the [data] extra) is not installed")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"content": DOCS})}).save_to_disk(
        str(tmp_path / "ds"))
    tok = tok_lib.ByteTokenizer()
    c = data.load_corpus(str(tmp_path / "ds"), 0.2, str(tmp_path / "cache"), tokenizer=tok,
                         text_field="content")
    assert sorted(_decode_all(c, tok)) == sorted(DOCS)
    with pytest.raises(DataError, match=r"no column 'text' \(columns: \['content'\]\)"):
        data.load_corpus(str(tmp_path / "ds"), cache_dir=str(tmp_path / "cache"))


def test_mixture_draws_rows_by_weight_and_is_deterministic(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", ["a" * 60] * 20)
    b = _jsonl(tmp_path / "b.jsonl", ["b" * 60] * 20)
    cfg = load_config(None, [f"data.cache_dir={tmp_path / 'cache'}", "data.seq_len=16",
                             f"data.mixture=[{{path: {a}, weight: 3}}, {{path: {b}}}]"])
    corpus = data.corpus_for(cfg.data)
    assert isinstance(corpus, mixture.Mixture) and corpus.weights == (3.0, 1.0)
    assert corpus.num_val_tokens == sum(p.num_val_tokens for p in corpus.parts)
    make = loader.batch_fn(corpus, cfg.data, seed=0, batch_size=64, rows=None)
    rows = np.concatenate([make(s)["inputs"] for s in range(8)])             # (512, 16)
    from_a = np.mean([np.any(r == ord("a")) for r in rows])
    assert 0.68 < from_a < 0.82                                             # 3:1 -> 0.75
    assert all(np.all(np.isin(r, [ord("a"), data.EOS_ID])) or np.all(np.isin(r, [ord("b"), data.EOS_ID]))
               for r in rows)                                               # a row: one source
    part = loader.batch_fn(corpus, cfg.data, seed=0, batch_size=64, rows=slice(16, 32))(3)
    assert np.array_equal(part["inputs"], make(3)["inputs"][16:32])
    with pytest.raises(ConfigError, match="data.mixture replaces data.path"):
        load_config(None, [f"data.path={a}", f"data.mixture=[{{path: {b}}}]"])


def test_loader_state_resumes_the_same_batches(tmp_path):
    tokens = np.arange(5000, dtype=np.uint16) % 250
    starts = np.arange(0, 5000, 97)
    corpus = data.Corpus(train=tokens, val=tokens[:100], train_doc_starts=starts,
                         val_doc_starts=starts[:1], train_files=(), val_files=(), split="by_file",
                         source="t", cache_dir=tmp_path / "k")
    for packing in ("concat", "segments"):
        cfg = load_config(None, ["data.seq_len=16", f"data.packing={packing}"])
        make = loader.batch_fn(corpus, cfg.data, seed=5, batch_size=4, rows=None)
        full = loader.TrainLoader(make, steps=6, seed=5, source="k")
        batches = list(full)
        first = loader.TrainLoader(make, steps=6, seed=5, source="k")
        head = [next(first) for _ in range(3)]
        loader.save_state(tmp_path, 3, first.get_state())
        resumed = loader.TrainLoader(make, steps=6, seed=5, source="k")
        resumed.set_state(loader.load_state(tmp_path, 3))
        for want, got in zip(batches, head + list(resumed)):
            assert want.keys() == got.keys() and all(np.array_equal(want[k], got[k]) for k in want)
    with pytest.raises(DataError, match="resume with the run's own data"):
        loader.TrainLoader(make, steps=6, seed=6, source="k").set_state(first.get_state())


def test_bits_per_byte_counts_the_evaluated_text():
    tokens = np.array([104, 105, data.EOS_ID, 0xC3, 0xA9, data.EOS_ID], np.uint16)   # "hi", "é"
    corpus = data.Corpus(train=tokens, val=tokens, train_doc_starts=np.array([0, 3]),
                         val_doc_starts=np.array([0, 3]), train_files=(), val_files=(),
                         split="by_file", source="t", cache_dir=None)
    assert corpus.bytes_of(np.arange(6)) == 4 and corpus.bytes_of(np.array([2, 5])) == 0
    assert data.bits_per_byte(np.log(2.0), 6, 4) == pytest.approx(1.5)      # 6 bits over 4 bytes
    with pytest.raises(DataError, match="at least one byte"):
        data.bits_per_byte(1.0, 2, 0)


def test_one_document_is_cut_by_tokens(tmp_path):
    f = _jsonl(tmp_path / "one.jsonl", [DOCS[3] * 5])
    tok = tok_lib.ByteTokenizer()
    c = data.load_corpus(str(f), 0.25, str(tmp_path / "cache"), tokenizer=tok)
    assert c.split == "by_tokens" and list(c.val_doc_starts) == [0]
    whole = np.concatenate([c.train, c.val])
    assert tok.decode(whole) == DOCS[3] * 5 and c.num_val_tokens == round(whole.size * 0.25)
    assert c.bytes_of(np.arange(c.num_val_tokens)) == c.num_val_tokens - 1    # its EOS: 0 bytes
