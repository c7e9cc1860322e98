"""Continuous batching over a paged KV cache.

A :class:`Scheduler` owns one model's page pools (:mod:`tfm_jax.layers.paged_cache`), a free list
of pages and a fixed number of **slots** -- the rows of the jitted decode batch. Requests
(:meth:`Scheduler.submit`) wait in a FIFO queue, join the batch between steps and leave it as soon
as they finish; nothing recompiles per request, because every compiled shape is fixed by the
scheduler: the decode step is ``(slots, 1)``, the prefill step one sequence of ``chunk`` tokens.

One :meth:`Scheduler.step`:

1. **admission** -- the queue's head gets a free slot when the free pages hold its prefill
   (prompt; after a preemption prompt + generated tokens but the last); pages are taken then;
2. **chunked prefill** -- one ``chunk`` of the oldest request still prefilling is written to its
   pages (right-padded; the padding goes to positions the request does not own yet or to the
   scratch page, and is overwritten before it is ever read as a valid key); when its prefill
   completes, the first token is sampled from the last logits;
3. **decode** -- every slot that is decoding feeds its last token; a request that crosses into a
   new page gets one from the free list. When the list is empty the most recently admitted
   request is **preempted by recompute**: its pages are freed, it goes back to the front of the
   queue keeping its generated tokens, and later re-prefills them (no re-sampling, so its output
   does not change). Idle slots run on the scratch page.

Sampling is per request on the host (:class:`SamplingParams`: temperature, top-k, top-p, a seed of
its own, ``max_tokens``, stop ids and stop strings), so a request's tokens do not depend on which
others share its batch. Under greedy sampling every request gets the tokens it gets decoding
alone (tests check this against :func:`tfm_jax.generate.generate`).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import threading
import time
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from tfm_jax.layers import kv_cache as kv
from tfm_jax.layers import paged_cache as pc
from tfm_jax.model import DTYPES


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling: ``temperature`` 0 is greedy; ``top_k`` 0 keeps every token;
    ``top_p`` 1 keeps the whole distribution (else the nucleus, the token crossing it
    included); ``stop_ids`` end the completion (not included), as do ``stop`` strings (the text
    is cut before the first one; needs the scheduler's ``detokenize``)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    stop_ids: tuple[int, ...] = ()

    def check(self) -> None:
        """ValueError naming the first bad field."""
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One token id from logits (V,) float32 under ``params`` (the semantics of
    :func:`tfm_jax.generate.sample_logits`, in numpy with the request's own generator)."""
    if params.temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / params.temperature
    if params.top_k:
        kth = np.sort(z)[-min(params.top_k, z.size)]
        z = np.where(z < kth, -np.inf, z)
    if params.top_p < 1.0:
        desc = np.sort(z)[::-1]
        p = np.exp(desc - desc[0])
        p /= p.sum()
        before = np.cumsum(p) - p
        cutoff = desc[before < params.top_p].min()
        z = np.where(z < cutoff, -np.inf, z)
    p = np.exp(z - z.max())
    p /= p.sum()
    return int(rng.choice(z.size, p=p))


@dataclasses.dataclass(eq=False)
class Request:
    """One request's state. ``output``: generated ids so far (a stop id not included);
    ``text``: the detokenized completion (cut at a stop string); ``finish_reason``: None while
    running, then ``length`` | ``stop`` | ``cancelled``."""

    id: int
    prompt: list[int]
    params: SamplingParams
    output: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    state: str = "waiting"            # waiting | prefill | decode | done
    finish_reason: Optional[str] = None
    slot: Optional[int] = None
    pages: list[int] = dataclasses.field(default_factory=list)
    n_cached: int = 0                 # positions whose K/V are in the pages
    preemptions: int = 0
    submitted_s: float = 0.0
    first_token_s: Optional[float] = None
    finished_s: Optional[float] = None
    rng: Any = None
    on_token: Optional[Callable[["Request"], None]] = None   # called after each new token/finish

    @property
    def done(self) -> bool:
        return self.state == "done"

    def _prefill_target(self) -> int:
        """Positions to prefill: the prompt, or after a preemption every token but the last
        generated one (that one is fed by the next decode step, never re-sampled)."""
        return len(self.prompt) + max(len(self.output) - 1, 0)

    def _tokens(self) -> list[int]:
        return self.prompt + self.output


