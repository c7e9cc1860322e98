"""Tests for tfm_jax.data: tokenizer, corpus discovery/cache, stateless batching, sharding."""

import hashlib
import json
import math
import os
import pathlib

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tfm_jax import data
from tfm_jax.data import BOS_ID, EOS_ID, PAD_ID, ByteTokenizer, DataError
from tfm_jax.data import builtin as builtin_lib


# ----------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("text", ["hello, world\n", "归一化 LayerNorm", "emoji 🚀🙂 ok", "",
                                  "\x00tab\t\r\n"])
def test_tokenizer_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.shape == (len(text.encode("utf-8")),)
    assert tok.decode(ids) == text
    wrapped = tok.encode(text, add_bos=True, add_eos=True)
    assert wrapped[0] == BOS_ID and wrapped[-1] == EOS_ID and len(wrapped) == len(ids) + 2
    assert tok.decode(wrapped) == text


def test_tokenizer_decode_drops_specials_and_tolerates_junk():
    tok = ByteTokenizer()
    assert ByteTokenizer.vocab_size == 259 and (PAD_ID, BOS_ID, EOS_ID) == (256, 257, 258)
    assert tok.decode([BOS_ID, ord("h"), PAD_ID, ord("i"), EOS_ID, PAD_ID]) == "hi"
    assert tok.decode(np.array([[0xFF, ord("a")], [300, -1]])) == "\ufffda"  # never raises
    assert tok.decode([]) == ""


# ----------------------------------------------------------------------------- built-in corpus


@pytest.fixture(scope="module")
def builtin(tmp_path_factory):
    return data.load_corpus(None, cache_dir=str(tmp_path_factory.mktemp("cache")))


# The built-in corpus is a shipped snapshot: the same bytes, tokens and digest on every Python
# (both CI legs check these figures, so a corpus that moved with the interpreter would fail one).
BUILTIN_FILES, BUILTIN_BYTES = 734, 12_118_641
BUILTIN_TOKENS = (11_569_340, 550_032)
BUILTIN_DIGEST = "562bbe306d8313446bd58c9c8c51df9e131ef2cc80e313815837f5cdcd8f8ebb"


def test_builtin_files_filtered_and_deterministic(builtin):
    cache = str(builtin.cache_dir.parent)
    files = data.builtin_corpus_files(cache)
    root = builtin_lib.root(builtin.cache_dir.parent)
    rel = [f.relative_to(root) for f in files]
    assert files == data.builtin_corpus_files(cache) == data.resolve_files(None, cache_dir=cache)
    assert len(files) == BUILTIN_FILES and sum(f.stat().st_size for f in files) == BUILTIN_BYTES
    assert [r.as_posix() for r in rel] == sorted(r.as_posix() for r in rel)
    excluded = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    assert all(f.suffix == ".py" and not excluded & set(r.parts) for f, r in zip(files, rel))
    assert "os.py" in {r.as_posix() for r in rel} and (builtin_lib.ARCHIVE.parent / "LICENSE.txt").is_file()


def test_builtin_corpus_is_the_same_on_every_python(builtin):
    assert builtin.source == builtin_lib.LABEL
    assert (builtin.num_train_tokens, builtin.num_val_tokens) == BUILTIN_TOKENS
    assert builtin.digest == BUILTIN_DIGEST
    fp = builtin.fingerprint
    assert fp["digest"] == BUILTIN_DIGEST and fp["tokenizer"] == "byte"
    assert (fp["train_tokens"], fp["val_tokens"]) == BUILTIN_TOKENS
    assert fp["train_documents"] + fp["val_documents"] == BUILTIN_FILES - 3   # 3 empty files


