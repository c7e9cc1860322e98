"""Autoregressive generation with a KV cache: prefill / decode, batched sampling, and a
teacher-forced evaluation through the cache.

* :func:`make_decoder` -> :class:`Decoder`: jitted ``init_cache`` / ``prefill`` / ``step`` for
  one (model, batch, max_len, cache format), the cache donated to each call. Prefill runs the
  causal forward over a right-padded prompt batch and writes K/V; a step feeds one token per row
  at the row's own position (no re-padding, no window: positions keep growing).
* :func:`generate`: batched generation -- greedy / temperature / top-k / top-p, stop ids (a row
  that emits one stops growing), a maximum of new tokens -- as one prefill plus one compiled
  ``lax.while_loop`` over decode steps for the whole generation; reports prefill seconds and
  decode tokens/s.
* :func:`sample_logits`: the sampler, one row of logits per sequence.
* :func:`eval_through_cache`: mean NLL of token windows decoded through the cache, feeding the
  true next token (teacher forcing), so a quantized cache's error accumulates as in real decoding.
* :func:`generate_text`: one prompt string -> text (the training run's end-of-run sample).

The cache itself (containers, quantization, sharding) is :mod:`tfm_jax.layers.kv_cache`.
Under a mesh, call these inside ``Setup.context()``: the cache is then sharded by the logical
rule table (``cache_batch`` -> the batch axes; a saved config whose ``mesh.rules`` predate the
cache names gets the defaults for those names).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from tfm_jax.config import DEFAULT_RULES
from tfm_jax.data import ByteTokenizer, Tokenizer
from tfm_jax.layers import kv_cache as kv
from tfm_jax.layers.kv_cache import Cache, bytes_of_cache
from tfm_jax.parallel import axes
from tfm_jax.parallel.mesh import rules_tuple

PAD_OUT = -1     # token id in generate's raw output for rows that had already finished

__all__ = ["Cache", "Decoder", "Generation", "bytes_of_cache", "decode_speed",
           "eval_through_cache", "generate",
           "generate_text", "make_decoder", "sample_logits"]


# --------------------------------------------------------------------------------------------
# Sampling.


def _check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    if temperature < 0 or top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"sampling needs temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got "
                         f"temperature={temperature}, top_k={top_k}, top_p={top_p}")


def sample_logits(logits: jax.Array, rng: jax.Array, temperature: float, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
    """logits (B, V) -> token ids (B,) int32.

    ``temperature`` 0: greedy (argmax; top-k/top-p irrelevant). Otherwise sample
    softmax(logits / T) restricted to the ``top_k`` largest logits (0: all), then to the nucleus
    (``top_p`` < 1): the smallest set of most probable tokens whose mass reaches ``top_p`` (the
    token that crosses it included), renormalised.
    """
    _check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        desc = -jnp.sort(-logits, axis=-1)                                    # (B, V) descending
        probs = jax.nn.softmax(desc, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs      # mass of the more probable tokens
        cutoff = jnp.min(jnp.where(before < top_p, desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


# --------------------------------------------------------------------------------------------
# The decoder: jitted prefill / step over an explicit cache.


@contextlib.contextmanager
def _cache_rules() -> Iterator[None]:
    """Inside an active rule table that lacks the cache's logical names (a run saved before
    they existed), add their default rules; otherwise change nothing."""
    rules = tuple(nn.get_logical_axis_rules())
    have = {name for name, _ in rules}
    missing = [(n, m) for n, m in rules_tuple(DEFAULT_RULES)
               if n in (axes.CACHE_BATCH, axes.CACHE_LENGTH) and n not in have]
    if rules and missing:
        with nn.logical_axis_rules(rules + tuple(missing)):
            yield
    else:
        yield


def _constrain_cache(cache: Cache) -> Cache:
    return kv.constrain(cache, kv.logical_axes(cache))


@dataclasses.dataclass(frozen=True, eq=False)
class Decoder:
    """Jitted KV-cache inference for one model, batch size, ``max_len`` and cache format
    (built by :func:`make_decoder`; holds no parameters). Every call donates its cache: use
    the returned one. ``traces`` counts how often each function was traced (compiled)."""

    model: Any
    batch: int
    max_len: int
    kv_cache: str
    kv_scale: str
    traces: collections.Counter
    _init: Callable = dataclasses.field(repr=False)
    _prefill: Callable = dataclasses.field(repr=False)
    _step: Callable = dataclasses.field(repr=False)
    _start: Callable = dataclasses.field(repr=False)
    _loop: Callable = dataclasses.field(repr=False)

    def init_cache(self) -> Cache:
        """An empty cache (zeros, lengths 0) of ``batch`` rows and ``max_len`` positions."""
        return self._init()

    def prefill(self, variables: Any, cache: Cache, tokens: jax.Array,
                lengths: jax.Array) -> tuple[jax.Array, Cache]:
        """tokens (B, P) int32, right-padded, lengths (B,) int32 (1 <= length <= P) ->
        (logits at each row's last prompt token (B, V) float32, the cache holding K/V of
        positions [0, length) of each row, ``lengths`` set). Writes from position 0: a prefill
        starts a new sequence in every row."""
        tokens = jnp.asarray(tokens, jnp.int32)
        lengths = jnp.asarray(lengths, jnp.int32)
        if tokens.ndim != 2 or tokens.shape[0] != self.batch or lengths.shape != (self.batch,):
            raise ValueError(f"prefill: tokens must be ({self.batch}, P) and lengths "
                             f"({self.batch},), got {tokens.shape} and {lengths.shape}")
        if tokens.shape[1] > self.max_len:
            raise ValueError(f"prefill: {tokens.shape[1]} prompt positions exceed the cache's "
                             f"max_len={self.max_len}; build the decoder with a larger max_len")
        try:
            host = np.asarray(lengths)              # checked when concrete (not under a jit)
        except jax.errors.TracerArrayConversionError:
            host = None
        if host is not None:
            lo, hi = int(host.min()), int(host.max())
            if lo < 1 or hi > tokens.shape[1]:
                raise ValueError(f"prefill: lengths must lie in [1, {tokens.shape[1]}] (the "
                                 f"prompt width), got min {lo}, max {hi}")
        return self._prefill(variables, cache, tokens, lengths)

    def step(self, variables: Any, cache: Cache, tokens: jax.Array) -> tuple[jax.Array, Cache]:
        """tokens (B,) int32, one per row at position ``lengths[b]`` -> (logits (B, V) float32,
        the cache with their K/V written and ``lengths + 1``).

        A row whose cache is full (``lengths[b] == max_len``) raises ``ValueError`` instead of
        overwriting the last slot: checked on the host (one small read of ``lengths``), or --
        when ``step`` is traced inside the caller's ``jax.jit`` -- by a host callback that fails
        the jitted call with the same message."""
        tokens = jnp.asarray(tokens, jnp.int32)
        if tokens.shape != (self.batch,):
            raise ValueError(f"step: tokens must be ({self.batch},), got {tokens.shape}")
        try:
            host = np.asarray(cache.lengths)
        except jax.errors.TracerArrayConversionError:       # inside the caller's jit
            jax.debug.callback(functools.partial(_check_room, max_len=self.max_len),
                               cache.lengths)
        else:
            _check_room(host, max_len=self.max_len)
        return self._step(variables, cache, tokens)


def _check_room(lengths, *, max_len: int) -> None:
    """Raise when a row of the cache has no free position for one more token."""
    lengths = np.asarray(lengths)
    full = np.flatnonzero(lengths >= max_len)
    if full.size:
        raise ValueError(f"step: row {int(full[0])} already holds {int(lengths[full[0]])} "
                         f"positions, the cache's max_len={max_len}; one more would overwrite "
                         f"its last slot. Build the decoder with a larger max_len, or start the "
                         f"row again with prefill")


def make_decoder(model: Any, *, batch: int, max_len: int, kv_cache: str = "none",
                 kv_scale: str = "per_token_head") -> Decoder:
    """A :class:`Decoder` for ``model`` (a :class:`tfm_jax.model.TransformerLM`) with a cache of
    ``batch`` rows x ``max_len`` positions stored as ``kv_cache`` (none | int8 | fp8) with
    ``kv_scale`` scales (per_token_head | per_token; quantized caches only)."""
    if kv_cache not in kv.KV_FORMATS:
        raise ValueError(f"kv_cache={kv_cache!r}: choose one of {list(kv.KV_FORMATS)}")
    if kv_scale not in kv.KV_SCALES:
        raise ValueError(f"kv_scale={kv_scale!r}: choose one of {list(kv.KV_SCALES)}")
    if batch < 1 or max_len < 1:
        raise ValueError(f"make_decoder: batch and max_len must be >= 1, got {batch}, {max_len}")
    traces: collections.Counter = collections.Counter()

    def init():
        traces["init"] += 1
        with _cache_rules():
            return _constrain_cache(model.init_cache(batch, max_len, kv_cache=kv_cache,
                                                     kv_scale=kv_scale))

    def prefill(variables, cache, tokens, lengths):
        traces["prefill"] += 1
        with _cache_rules():
            mask = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]      # (B, P)
            logits, cache = model.apply(variables, tokens, token_mask=mask, cache=cache)
            last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
            return last, _constrain_cache(cache)

    def decode(variables, cache, tokens):
        logits, cache = model.apply(variables, tokens[:, None], cache=cache, decode=True)
        return logits[:, 0], _constrain_cache(cache)

    def step(variables, cache, tokens):
        traces["step"] += 1
        with _cache_rules():
            return decode(variables, cache, tokens)

    def sample(logits, rng, stop_ids, *, temperature, top_k, top_p):
        tok = sample_logits(logits, rng, temperature, top_k, top_p)
        return tok, jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)

    def start(variables, cache, tokens, lengths, idle, rng, stop_ids, *, temperature, top_k,
              top_p):
        """generate's prefill: the cache and the first sampled token of every row; rows that
        sampled a stop id (or are idle padding rows) are done."""
        traces["start"] += 1
        with _cache_rules():
            mask = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]      # (B, P)
            logits, cache = model.apply(variables, tokens, token_mask=mask, cache=cache)
            last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
            tok, stop = sample(last, rng, stop_ids, temperature=temperature, top_k=top_k,
                               top_p=top_p)
            return tok, stop | idle, _constrain_cache(cache)

    def loop(variables, cache, tok, done, rng, stop_ids, *, n_steps, temperature, top_k,
             top_p):
        """``n_steps`` decode steps (fewer once every row is done) in one while loop: feed
        ``tok``, sample the next. Finished rows keep their length and record PAD_OUT."""
        traces["loop"] += 1
        out = jnp.full((batch, n_steps), PAD_OUT, jnp.int32)

        def cond(c):
            return (c[0] < n_steps) & ~jnp.all(c[3])

        def body(c):
            i, cache, tok, done, rng, out = c
            logits, new = decode(variables, cache, tok)
            new = new.replace(lengths=jnp.where(done, cache.lengths, new.lengths))
            rng, sub = jax.random.split(rng)
            nxt, stop = sample(logits, sub, stop_ids, temperature=temperature, top_k=top_k,
                               top_p=top_p)
            out = jax.lax.dynamic_update_slice_in_dim(
                out, jnp.where(done, PAD_OUT, nxt)[:, None], i, axis=1)
            return i + 1, new, jnp.where(done, tok, nxt), done | stop, rng, out

        with _cache_rules():
            n, cache, _, done, _, out = jax.lax.while_loop(
                cond, body, (jnp.int32(0), cache, tok, done, rng, out))
            return out, n, _constrain_cache(cache), done

    sampling = ("temperature", "top_k", "top_p")
    return Decoder(model, batch, max_len, kv_cache, kv_scale, traces,
                   jax.jit(init), jax.jit(prefill, donate_argnums=1),
                   jax.jit(step, donate_argnums=1),
                   jax.jit(start, donate_argnums=1, static_argnames=sampling),
                   jax.jit(loop, donate_argnums=1, static_argnames=("n_steps",) + sampling))


# --------------------------------------------------------------------------------------------
# Batched generation.


@dataclasses.dataclass
class Generation:
    """What :func:`generate` returns. ``tokens[i]``: the new ids of prompt i (a stop id that
    ended the row is not included; ``stopped[i]`` says whether one did). Times exclude
    compilation (``compile_s``); decode tokens/s counts the tokens the decode steps produced
    for rows still generating (the first new token comes from the prefill)."""

    tokens: list[np.ndarray]
    stopped: np.ndarray
    prompt_lengths: np.ndarray
    prefill_s: float
    decode_s: float
    decode_steps: int
    decode_tokens: int
    compile_s: float
    cache: Cache

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")


def generate(decoder: Decoder, variables: Any, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             stop_ids: Sequence[int] = (), seed: int = 0) -> Generation:
    """Generate up to ``max_new_tokens`` ids after each prompt (lists of ids, of different
    lengths; at most ``decoder.batch`` of them, one row each -- unused rows idle).

    One right-padded prefill, the first token sampled from its logits, then one compiled
    ``while_loop`` of decode steps, each row at its own position, until every row emitted a
    stop id or ``max_new_tokens`` are reached. Needs ``longest prompt + max_new_tokens - 1
    <= decoder.max_len`` (the last sampled token is not fed back). Compilation happens before
    the timed calls (``compile_s``).
    """
    n = len(prompts)
    lens = np.array([len(p) for p in prompts], np.int32)
    if n == 0 or n > decoder.batch:
        raise ValueError(f"generate: {n} prompts for a decoder of batch {decoder.batch}; give "
                         f"1..{decoder.batch} prompts or build the decoder with batch={n}")
    if lens.min() < 1:
        raise ValueError(f"generate: prompt {int(np.argmin(lens))} is empty; every prompt "
                         "needs at least one token (e.g. BOS/EOS)")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    need = int(lens.max()) + max_new_tokens - 1
    if need > decoder.max_len:
        raise ValueError(f"generate: the longest prompt ({lens.max()} tokens) + max_new_tokens "
                         f"({max_new_tokens}) - 1 = {need} positions exceed the cache's "
                         f"max_len={decoder.max_len}; build the decoder with max_len >= {need}")
    sampling = dict(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
    _check_sampling(**sampling)

    b = decoder.batch
    tokens = np.zeros((b, int(lens.max())), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :lens[i]] = np.asarray(p, np.int32)
    lengths = np.ones((b,), np.int32)
    lengths[:n] = lens
    idle = jnp.asarray(np.arange(b) >= n)                       # padding rows: done from the start
    stops = jnp.asarray(np.asarray(list(stop_ids), np.int32).reshape(-1))
    rng_first, rng_loop = jax.random.split(jax.random.key(seed))
    tokens, lengths = jnp.asarray(tokens), jnp.asarray(lengths)
    n_steps = max_new_tokens - 1

    # Compile first (traced against abstract values), so the timed calls run compiled code only.
    t0 = time.perf_counter()
    cache = decoder.init_cache()
    decoder._start.lower(variables, cache, tokens, lengths, idle, rng_first, stops,
                         **sampling).compile()
    if n_steps:
        decoder._loop.lower(variables, cache, jnp.zeros((b,), jnp.int32), idle, rng_loop,
                            stops, n_steps=n_steps, **sampling).compile()
    compile_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    first, done, cache = decoder._start(variables, cache, tokens, lengths, idle, rng_first,
                                        stops, **sampling)
    first.block_until_ready()
    prefill_s = time.perf_counter() - t0

    out, steps, decode_s = np.zeros((b, 0), np.int32), 0, 0.0
    if n_steps:
        t0 = time.perf_counter()
        out, steps, cache, done = decoder._loop(variables, cache, first, done, rng_loop, stops,
                                                n_steps=n_steps, **sampling)
        out = np.asarray(out)
        decode_s = time.perf_counter() - t0
        steps = int(steps)
    raw = np.concatenate([np.asarray(first)[:, None], out], axis=1)[:n]   # (n, max_new)
    stop_set = set(int(s) for s in np.asarray(stops))
    new, stopped = [], np.zeros(n, bool)
    for i, row in enumerate(raw):
        ids = []
        for t in row:
            if t == PAD_OUT:
                break
            if int(t) in stop_set:
                stopped[i] = True
                break
            ids.append(int(t))
        new.append(np.asarray(ids, np.int32))
    decode_tokens = int((out[:n] != PAD_OUT).sum())
    return Generation(new, stopped, lens, prefill_s, decode_s, steps, decode_tokens, compile_s,
                      cache)


def decode_speed(model: Any, variables: Any, *, batch: int, context: int, new_tokens: int,
                 kv_cache: str = "none", kv_scale: str = "per_token_head", seed: int = 0,
                 per_step: bool = False) -> dict[str, Any]:
    """Greedy decode speed after random prompts of ``context`` tokens in ``batch`` rows.

    ``tokens_per_s``: :func:`generate`'s compiled decode loop (what ``tfm-jax generate`` runs),
    ``batch x (new_tokens - 1)`` tokens over the decode seconds; prefill and compilation are
    excluded (reported as ``prefill_s``, ``compile_s``). With ``per_step``, also
    ``per_step_tokens_per_s``: the same decode driven from Python one :meth:`Decoder.step` (plus
    a jitted argmax) per token, i.e. with a host round trip per token, as an eager framework
    decodes. ``ids`` (batch, new_tokens): the greedy ids of the loop. Used by
    ``benchmarks/decode.py`` and the ablation runner's ``decode`` measurement."""
    if context < 1 or new_tokens < 2:
        raise ValueError(f"decode_speed: context >= 1 and new_tokens >= 2 needed, got "
                         f"{context}, {new_tokens}")
    vocab = model.cfg.vocab_size
    prompts = np.random.default_rng(seed).integers(0, vocab, (batch, context), dtype=np.int32)
    dec = make_decoder(model, batch=batch, max_len=context + new_tokens, kv_cache=kv_cache,
                       kv_scale=kv_scale)
    g = generate(dec, variables, list(prompts), max_new_tokens=new_tokens)
    out: dict[str, Any] = {
        "tokens_per_s": g.decode_tokens_per_s, "step_ms": 1e3 * g.decode_s / g.decode_steps,
        "prefill_s": g.prefill_s, "compile_s": g.compile_s,
        "cache_bytes": int(bytes_of_cache(g.cache)), "ids": np.stack(g.tokens)}
    if per_step:
        greedy = jax.jit(lambda logits: jnp.argmax(logits, axis=-1).astype(jnp.int32))
        lengths = jnp.full((batch,), context, jnp.int32)
        times = []
        for timed in (False, True):        # the first pass compiles prefill, step and argmax
            cache = dec.init_cache()
            logits, cache = dec.prefill(variables, cache, prompts, lengths)
            tok = greedy(logits).block_until_ready()
            for _ in range(new_tokens - 1):
                t0 = time.perf_counter()
                logits, cache = dec.step(variables, cache, tok)
                tok = greedy(logits).block_until_ready()
                if timed:
                    times.append(time.perf_counter() - t0)
        out["per_step_tokens_per_s"] = batch * len(times) / sum(times)
        out["per_step_ms"] = 1e3 * float(np.median(times))
    return out


