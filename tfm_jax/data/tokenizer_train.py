"""``tfm-jax tokenizer train``: a byte-level BPE trained on the documents of ``data.*``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

from tfm_jax.core.errors import DataError
from tfm_jax.data import corpus_for
from tfm_jax.data.tokenizer import ByteTokenizer, train_bpe


class _Texts:
    """The train split's documents as text, read from the byte-tokenized cache (its byte ids
    decode back to the exact text); counts the bytes it handed out."""

    def __init__(self, data_cfg) -> None:
        self.data_cfg, self.bytes = data_cfg, 0

    def __iter__(self) -> Iterator[str]:
        corpus = corpus_for(self.data_cfg, ByteTokenizer())
        tok = ByteTokenizer()
        starts = list(map(int, corpus.train_doc_starts)) + [corpus.num_train_tokens]
        for a, b in zip(starts[:-1], starts[1:]):
            text = tok.decode(corpus.train[a:b])
            self.bytes += len(text.encode("utf-8"))
            yield text


def train_from_config(data_cfg, vocab_size: int, out: str) -> str:
    """Trains on the train split of ``data_cfg``'s source (the byte-tokenized cache, so the same
    documents a run trains on) and writes ``out``; returns a one-line summary."""
    if Path(out).exists() and any(Path(out).iterdir()):
        raise DataError(f"--out {out} exists and is not empty; choose a new folder")
    texts = _Texts(data_cfg)
    t0 = time.perf_counter()
    tok = train_bpe(texts, vocab_size, out)
    seconds = time.perf_counter() - t0
    return (f"tokenizer: byte-level BPE, {tok.vocab_size} tokens (bos {tok.bos_id}, eos "
            f"{tok.eos_id}, pad {tok.pad_id}), trained on {texts.bytes / 1e6:,.2f} MB in "
            f"{seconds:.1f} s -> {out} (use data.tokenizer={out} model.vocab_size=auto)")