def test_builtin_archive_damaged_is_one_clear_error(tmp_path, monkeypatch):
    bad = tmp_path / "copy.tar.xz"
    raw = bytearray(builtin_lib.ARCHIVE.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    bad.write_bytes(bytes(raw))
    monkeypatch.setattr(builtin_lib, "ARCHIVE", bad)
    with pytest.raises(DataError, match="damaged.*reinstall tfm-jax"):
        data.load_corpus(None, cache_dir=str(tmp_path / "cache"))
    monkeypatch.setattr(builtin_lib, "ARCHIVE", tmp_path / "absent.tar.xz")
    with pytest.raises(DataError, match="missing"):
        data.load_corpus(None, cache_dir=str(tmp_path / "cache"))


def test_builtin_corpus(builtin, tmp_path):
    files = data.builtin_corpus_files(str(builtin.cache_dir.parent))
    assert builtin.split == "by_file" and builtin.train_files and builtin.val_files
    assert not set(builtin.train_files) & set(builtin.val_files)
    nonempty = [f for f in files if f.stat().st_size > 0]
    assert len(builtin.train_files) + len(builtin.val_files) == len(nonempty)
    total = sum(f.stat().st_size for f in files) + len(nonempty)  # one EOS per document
    assert builtin.num_train_tokens + builtin.num_val_tokens == total
    for stream, starts in [(builtin.train, builtin.train_doc_starts), (builtin.val, builtin.val_doc_starts)]:
        assert isinstance(stream, np.memmap) and stream.dtype == np.uint16
        assert isinstance(starts, np.memmap) and starts.dtype == np.int64 and starts[0] == 0
        assert stream[-1] == EOS_ID and np.all(stream[starts[1:] - 1] == EOS_ID)
    # The split is a pure function of the relative path.
    expected_val = [n for n in builtin.train_files + builtin.val_files
                    if int(hashlib.sha1(n.encode()).hexdigest(), 16) % 1000 < 50]
    assert sorted(expected_val) == sorted(builtin.val_files)
    again = data.load_corpus(None, cache_dir=str(tmp_path))  # fresh cache dir: a full rebuild
    assert again.cache_dir != builtin.cache_dir
    assert again.files == builtin.files and again.digest == builtin.digest
    assert np.array_equal(again.val, builtin.val) and np.array_equal(again.train_doc_starts,
                                                                     builtin.train_doc_starts)
    assert 2.5 < data.unigram_entropy(builtin.train, builtin.val) < 4.0  # ~3.3 nats


def test_builtin_batch_matches_stream(builtin):
    b = data.train_batch(builtin.train, builtin.train_doc_starts, step=3, seed=1, batch_size=4, seq_len=64)
    raw = np.asarray(builtin.train).tobytes()
    for row_in, row_tg in zip(b["inputs"], b["targets"]):
        at = raw.find(row_in.astype("<u2").tobytes())  # 128-byte needle: a (likely unique) match
        while at > 0 and at % 2:
            at = raw.find(row_in.astype("<u2").tobytes(), at + 1)
        s = at // 2
        assert at >= 0 and np.array_equal(builtin.train[s + 1:s + 65], row_tg)


# ----------------------------------------------------------------------------- user corpora


def _write(path: pathlib.Path, content: bytes | str) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def test_single_file_falls_back_to_byte_split(tmp_path):
    text = "héllo wörld\n" * 50
    f = _write(tmp_path / "one.txt", text)
    c = data.load_corpus(str(f), val_fraction=0.1, cache_dir=str(tmp_path / "cache"))
    total = len(text.encode()) + 1
    assert c.split == "by_bytes" and c.train_files == c.val_files == ("one.txt",)
    assert c.num_train_tokens + c.num_val_tokens == total
    assert c.num_val_tokens == total - round(total * 0.9)
    joined = np.concatenate([c.train, c.val])
    assert ByteTokenizer().decode(joined) == text and joined[-1] == EOS_ID
    assert list(c.val_doc_starts) == [0] and list(c.train_doc_starts) == [0]


def test_folder_and_glob(tmp_path):
    root = tmp_path / "corpus"
    names = [f"doc{i:02d}.txt" for i in range(40)] + ["sub/deep.md"]
    for n in names:
        _write(root / n, f"document {n}\n")
    _write(root / ".hidden.txt", "secret")
    _write(root / ".git" / "config", "secret")
    _write(root / "empty.txt", "")
    files = data.resolve_files(str(root))
    assert [f.relative_to(root).as_posix() for f in files] == sorted(names + ["empty.txt"])
    c = data.load_corpus(str(root), val_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    assert c.split == "by_file" and sorted(c.train_files + c.val_files) == sorted(names)
    val_text = ByteTokenizer().decode(c.val)
    assert "secret" not in val_text + ByteTokenizer().decode(c.train)
    assert all(f"document {n}\n" in val_text for n in c.val_files)
    assert len(c.val_doc_starts) == len(c.val_files)

    glob_files = data.resolve_files(str(root / "**" / "*.md"))
    assert glob_files == [root / "sub" / "deep.md"]
    g = data.load_corpus(str(root / "doc1*.txt"), val_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    assert sorted(g.train_files + g.val_files) == [f"doc{i}.txt" for i in range(10, 20)]


def test_missing_and_empty_paths(tmp_path):
    missing = str(tmp_path / "nope" / "*.txt")
    with pytest.raises(DataError, match="nope") as e:
        data.load_corpus(missing, cache_dir=str(tmp_path / "cache"))
    assert "data.path" in str(e.value)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="empty_dir"):
        data.load_corpus(str(tmp_path / "empty_dir"), cache_dir=str(tmp_path / "cache"))
    _write(tmp_path / "zeros" / "a.txt", "")
    with pytest.raises(DataError, match="zeros.*empty"):
        data.load_corpus(str(tmp_path / "zeros"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match="val_fraction"):
        data.load_corpus(str(tmp_path / "zeros"), val_fraction=0.0)


def test_invalid_utf8_names_file_and_offset(tmp_path):
    """A file named as data.path must be UTF-8 (the error names file and offset); in a
    folder the same file is skipped and counted instead (see the next test)."""
    _write(tmp_path / "corpus" / "good.txt", "fine")
    bad = _write(tmp_path / "corpus" / "bad.txt", b"ok\xff\xfe")
    with pytest.raises(DataError, match=r"bad\.txt.*offset 2.*re-encode"):
        data.load_corpus(str(bad), cache_dir=str(tmp_path / "cache"))
    assert not list((tmp_path / "cache").rglob("*.tmp"))  # failed build leaves no temp files
    c = data.load_corpus(str(tmp_path / "corpus"), cache_dir=str(tmp_path / "cache"))
    assert c.skipped_files == ("bad.txt",) and set(c.train_files + c.val_files) == {"good.txt"}
    # Offsets stay exact across the 8 MiB read-chunk boundary (here: a split 3-byte char).
    bad.write_bytes(b"a" * (data._READ_CHUNK - 1) + "€".encode() + b"\xc3(")
    with pytest.raises(DataError, match=f"offset {data._READ_CHUNK + 2}"):
        list(data._iter_utf8_chunks(bad))


def test_source_folder_skips_non_text_files(tmp_path):
    """A folder of code is a natural corpus: __pycache__ and hidden folders are not walked, and
    files that are not text (NUL in the first 8 KiB, or not UTF-8) are skipped and reported."""
    root = tmp_path / "src"
    texts = {"pkg/__init__.py": "", "pkg/mod.py": "def f(x):\n    return x\n",
             "README.md": "# title\n", "notes.txt": "café ünïcode\n"}
    for name, text in texts.items():
        _write(root / name, text)
    _write(root / "pkg" / "__pycache__" / "mod.cpython-311.pyc", b"\xa7\r\r\n\0\0\0\0code")
    _write(root / ".venv" / "lib" / "x.py", "hidden")
    _write(root / "logo.png", b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")      # NUL early, not UTF-8
    _write(root / "nul.bin", b"text\0text")                             # valid UTF-8, but NUL
    _write(root / "latin1.txt", "caf\xe9\n".encode("latin-1"))         # no NUL, not UTF-8
    _write(root / "late_nul.txt", "a" * 9000 + "\0")                    # NUL past 8 KiB: text
    cache = str(tmp_path / "cache")
    assert not any("__pycache__" in str(f) or ".venv" in str(f)
                   for f in data.resolve_files(str(root)))
    c = data.load_corpus(str(root), val_fraction=0.3, cache_dir=cache)
    kept = sorted(c.train_files + c.val_files)
    assert kept == sorted([n for n, t in texts.items() if t] + ["late_nul.txt"])
    assert c.skipped_files == ("latin1.txt", "logo.png", "nul.bin")
    assert c.skipped_summary() == ("3 files skipped (binary/not UTF-8), e.g. latin1.txt, "
                                   "logo.png, nul.bin")
    assert "skipped=3" in repr(c)
    again = data.load_corpus(str(root), val_fraction=0.3, cache_dir=cache)     # from the cache
    assert again.cache_dir == c.cache_dir and again.skipped_files == c.skipped_files
    # data.include is part of the cache key: a different include never reuses that cache
    py = data.load_corpus(str(root), val_fraction=0.3, cache_dir=cache, include=["*.py"])
    assert py.cache_dir != c.cache_dir
    assert set(py.train_files + py.val_files) == {"pkg/mod.py"} and py.skipped_files == ()
    both = data.load_corpus(str(root / "**" / "*"), cache_dir=cache, include=["*.md", "pkg/*"])
    assert set(both.train_files + both.val_files) == {"README.md", "pkg/mod.py"}
    with pytest.raises(DataError, match=r"matching data.include=\['\*.rs'\]"):
        data.load_corpus(str(root), cache_dir=cache, include=["*.rs"])
    only_binary = tmp_path / "bin"
    _write(only_binary / "a.pyc", b"\0\1\2")
    with pytest.raises(DataError, match=r"all 1 non-empty file\(s\) skipped.*data.include"):
        data.load_corpus(str(only_binary), cache_dir=cache)


def test_data_include_is_validated_config():
    from tfm_jax.config import ConfigError, load_config
    assert load_config(None, ["data.include=['*.py', '*.md']"]).data.include == ["*.py", "*.md"]
    with pytest.raises(ConfigError, match="data.include"):
        load_config(None, ["data.include=5"])


# ----------------------------------------------------------------------------- cache


def test_cache_reused_and_robust_to_partial_files(tmp_path, monkeypatch):
    monkeypatch.setenv("TFM_JAX_CACHE", str(tmp_path / "env_cache"))
    corpus_dir = tmp_path / "corpus"
    for i in range(30):
        _write(corpus_dir / f"f{i}.txt", f"file number {i}\n" * (i + 1))
    first = data.load_corpus(str(corpus_dir))
    assert first.cache_dir.parent == tmp_path / "env_cache" / "corpus"
    token_file = first.cache_dir / "train.tokens"
    mtime = token_file.stat().st_mtime_ns
    os.utime(token_file, ns=(mtime - 10**9, mtime - 10**9))  # robust even on coarse-mtime filesystems
    mtime = token_file.stat().st_mtime_ns
    (first.cache_dir / ".train.tokens.abc123.tmp").write_bytes(b"\x01\x02partial")  # killed build
    second = data.load_corpus(str(corpus_dir))
    assert token_file.stat().st_mtime_ns == mtime  # not rebuilt
    assert np.array_equal(second.train, first.train)

    # A truncated cache entry (no meta.json published) is rebuilt, not trusted.
    # (unlink first: truncating a file in place would SIGBUS the live memmap of `first`)
    (first.cache_dir / "meta.json").unlink()
    token_file.unlink()
    token_file.write_bytes(b"\x00" * 10)
    third = data.load_corpus(str(corpus_dir))
    assert np.array_equal(third.train, first.train) and np.array_equal(third.val, first.val)

    # Touching a source file changes the key (new entry), leaving the old one intact.
    _write(corpus_dir / "f0.txt", "changed\n")
    fourth = data.load_corpus(str(corpus_dir))
    assert fourth.cache_dir != first.cache_dir


# ----------------------------------------------------------------------------- batching


def _stream(n=5000):
    return (np.arange(n) % 60000).astype(np.uint16)  # each token identifies its position


def test_train_batch_packed():
    tokens = _stream()
    kw = dict(batch_size=8, seq_len=32, seed=7)
    b = data.train_batch(tokens, np.array([0]), step=5, **kw)
    assert b["inputs"].shape == b["targets"].shape == b["mask"].shape == (8, 32)
    assert b["inputs"].dtype == b["targets"].dtype == np.int32 and b["mask"].dtype == np.float32
    assert np.all(b["mask"] == 1)
    for row_in, row_tg in zip(b["inputs"], b["targets"]):
        s = int(row_in[0])
        assert np.array_equal(row_in, tokens[s:s + 32]) and np.array_equal(row_tg, tokens[s + 1:s + 33])
    again = data.train_batch(tokens, np.array([0]), step=5, **kw)
    assert all(np.array_equal(b[k], again[k]) for k in b)
    other = data.train_batch(tokens, np.array([0]), step=6, **kw)
    assert not np.array_equal(b["inputs"], other["inputs"])
    for rows in [slice(0, 4), slice(4, 8), slice(2, 3)]:
        part = data.train_batch(tokens, np.array([0]), step=5, rows=rows, **kw)
        assert all(np.array_equal(part[k], b[k][rows]) for k in b)
    with pytest.raises(DataError, match="rows"):
        data.train_batch(tokens, np.array([0]), step=5, rows=slice(4, 12), **kw)
    with pytest.raises(DataError, match="5000"):
        data.train_batch(tokens, np.array([0]), step=0, seed=0, batch_size=2, seq_len=5000)


def test_split_too_small_names_the_split():
    tokens = _stream(100)
    with pytest.raises(DataError, match=r"^train split too small: data.seq_len=100 .* 100 tokens"):
        data.train_batch(tokens, np.array([0]), step=0, seed=0, batch_size=2, seq_len=100)
    with pytest.raises(DataError, match=r"^validation split too small: data.seq_len=200 .*"
                                        r"data.val_fraction"):
        data.eval_batches(tokens, batch_size=2, seq_len=200, max_batches=1)
    with pytest.raises(DataError, match=r"^validation split too small: 100 tokens = 9 windows"):
        data.eval_batches(tokens, batch_size=16, seq_len=11, max_batches=1)


def test_train_batch_unpacked_documents():
    docs = [[10, 11, 12], list(range(20, 60)), [70]]
    tokens = np.concatenate([d + [EOS_ID] for d in docs]).astype(np.uint16)
    starts = np.cumsum([0] + [len(d) + 1 for d in docs[:-1]])
    b = data.train_batch(tokens, starts, step=0, seed=0, batch_size=64, seq_len=8, packing=False)
    seen = set()
    for inp, tgt, mask in zip(b["inputs"], b["targets"], b["mask"]):
        doc = next(d + [EOS_ID] for d in docs if d[0] == inp[1])
        seen.add(doc[0])
        real = doc[:8]
        assert inp[0] == BOS_ID
        assert list(tgt[:len(real)]) == real and np.all(tgt[len(real):] == PAD_ID)
        assert np.array_equal(inp[1:], tgt[:-1])
        assert np.array_equal(mask, (np.arange(8) < len(real)).astype(np.float32))
    assert seen == {10, 20, 70}
    part = data.train_batch(tokens, starts, step=0, seed=0, batch_size=64, seq_len=8, packing=False,
                            rows=slice(16, 32))
    assert all(np.array_equal(part[k], b[k][16:32]) for k in b)


def test_eval_batches():
    tokens = _stream(1000)
    batches = list(data.eval_batches(tokens, batch_size=4, seq_len=10, max_batches=None))
    assert len(batches) == 999 // 10 // 4
    starts = np.concatenate([b["inputs"][:, 0] for b in batches])
    assert np.array_equal(starts, np.arange(len(starts)) * 10)  # consecutive, non-overlapping
    for b in batches:
        assert np.array_equal(b["targets"][:, :-1], b["inputs"][:, 1:]) and np.all(b["mask"] == 1)
        assert np.array_equal(b["targets"][:, -1], b["inputs"][:, -1] + 1)
    capped = list(data.eval_batches(tokens, batch_size=4, seq_len=10, max_batches=3))
    assert len(capped) == 3
    # a capped evaluation spreads its 12 windows over all 99 slots of the stream
    starts = np.concatenate([b["inputs"][:, 0] for b in capped])
    assert np.array_equal(starts, (np.arange(12) * 99 // 12) * 10)
    assert np.all(np.diff(starts) >= 10) and starts[-1] >= 900
    np.testing.assert_array_equal(
        starts, data.eval_window_starts(tokens, batch_size=4, seq_len=10, max_batches=3))
    half = next(data.eval_batches(tokens, batch_size=4, seq_len=10, max_batches=1, rows=slice(2, 4)))
    full = next(data.eval_batches(tokens, batch_size=4, seq_len=10, max_batches=1))
    assert np.array_equal(half["inputs"], full["inputs"][2:4])
    with pytest.raises(DataError, match=r"100 tokens.*val_fraction"):
        data.eval_batches(tokens[:100], batch_size=16, seq_len=10, max_batches=1)


def test_unigram_entropy_matches_direct_computation():
    train = np.array([0, 0, 1, 2, 258], np.uint16)
    ev = np.array([0, 1, 1, 3], np.uint16)
    counts = np.zeros(259)
    for t in train:
        counts[t] += 1
    p = (counts + 1) / (len(train) + 259)
    expected = -np.mean([math.log(p[t]) for t in ev])
    assert data.unigram_entropy(train, ev) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(DataError, match="outside"):
        data.unigram_entropy(np.array([300]), ev)


# ----------------------------------------------------------------------------- sharding


def test_process_rows(monkeypatch):
    assert data.process_rows(16) == slice(0, 16 // jax.process_count())
    monkeypatch.setattr(jax, "process_count", lambda: 4)
    monkeypatch.setattr(jax, "process_index", lambda: 2)
    assert data.process_rows(16) == slice(8, 12)
    with pytest.raises(DataError, match="divisible"):
        data.process_rows(10)


def test_shard_batch_on_all_devices():
    devices = jax.devices()
    batch_size = 2 * len(devices)
    rows = data.process_rows(batch_size)
    local = data.train_batch(_stream(), np.array([0]), step=1, seed=0, batch_size=batch_size, seq_len=16,
                             rows=rows)
    sharding = NamedSharding(Mesh(np.array(devices), ("data",)), P("data"))
    out = data.shard_batch(local, sharding, batch_size)
    for k, v in local.items():
        assert out[k].shape == v.shape and out[k].dtype == v.dtype and out[k].sharding == sharding
        assert np.array_equal(np.asarray(out[k]), v)
    assert len(out["inputs"].addressable_shards) == len(devices)


# ----------------------------------------------------------------------------- corpus fingerprint


def test_fingerprint_follows_content_not_paths(tmp_path):
    for where in ("a", "b"):
        for i in range(12):
            _write(tmp_path / where / f"doc{i}.txt", f"text number {i}\n" * 5)
    a = data.load_corpus(str(tmp_path / "a"), val_fraction=0.2, cache_dir=str(tmp_path / "c"))
    b = data.load_corpus(str(tmp_path / "b"), val_fraction=0.2, cache_dir=str(tmp_path / "c"))
    assert a.cache_dir != b.cache_dir and a.digest == b.digest and len(a.digest) == 64
    # the digest is sha256 over both splits' streams, recomputed here from the arrays
    h = hashlib.sha256()
    for split in ("train", "val"):
        tok, starts = getattr(a, split), getattr(a, f"{split}_doc_starts")
        h.update(f"{split}.tokens:<u2:{tok.size};".encode() + np.asarray(tok).tobytes())
        h.update(f"{split}.starts:<i8:{starts.size};".encode() + np.asarray(starts).tobytes())
    assert a.digest == h.hexdigest()
    _write(tmp_path / "b" / "doc3.txt", "text number 3\n" * 5 + "one more line\n")
    changed = data.load_corpus(str(tmp_path / "b"), val_fraction=0.2, cache_dir=str(tmp_path / "c"))
    assert changed.digest != a.digest
    other_split = data.load_corpus(str(tmp_path / "a"), val_fraction=0.4, cache_dir=str(tmp_path / "c"))
    assert other_split.digest != a.digest


def test_check_fingerprint_names_both_and_honours_the_override(tmp_path):
    run = {"digest": "a" * 64, "source": "old.txt", "tokenizer": "byte", "train_tokens": 10,
           "val_tokens": 2}
    now = dict(run, digest="b" * 64, source="new.txt", train_tokens=11)
    assert data.check_fingerprint(run, dict(run), what="eval", allow=False) == ""
    with pytest.raises(DataError) as err:
        data.check_fingerprint(run, now, what="--resume", allow=False)
    msg = str(err.value)
    assert "\n" not in msg and "aaaaaaaaaaaa" in msg and "bbbbbbbbbbbb" in msg
    assert "old.txt" in msg and "new.txt" in msg and "--allow-corpus-change" in msg
    note = data.check_fingerprint(run, now, what="eval", allow=True)
    assert "aaaaaaaaaaaa" in note and "bbbbbbbbbbbb" in note
    assert "no corpus fingerprint" in data.check_fingerprint(None, now, what="eval", allow=False)
    # corpus.json keeps the history of corpora a run trained on
    data.record_run_corpus(tmp_path, run, 0)
    data.record_run_corpus(tmp_path, run, 5)          # a resume on the same corpus: no new entry
    assert data.run_corpus(tmp_path) == run
    data.record_run_corpus(tmp_path, now, 8)
    saved = json.loads((tmp_path / "corpus.json").read_text())
    assert saved["fingerprint"] == now == data.run_corpus(tmp_path)
    assert [h["from_step"] for h in saved["history"]] == [0, 8]
    assert data.run_corpus(tmp_path / "absent") is None