# --------------------------------------------------------------------------------------------
# Teacher-forced evaluation through the cache.


@functools.lru_cache(maxsize=32)
def _eval_fn(model: Any, batch: int, length: int, kv_cache: str, kv_scale: str,
             prefill_len: int) -> Callable:
    def run(variables, tokens):
        with _cache_rules():
            cache = model.init_cache(batch, length, kv_cache=kv_cache, kv_scale=kv_scale)
            logits, cache = model.apply(variables, tokens[:, :prefill_len], cache=cache)
            nll = optax.softmax_cross_entropy_with_integer_labels(
                logits, tokens[:, 1:prefill_len + 1]).sum()

            def body(cache, xs):
                tok, target = xs
                logits, cache = model.apply(variables, tok[:, None], cache=cache, decode=True)
                return cache, optax.softmax_cross_entropy_with_integer_labels(
                    logits[:, 0], target).sum()

            feed = tokens[:, prefill_len:length - 1].T                   # (T-1-p, B)
            target = tokens[:, prefill_len + 1:].T
            _, nlls = jax.lax.scan(body, cache, (feed, target))
            return nll + nlls.sum()
    return jax.jit(run)


def eval_through_cache(model: Any, variables: Any, tokens: jax.Array, *,
                       kv_cache: str = "none", kv_scale: str = "per_token_head",
                       prefill_len: int = 1) -> float:
    """Mean next-token NLL (nats/token) of ``tokens`` (B, T) computed through the KV cache:
    prefill the first ``prefill_len`` tokens, then decode the rest one step at a time feeding
    the *true* next token (teacher forcing). Every one of the T - 1 predictions is scored; with
    a quantized cache the decode steps read quantized K/V, so its error accumulates as in real
    decoding. ``kv_cache="none"`` equals the full forward's loss up to float rounding."""
    tokens = jnp.asarray(tokens, jnp.int32)
    b, t = tokens.shape
    if not 1 <= prefill_len < t:
        raise ValueError(f"eval_through_cache: prefill_len must be in [1, {t - 1}] for windows "
                         f"of {t} tokens, got {prefill_len}")
    total = _eval_fn(model, b, t, kv_cache, kv_scale, prefill_len)(variables, tokens)
    return float(total) / (b * (t - 1))


