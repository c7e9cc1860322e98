"""Tokenizers behind one small protocol: byte (built in), Hugging Face ``tokenizers``, sentencepiece.

Every tokenizer has ``encode(text, add_bos, add_eos) -> int32 ids``, ``decode(ids) -> str``,
``vocab_size``, ``bos_id`` / ``eos_id`` / ``pad_id``, ``fingerprint`` (a hash of what it maps,
used in cache keys), ``token_bytes(text)`` (UTF-8 bytes attributed to each token of ``encode``:
they sum to ``len(text.encode())``, the basis of bits per byte) and ``save(dir)`` (files that
``load_tokenizer(dir)`` reads back). ``load_tokenizer(spec)`` takes ``"byte"``, a
``tokenizer.json``, a folder holding one (or a ``tokenizer.model``), or a sentencepiece ``.model``.
``train_bpe`` trains a byte-level BPE whose folder both tfm-jax and transformers' ``AutoTokenizer``
load. The third-party libraries are imported only when such a tokenizer is used.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
from pathlib import Path
from typing import Iterable, Protocol, Sequence, runtime_checkable

import numpy as np

from tfm_jax.core.errors import DataError

BYTE = "byte"
# Special tokens of the BPE tokenizers trained here (the Llama/sentencepiece names).
BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<s>", "</s>", "<pad>"
# What a tokenizer.json without a tokenizer_config.json most likely calls them, in order.
_CANDIDATES = {"eos": ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eot_id|>"),
               "bos": ("<s>", "<|begin_of_text|>", "<bos>", "<|endoftext|>"),
               "pad": ("<pad>", "<|pad|>", "[PAD]")}


@runtime_checkable
class Tokenizer(Protocol):
    """What data, training, evaluation, generation and checkpoint tools need of a tokenizer."""

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    @property
    def name(self) -> str: ...                       # "byte", "hf:<path>", "sentencepiece:<path>"

    @property
    def fingerprint(self) -> str: ...                # sha1 of what the tokenizer maps

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> np.ndarray: ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...

    def token_bytes(self, text: str) -> tuple[np.ndarray, np.ndarray]: ...   # (ids, bytes per id)

    def save(self, directory: str | Path) -> Path: ...


def _wrap(ids: np.ndarray, bos: int, eos: int, add_bos: bool, add_eos: bool) -> np.ndarray:
    return np.concatenate([np.asarray([bos] * add_bos, np.int32), np.asarray(ids, np.int32),
                           np.asarray([eos] * add_eos, np.int32)])


def _int_ids(ids: Sequence[int] | np.ndarray) -> np.ndarray:
    ids = np.asarray(ids).reshape(-1)
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"decode expects integer token ids, got dtype {ids.dtype}")
    return ids


class ByteTokenizer:
    """UTF-8 byte tokenizer: ids 0..255 are bytes, then PAD=256, BOS=257, EOS=258."""

    PAD_ID = 256
    BOS_ID = 257
    EOS_ID = 258
    vocab_size = 259
    bos_id, eos_id, pad_id = BOS_ID, EOS_ID, PAD_ID
    name = BYTE
    fingerprint = BYTE

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> np.ndarray:
        """Returns int32 ids of shape ``(len(text.encode('utf-8')) + add_bos + add_eos,)``."""
        body = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)
        return _wrap(body, self.BOS_ID, self.EOS_ID, add_bos, add_eos)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Inverse of ``encode`` for ids of any shape; drops every id outside 0..255 (specials).

        Invalid byte sequences (e.g. sampled by a half-trained model) become U+FFFD instead
        of raising; valid UTF-8 round-trips exactly."""
        ids = _int_ids(ids)
        data = ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tobytes()
        return data.decode("utf-8", errors="replace")

    def token_bytes(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        ids = self.encode(text)
        return ids, np.ones(ids.shape, np.int32)

    def save(self, directory: str | Path) -> Path:   # nothing to store: "byte" names it
        return Path(directory)


def _bytes_from_char_spans(text: str, ends: np.ndarray) -> np.ndarray:
    """UTF-8 bytes per token from each token's end offset (in characters): token i owns the
    characters after the furthest end before it up to its own end; the last token also owns any
    tail a normalizer dropped. Sums to ``len(text.encode())`` (0 tokens: an empty array)."""
    if ends.size == 0:
        return np.zeros(0, np.int32)
    char_bytes = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    cum = np.concatenate([[0], np.cumsum(np.where(char_bytes < 0x80, 1, np.where(
        char_bytes < 0x800, 2, np.where(char_bytes < 0x10000, 3, 4))))])    # (n_chars + 1,)
    reach = np.maximum.accumulate(np.clip(ends, 0, len(text)))
    reach[-1] = len(text)
    return np.diff(np.concatenate([[0], cum[reach]])).astype(np.int32)


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer (``tokenizer.json``); specials from the folder's
    ``tokenizer_config.json`` / ``special_tokens_map.json``, else the usual names."""

    def __init__(self, path: str | Path):
        try:
            from tokenizers import Tokenizer as _HF
        except ImportError:  # pragma: no cover - a default dependency
            raise DataError("data.tokenizer names a tokenizer.json, which needs the `tokenizers` "
                            "package: pip install tokenizers") from None
        path = Path(path).expanduser()
        self.path = path
        try:
            self._tok = _HF.from_file(str(path))
        except Exception as e:  # the library raises its own exception types
            raise DataError(f"cannot read the tokenizer {path}: {e}") from None
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        declared = _declared_specials(path.parent)
        ids = {}
        for role in ("eos", "bos", "pad"):
            names = ([declared[role]] if declared.get(role) else []) + list(_CANDIDATES[role])
            ids[role] = next((self._tok.token_to_id(n) for n in names
                              if self._tok.token_to_id(n) is not None), None)
        if ids["eos"] is None:
            raise DataError(f"tokenizer {path} has no end-of-text token (none declared in "
                            f"tokenizer_config.json, none of {list(_CANDIDATES['eos'])}); "
                            "documents need one between them")
        self.eos_id = int(ids["eos"])
        self.bos_id = int(ids["bos"] if ids["bos"] is not None else self.eos_id)
        self.pad_id = int(ids["pad"] if ids["pad"] is not None else self.eos_id)
        self._specials = np.asarray(sorted({self.eos_id, self.bos_id, self.pad_id}))

    @property
    def name(self) -> str:
        return f"hf:{self.path}"

    @property
    def fingerprint(self) -> str:
        return hashlib.sha1(json.dumps([self._tok.to_str(), self.bos_id, self.eos_id, self.pad_id]
                                       ).encode("utf-8")).hexdigest()[:24]

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> np.ndarray:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return _wrap(np.asarray(ids, np.int32), self.bos_id, self.eos_id, add_bos, add_eos)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        ids = _int_ids(ids)
        ids = ids[(ids >= 0) & (ids < self.vocab_size) & ~np.isin(ids, self._specials)]
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_bytes(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        return self.token_bytes_batch([text])[0]

    def token_bytes_batch(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """:meth:`token_bytes` of several texts in one call (the library encodes in parallel)."""
        out = []
        for text, enc in zip(texts, self._tok.encode_batch(texts, add_special_tokens=False)):
            ends = np.asarray([e for _, e in enc.offsets], np.int64)
            out.append((np.asarray(enc.ids, np.int32), _bytes_from_char_spans(text, ends)))
        return out

    def save(self, directory: str | Path) -> Path:
        return save_hf_folder(self._tok, directory, self._tok.id_to_token(self.bos_id),
                              self._tok.id_to_token(self.eos_id), self._tok.id_to_token(self.pad_id))


class SentencePieceTokenizer:
    """A sentencepiece ``.model``; BOS/EOS/PAD from the model (PAD falls back to EOS)."""

    def __init__(self, path: str | Path):
        try:
            import sentencepiece as spm
        except ImportError:  # pragma: no cover - a default dependency
            raise DataError("data.tokenizer names a sentencepiece .model, which needs the "
                            "`sentencepiece` package: pip install sentencepiece") from None
        self.path = Path(path).expanduser()
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except Exception as e:  # OSError / RuntimeError, depending on the version
            raise DataError(f"cannot read the sentencepiece model {self.path}: {e}") from None
        self.vocab_size = int(self._sp.get_piece_size())
        if self._sp.eos_id() < 0:
            raise DataError(f"sentencepiece model {self.path} has no EOS piece (eos_id=-1); "
                            "documents need one between them")
        self.eos_id = int(self._sp.eos_id())
        self.bos_id = int(self._sp.bos_id() if self._sp.bos_id() >= 0 else self.eos_id)
        self.pad_id = int(self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id)

    @property
    def name(self) -> str:
        return f"sentencepiece:{self.path}"

    @property
    def fingerprint(self) -> str:
        return hashlib.sha1(self._sp.serialized_model_proto()).hexdigest()[:24]

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> np.ndarray:
        return _wrap(np.asarray(self._sp.encode(text), np.int32), self.bos_id, self.eos_id,
                     add_bos, add_eos)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        ids = _int_ids(ids)
        keep = (ids >= 0) & (ids < self.vocab_size) & ~np.isin(ids, [self.bos_id, self.eos_id,
                                                                      self.pad_id])
        return self._sp.decode([int(i) for i in ids[keep]])

    def token_bytes(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        try:     # sentencepiece >= 0.2.1 (immutable_proto is gone there); older: out_type
            proto = self._sp.encode(text, return_type="proto")
        except TypeError:
            proto = self._sp.encode(text, out_type="immutable_proto")
        ids = np.asarray([p.id for p in proto.pieces], np.int32)
        # begin/end are byte offsets into the (normalized) input; own each byte once
        ends = np.asarray([p.end for p in proto.pieces], np.int64)
        total = len(text.encode("utf-8"))
        if ids.size == 0:
            return ids, np.zeros(0, np.int32)
        reach = np.minimum(np.maximum.accumulate(ends), total)
        reach[-1] = total
        return ids, np.diff(np.concatenate([[0], reach])).astype(np.int32)

    def save(self, directory: str | Path) -> Path:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / "tokenizer.model").write_bytes(self._sp.serialized_model_proto())
        return out


def _declared_specials(folder: Path) -> dict[str, str]:
    """bos/eos/pad token strings declared in a HF folder's JSON files ({} if none)."""
    found: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        try:
            raw = json.loads((folder / name).read_text("utf-8"))
        except (OSError, ValueError):
            continue
        for role in ("bos", "eos", "pad"):
            value = raw.get(f"{role}_token")
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str) and role not in found:
                found[role] = value
    return found


