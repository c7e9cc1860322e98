"""A trained run opened for use from Python: :class:`Run` (logits, generation, evaluation) and
:func:`open_run`, the read-only restore that ``tfm-jax eval`` and ``tfm-jax generate`` use too.

The public names are re-exported by :mod:`tfm_jax.api` (``tfm_jax.load_run``); this module
sits with the tools so that adapters such as :mod:`tfm_jax.tools.lm_eval` can build on it.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Optional, Sequence, Union

import jax
import numpy as np

from tfm_jax import data as data_lib
from tfm_jax.config import Config, ConfigError
from tfm_jax.core import rundir
from tfm_jax.train import Setup, TrainState, build, eval_positions, eval_span, evaluate

Prompts = Union[str, Sequence[str], Sequence[int], Sequence[Sequence[int]]]


def run_config(run_dir: str | pathlib.Path, overrides: Sequence[str] = ()) -> Config:
    """A run directory's saved config (its own copy of the tokenizer, ``run.dir`` = the run),
    with ``overrides``. Refuses a folder with links inside or without ``config.yaml``."""
    from tfm_jax.tools.convert import load_run_config

    rundir.check_run_dir(run_dir)          # a received run: no links inside
    return load_run_config(run_dir, list(overrides))


def restore(cfg: Config, calib_batches: int = 16,
            step: Optional[int] = None) -> tuple[Setup, TrainState]:
    """(setup, state) of the run at ``cfg.run_dir``, read-only: checkpoint ``step`` or the
    newest intact one (a damaged newer step is skipped with one line); quantized runs and
    recipe changes (e.g. FP8 inference of an fp32 run) go through their own restores."""
    from tfm_jax.platform import backends
    from tfm_jax.tools import calibrate
    from tfm_jax.tools.quantize import is_quantized_run, restore_quantized
    from tfm_jax.train.checkpoint import Checkpointer

    if step is not None and (is_quantized_run(cfg) or calibrate.needs_recipe_change(cfg)):
        raise ConfigError("--step picks a checkpoint of a trained run; a quantized or "
                          "recalibrated run is read from its newest checkpoint")
    if is_quantized_run(cfg):      # written by `tfm-jax quantize`: int8/int4 kernels, dequantized
        return restore_quantized(cfg)
    if calibrate.needs_recipe_change(cfg):   # e.g. FP8 inference of an fp32-trained run
        return calibrate.restore_with_recipe(cfg, calib_batches=calib_batches)
    backends.configure(cfg.backend)
    setup = build(cfg)
    ckpt = Checkpointer(cfg.run_dir / "checkpoints", read_only=True)
    try:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint under {cfg.run_dir / 'checkpoints'}; train "
                                    "first ('tfm-jax train') or pass --run-dir of a trained "
                                    "run")
        state = setup.restore(ckpt, step=step, optimizer=False)   # reading needs no optimizer
    finally:
        ckpt.close()
    return setup, state


def open_run(run_dir: str | pathlib.Path, *, step: Optional[int] = None,
             overrides: Sequence[str] = ()) -> "Run":
    """The run at ``run_dir`` (checkpoint ``step``, default the newest intact one)."""
    cfg = run_config(run_dir, overrides)
    setup, state = restore(cfg, step=step)
    tok = data_lib.run_tokenizer(cfg.run_dir, cfg.data.tokenizer)
    return Run(setup, state, tok)


def _documents(path: pathlib.Path, text_field: str) -> list[str]:
    """The documents of an evaluation file: one per line of a ``.jsonl`` file (its
    ``text_field``), else the whole text file."""
    from tfm_jax.data import sources

    if not path.is_file():
        raise FileNotFoundError(f"evaluate: {path}: no such file")
    if path.suffix == ".jsonl":
        return [text for _, text in sources.jsonl_documents(path, path.name, text_field)]
    return [path.read_text(encoding="utf-8", errors="replace")]


class Run:
    """A trained model with its config and tokenizer. Get one from :func:`tfm_jax.load_run`,
    :func:`tfm_jax.train` or :func:`tfm_jax.import_hf`.

    Attributes:
      config: the run's :class:`~tfm_jax.config.Config` (``config.run_dir``: its directory).
      params: the parameter tree (jax arrays, sharded over the run's mesh).
      tokenizer: the run's tokenizer (``encode``/``decode``, ``eos_id``, ``vocab_size``).
      step: the checkpoint's optimizer step.
    """

    def __init__(self, setup: Setup, state: Optional[TrainState], tokenizer: Any, *,
                 params: Any = None, model_state: Any = None):
        self.setup = setup
        self._state = state
        self.params = state.params if state is not None else params
        self.model_state = (state.model_state if state is not None else model_state) or {}
        self.tokenizer = tokenizer
        self._forward = None
        self._decoders: dict[tuple[int, int], Any] = {}    # (batch, max_len) -> Decoder

    # ------------------------------------------------------------------ basics

    @property
    def config(self) -> Config:
        return self.setup.cfg

    @property
    def step(self) -> int:
        return int(self._state.step) if self._state is not None else 0

    @property
    def variables(self) -> dict:
        return {"params": self.params, **self.model_state}

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS added)."""
        return [int(i) for i in self.tokenizer.encode(text)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def __repr__(self) -> str:
        m = self.config.model
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params))
        return (f"Run({str(self.config.run_dir)!r}, step={self.step}, params={n:,}, "
                f"d_model={m.d_model}, n_layers={m.n_layers}, heads={m.n_heads}/"
                f"{m.n_kv_heads} kv, vocab={m.vocab_size}, tokenizer={self.tokenizer.name})")

    def _batch_shards(self) -> int:
        return self.setup.mesh.shape["data"] * self.setup.mesh.shape["fsdp"]

    # ------------------------------------------------------------------ logits

    def logits(self, ids: Any) -> np.ndarray:
        """ids (B, T) int -> logits (B, T, V) float32 of the full causal forward (position t
        predicts token t + 1). Compiled once per shape. Padding is the caller's: every row is
        read as ``T`` real tokens."""
        ids = np.asarray(ids)
        if ids.ndim != 2 or ids.shape[1] < 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ConfigError(f"logits: ids must be an integer array (B, T), got "
                              f"{ids.dtype} {ids.shape}")
        vocab = self.config.model.vocab_size
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            raise ConfigError(f"logits: token ids must lie in [0, {vocab}), got "
                              f"[{ids.min()}, {ids.max()}]")
        if self._forward is None:
            model = self.setup.model
            self._forward = jax.jit(lambda v, t: model.apply(v, t, train=False))
        b, shards = ids.shape[0], self._batch_shards()
        rows = -(-b // shards) * shards                  # rows split evenly over batch shards
        padded = np.zeros((rows, ids.shape[1]), np.int32)
        padded[:b] = ids
        with self.setup.context():
            out = self._forward(self.variables, padded)
        return np.asarray(jax.device_get(out), np.float32)[:b]

    # ------------------------------------------------------------------ generate

    def generate(self, prompts: Prompts, *, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                 stop: Optional[Sequence[str] | str] = None) -> Union[str, list[str]]:
        """Completions (text after the prompt) of one prompt (str -> str) or several (list ->
        list, generated as one batch). Text prompts get the EOS "document start" context as
        ``tfm-jax generate`` gives them; token-id prompts (a list of ints, or a list of such
        lists) are used as they are. Generation ends at EOS or ``max_new_tokens``; each
        completion is then cut before the first of the ``stop`` strings. Default greedy
        (``temperature=0``), through the KV cache (:func:`tfm_jax.generate.generate`)."""
        from tfm_jax.generate import generate, make_decoder

        single = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], int))
        items = [prompts] if single else list(prompts)
        if not items:
            return []
        if max_new_tokens < 1:
            raise ConfigError(f"generate: max_new_tokens={max_new_tokens}; generate at least 1")
        tok = self.tokenizer
        ids = [[tok.eos_id] + self.encode(p) if isinstance(p, str) else [int(i) for i in p]
               for p in items]
        shards = self._batch_shards()
        batch = -(-len(ids) // shards) * shards
        q = self.config.quant
        key = (batch, max(map(len, ids)) + max_new_tokens - 1)
        if key not in self._decoders:
            self._decoders[key] = make_decoder(self.setup.model, batch=key[0], max_len=key[1],
                                               kv_cache=q.kv_cache, kv_scale=q.kv_scale)
        decoder = self._decoders[key]
        with self.setup.context():
            try:
                g = generate(decoder, self.variables, ids, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_k=top_k, top_p=top_p,
                             stop_ids=[tok.eos_id], seed=seed)
            except ValueError as err:        # bad sampling settings or an empty prompt
                raise ConfigError(str(err)) from None
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        out = []
        for prompt, new in zip(ids, g.tokens):
            whole, head = tok.decode(prompt + list(new)), tok.decode(prompt)
            text = whole[len(head):] if whole.startswith(head) else tok.decode(list(new))
            cut = min((text.find(s) for s in stops if s and s in text), default=len(text))
            out.append(text[:cut])
        return out[0] if single else out

    # ------------------------------------------------------------------ evaluate

    def _train_state(self) -> TrainState:
        """A state for the eval step, which reads no optimizer state (a run opened without a
        checkpointed state, e.g. imported in memory: step 0, these parameters)."""
        if self._state is None:
            import jax.numpy as jnp

            self._state = TrainState(jnp.zeros((), jnp.int32), self.params, self.model_state,
                                     None)
        return self._state

    def evaluate(self, data: Optional[str | pathlib.Path] = None, *,
                 batches: Optional[int] = None,
                 allow_corpus_change: bool = False) -> dict[str, float]:
        """Mean next-token loss (nats/token), perplexity and bits per UTF-8 byte, as
        ``tfm-jax eval`` computes them: ``data`` None: the run's validation split; a path: that
        text file (one document) or ``.jsonl`` file (one document per line, its
        ``data.text_field``), tokenized with the run's tokenizer, every document followed by
        EOS. ``batches``: evaluation batches of ``train.batch_size`` windows of
        ``data.seq_len`` tokens (default ``train.eval_batches``). With ``data`` None the
        validation split must be the corpus the run recorded (``corpus.json``), as for ``tfm-jax
        eval``: a different one raises ``DataError`` naming both unless
        ``allow_corpus_change``; the result then carries ``corpus_digest``."""
        cfg = self.config
        if batches is not None:
            if batches < 1:
                raise ConfigError(f"evaluate: batches={batches}; evaluate at least 1 batch")
            cfg = cfg.replace(**{"train.eval_batches": batches})
        setup = dataclasses.replace(self.setup, cfg=cfg)
        if data is None:
            corpus = data_lib.corpus_for(cfg.data, self.tokenizer)
            data_lib.check_fingerprint(data_lib.run_corpus(cfg.run_dir), corpus.fingerprint,
                                       what="evaluate", allow=allow_corpus_change,
                                       flag="allow_corpus_change=True")
            stream = corpus.val
            n_bytes = lambda pos: corpus.bytes_of(pos)              # noqa: E731
        else:
            ids, nbytes = [], []
            for text in _documents(pathlib.Path(data), cfg.data.text_field):
                t, b = self.tokenizer.token_bytes(text)
                ids += [np.asarray(t, np.int64), [self.tokenizer.eos_id]]
                nbytes += [np.asarray(b, np.int64), [0]]
            stream = np.concatenate(ids) if ids else np.zeros(0, np.int64)
            per_token = np.concatenate(nbytes) if nbytes else np.zeros(0, np.int64)
            n_bytes = lambda pos: int(per_token[pos].sum())        # noqa: E731
        row = evaluate(setup, self._train_state(), stream)
        loss = row["val_loss"]
        out = {"loss": loss, "perplexity": row["val_ppl"],
               "bits_per_byte": data_lib.bits_per_byte(loss, row["val_tokens"],
                                                       n_bytes(eval_positions(cfg, stream))),
               "tokens": row["val_tokens"], "step": self.step}
        if data is None:
            out["corpus_digest"] = corpus.digest
        return out

    def unigram_baseline(self) -> float:
        """The unigram entropy of the evaluated validation tokens (nats/token), as reported by
        ``tfm-jax eval``."""
        cfg = self.config
        corpus = data_lib.corpus_for(cfg.data, self.tokenizer)
        return data_lib.unigram_entropy(corpus.train, eval_span(cfg, corpus.val),
                                        vocab_size=self.tokenizer.vocab_size)