class Scheduler:
    """Continuous batching for ``model`` (a :class:`tfm_jax.model.TransformerLM`) with
    ``variables``: ``slots`` decode rows, ``num_pages`` pages of ``page_size`` positions (page 0
    is scratch), prefill chunks of ``chunk`` tokens, sequences up to ``max_len`` positions,
    pages stored as ``kv_cache`` (none | int8 | fp8). ``detokenize`` (ids -> str) enables stop
    strings and ``Request.text``. ``static``: the static-batching baseline -- requests join
    only an empty batch, which runs until all of them finish. Not thread-safe by itself: one
    thread calls :meth:`step`;
    :meth:`submit` / :meth:`cancel` may be called from others (they take the lock)."""

    def __init__(self, model: Any, variables: Any, *, slots: int, num_pages: int,
                 max_len: int, page_size: int = 16, chunk: int = 32,
                 kv_cache: str = "none", kv_scale: str = "per_token_head",
                 detokenize: Optional[Callable[[Sequence[int]], str]] = None,
                 static: bool = False):
        cfg = model.cfg
        self.model, self.variables, self.cfg = model, variables, cfg
        self.max_len = int(max_len)
        if slots < 1 or chunk < 1 or page_size < 1:
            raise ValueError(f"slots, chunk and page_size must be >= 1, got {slots}, {chunk}, "
                             f"{page_size}")
        self.slots, self.page_size, self.chunk = slots, page_size, chunk
        self.pages_per_seq = math.ceil(self.max_len / page_size)
        if num_pages - 1 < self.pages_per_seq:
            raise ValueError(f"{num_pages} pages (one is scratch) cannot hold one sequence of "
                             f"max_len={self.max_len} ({self.pages_per_seq} pages of "
                             f"{page_size}); give more pages or a smaller max_len")
        self.num_pages = num_pages
        self.detokenize = detokenize
        self.static = static          # the baseline: admit only into an empty batch
        self.peak_running = 0
        # the pools without block tables (each step brings its batch's): only pages are donated
        self._init_pages = lambda: pc.with_block_table(pc.init_pages(
            n_layers=cfg.n_layers, num_pages=num_pages, page_size=page_size,
            n_kv_heads=cfg.n_kv_heads, head_dim=cfg.resolved_head_dim, dtype=DTYPES[cfg.dtype],
            kv_cache=kv_cache, kv_scale=kv_scale, stacked=cfg.scan_layers), None)
        self.layers = self._init_pages()
        self.free: collections.deque[int] = collections.deque(range(1, num_pages))
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []          # admission order (the last is preempted first)
        self.slot_of: list[Optional[Request]] = [None] * slots
        self.traces: collections.Counter = collections.Counter()
        self.lock = threading.RLock()
        self._ids = itertools.count()
        self.steps = 0
        self.generated = 0                        # tokens sampled, all requests
        self.preemptions = 0
        self.decode_steps = 0
        self.decode_rows = 0                      # sum over decode steps of the rows decoding
        self.finished: collections.Counter = collections.Counter()   # requests by finish reason
        self._decode = jax.jit(self._decode_fn, donate_argnums=(1,))
        self._prefill = jax.jit(self._prefill_fn, donate_argnums=(1,))

    # ---------------------------------------------------------------------------- jitted steps

    def _apply(self, variables, layers, table, lengths, tokens):
        cache = kv.Cache(pc.with_block_table(layers, table), lengths)
        logits, cache = self.model.apply(variables, tokens, cache=cache, decode=True)
        # the pools go back without a table: one pytree structure for both steps
        return logits, pc.with_block_table(cache.layers, None)

    def _decode_fn(self, variables, layers, table, lengths, tokens):
        self.traces["decode"] += 1
        logits, layers = self._apply(variables, layers, table, lengths, tokens)
        return logits[:, 0], layers                                            # (S, V)

    def _prefill_fn(self, variables, layers, table, lengths, tokens, last):
        self.traces["prefill"] += 1
        logits, layers = self._apply(variables, layers, table, lengths, tokens)
        return logits[0, last], layers                                         # (V,)

    # ------------------------------------------------------------------------------ requests

    def submit(self, prompt: Sequence[int], params: SamplingParams = SamplingParams(),
               on_token: Optional[Callable[[Request], None]] = None) -> Request:
        """Queue a request (ValueError naming the problem if it can never run)."""
        params.check()
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("prompt: needs at least one token")
        if min(prompt) < 0 or max(prompt) >= self.cfg.vocab_size:
            raise ValueError(f"prompt: token ids must lie in [0, {self.cfg.vocab_size})")
        if len(prompt) + params.max_tokens - 1 > self.max_len:
            raise ValueError(f"prompt: {len(prompt)} tokens + max_tokens={params.max_tokens} "
                             f"exceed the context of {self.max_len} positions")
        if params.stop and self.detokenize is None:
            raise ValueError("stop: stop strings need a tokenizer")
        req = Request(next(self._ids), prompt, params, submitted_s=time.perf_counter(),
                      rng=np.random.default_rng(params.seed), on_token=on_token)
        with self.lock:
            self.waiting.append(req)
        return req

    def cancel(self, req: Request) -> None:
        """Stop a request now (a disconnected client): its pages and slot are freed."""
        with self.lock:
            if req.done:
                return
            if req in self.waiting:
                self.waiting.remove(req)
            self._finish(req, "cancelled")

    def recover(self, reason: str = "error") -> None:
        """After a failed step: finish every running request with ``reason`` and start from
        fresh page pools (a failed call may have consumed the donated ones); the queue stays."""
        with self.lock:
            for req in list(self.running):
                self._finish(req, reason)
            self.layers = self._init_pages()
            self.free = collections.deque(range(1, self.num_pages))

    @property
    def pages_used(self) -> int:
        return self.num_pages - 1 - len(self.free)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------------------------ internals

    def _release(self, req: Request) -> None:
        self.free.extend(req.pages)
        req.pages = []
        if req.slot is not None:
            self.slot_of[req.slot] = None
            req.slot = None
        if req in self.running:
            self.running.remove(req)

    def _finish(self, req: Request, reason: str) -> None:
        self._release(req)
        req.state, req.finish_reason, req.finished_s = "done", reason, time.perf_counter()
        self.finished[reason] += 1
        if req.on_token is not None:
            req.on_token(req)

    def _preempt(self, req: Request) -> None:
        self._release(req)
        req.state, req.n_cached = "waiting", 0
        req.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(req)

    def _admit(self) -> None:
        if self.static and self.running:
            return
        while self.waiting and None in self.slot_of:
            req = self.waiting[0]
            need = math.ceil(req._prefill_target() / self.page_size)
            if need > len(self.free):
                return
            self.waiting.popleft()
            req.pages = [self.free.popleft() for _ in range(need)]
            req.slot = self.slot_of.index(None)
            self.slot_of[req.slot] = req
            req.state = "prefill"
            self.running.append(req)
            self.peak_running = max(self.peak_running, len(self.running))

    def _table(self, reqs: Sequence[Optional[Request]]) -> np.ndarray:
        table = np.full((len(reqs), self.pages_per_seq), pc.SCRATCH_PAGE, np.int32)
        for i, r in enumerate(reqs):
            if r is not None:
                table[i, :len(r.pages)] = r.pages
        return table

    def _emit(self, req: Request, logits: np.ndarray) -> None:
        """Sample the next token of ``req`` and apply its stop rules."""
        tok = sample(logits, req.params, req.rng)
        self.generated += 1
        if req.first_token_s is None:
            req.first_token_s = time.perf_counter()
        if tok in req.params.stop_ids:
            self._finish(req, "stop")
            return
        req.output.append(tok)
        if self.detokenize is not None:
            req.text = self.detokenize(req.output)
            cut = [i for i in (req.text.find(s) for s in req.params.stop if s) if i >= 0]
            if cut:
                req.text = req.text[:min(cut)]
                self._finish(req, "stop")
                return
        if len(req.output) >= req.params.max_tokens:
            self._finish(req, "length")
        elif req.on_token is not None:
            req.on_token(req)

    def _prefill_one(self) -> None:
        req = next((r for r in self.running if r.state == "prefill"), None)
        if req is None:
            return
        target = req._prefill_target()
        toks = req._tokens()[req.n_cached:target][:self.chunk]
        n = len(toks)
        padded = np.zeros((1, self.chunk), np.int32)
        padded[0, :n] = toks
        logits, self.layers = self._prefill(
            self.variables, self.layers, self._table([req]),
            np.array([req.n_cached], np.int32), padded, np.int32(n - 1))
        req.n_cached += n
        if req.n_cached == target:
            req.state = "decode"
            if not req.output:                   # a fresh request: its first token
                self._emit(req, np.asarray(logits))

    def _decode_all(self) -> None:
        # every decoding request needs the page of position n_cached
        for req in list(self.running):
            if req.state != "decode" or req.done:
                continue
            while req.n_cached // self.page_size >= len(req.pages) and req.state == "decode":
                if self.free:
                    req.pages.append(self.free.popleft())
                else:
                    self._preempt(self.running[-1])     # the youngest (maybe req itself)
        batch = [r if r is not None and r.state == "decode" else None for r in self.slot_of]
        if not any(batch):
            return
        lengths = np.array([0 if r is None else r.n_cached for r in batch], np.int32)
        tokens = np.array([[0 if r is None else r.output[-1]] for r in batch], np.int32)
        logits, self.layers = self._decode(self.variables, self.layers, self._table(batch),
                                           lengths, tokens)
        self.decode_steps += 1
        self.decode_rows += sum(r is not None for r in batch)
        logits = np.asarray(logits)
        for i, r in enumerate(batch):
            if r is not None:
                r.n_cached += 1
                self._emit(r, logits[i])

    def step(self) -> None:
        """One scheduling step: admit, one prefill chunk, one decode step of every slot."""
        with self.lock:
            self._admit()
            self._prefill_one()
            self._decode_all()
            self.steps += 1

    def run(self, max_steps: Optional[int] = None) -> None:
        """Step until every submitted request is done (or ``max_steps``)."""
        for _ in itertools.count() if max_steps is None else range(max_steps):
            if not self.has_work():
                return
            self.step()