def save_hf_folder(tok, directory: str | Path, bos: str, eos: str, pad: str) -> Path:
    """Writes ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``: what
    transformers' ``AutoTokenizer.from_pretrained(directory)`` reads (no model files needed)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    specials = {"bos_token": bos, "eos_token": eos, "pad_token": pad}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", "utf-8")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 30,
              "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
              **specials}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", "utf-8")
    return out


def load_tokenizer(spec: str | Path | None) -> Tokenizer:
    """``"byte"`` (or None) -> :class:`ByteTokenizer`; a ``.model`` file -> sentencepiece; a
    ``.json`` file -> HF ``tokenizers``; a folder -> its ``tokenizer.json`` (else its
    ``tokenizer.model``). Raises ``DataError`` with one line for anything else."""
    if spec is None or str(spec) == BYTE:
        return ByteTokenizer()
    path = Path(str(spec)).expanduser()
    if path.is_dir():
        for name, cls in (("tokenizer.json", HFTokenizer), ("tokenizer.model", SentencePieceTokenizer)):
            if (path / name).is_file():
                return cls(path / name)
        raise DataError(f"data.tokenizer={spec!r}: the folder holds neither tokenizer.json nor "
                        "tokenizer.model")
    if not path.is_file():
        raise DataError(f"data.tokenizer={spec!r} is not 'byte', an existing tokenizer.json, a "
                        "sentencepiece .model, or a folder holding one (train one with: tfm-jax "
                        f"tokenizer train --vocab-size N --out {spec})")
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    if path.suffix == ".json":
        return HFTokenizer(path)
    raise DataError(f"data.tokenizer={spec!r}: expected a tokenizer.json (Hugging Face "
                    "tokenizers) or a .model (sentencepiece)")


def copy_into(tok: Tokenizer, run_dir: str | Path) -> Path | None:
    """Stores ``tok`` under ``<run_dir>/tokenizer`` (nothing for the byte tokenizer); returns the
    folder or None. Replaces an older copy."""
    if isinstance(tok, ByteTokenizer):
        return None
    out = Path(run_dir) / "tokenizer"
    if out.exists():
        shutil.rmtree(out)
    return tok.save(out)


def run_tokenizer(run_dir: str | Path, spec: str | None) -> Tokenizer:
    """The tokenizer a run was trained with: its stored copy if it has one, else ``spec``."""
    stored = Path(run_dir) / "tokenizer"
    if spec not in (None, BYTE, "none") and stored.is_dir():
        return load_tokenizer(stored)
    return load_tokenizer(None if spec == "none" else spec)


def train_bpe(texts: Iterable[str], vocab_size: int, out: str | Path) -> HFTokenizer:
    """Trains a byte-level BPE (GPT-2 style pre-tokenization, the 256 byte symbols in the
    alphabet, specials ``<s> </s> <pad>``) on ``texts`` and saves it to ``out``; offline."""
    from tokenizers import Tokenizer as _HF, decoders, models, pre_tokenizers, trainers

    specials = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN]
    if vocab_size < 256 + len(specials):
        raise DataError(f"--vocab-size {vocab_size} is below the {256 + len(specials)} ids a "
                        "byte-level BPE starts from (256 bytes + 3 specials)")
    tok = _HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    save_hf_folder(tok, out, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
    return HFTokenizer(Path(out) / "tokenizer.json")


@functools.lru_cache(maxsize=16)
def _vocab_size_of(spec: str, stamp: tuple) -> int:
    return load_tokenizer(spec).vocab_size


def cached_vocab_size(spec: str) -> int:
    """``load_tokenizer(spec).vocab_size``, cached while the file (folder) is unchanged: config
    validation checks ``model.vocab_size`` against it on every ``Config.replace``."""
    path = Path(spec).expanduser()
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    return _vocab_size_of(spec, tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size)
                                      for f in files if f.is_file()))


def auto_vocab_size(tok: Tokenizer, multiple: int = 128) -> int:
    """``model.vocab_size: auto``: the tokenizer's size rounded up to a multiple of 128."""
    return -(-tok.vocab_size // multiple) * multiple