# --------------------------------------------------------------------------------------------
# Text in, text out.


def generate_text(model: Any, variables: Any, prompt: str, *, max_new_tokens: int,
                  temperature: float = 0.8, top_k: int = 40, top_p: float = 1.0, seed: int = 0,
                  kv_cache: str = "none", kv_scale: str = "per_token_head",
                  window: Optional[int] = None, tokenizer: Optional[Tokenizer] = None) -> str:
    """prompt text -> prompt + up to ``max_new_tokens`` sampled tokens (stops at EOS), through
    the KV cache; ``tokenizer`` default: bytes. ``window`` is accepted for callers of the earlier
    sliding-window sampler and not used: positions keep growing past the training length (RoPE
    extrapolates)."""
    del window
    tok = tokenizer or ByteTokenizer()
    # Packed training streams separate documents with EOS, so EOS is the "document start" context.
    ids = np.concatenate([[tok.eos_id], tok.encode(prompt)]).astype(np.int32)
    if max_new_tokens < 1:
        return tok.decode(ids)
    decoder = make_decoder(model, batch=1, max_len=len(ids) + max_new_tokens,
                           kv_cache=kv_cache, kv_scale=kv_scale)
    g = generate(decoder, variables, [ids], max_new_tokens=max_new_tokens,
                 temperature=temperature, top_k=top_k, top_p=top_p, stop_ids=[tok.eos_id],
                 seed=seed)
    return tok.decode(np.concatenate([ids, g.tokens[0]]))
