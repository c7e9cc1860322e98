"""Greedy speculative decoding: a draft model proposes ``k`` tokens, the target verifies them in one
call.

Both models share the tokenizer (e.g. the MQA conversion of a run as the draft of the run itself,
or a smaller run). Each round the draft decodes ``k`` tokens greedily from its own KV cache; the
target then runs one decode call over ``[last token, d_1 .. d_k]`` (``k + 1`` positions) and
keeps the longest prefix of the proposal that equals its own greedy choices, plus its own next
token (the correction, or a bonus token when all ``k`` were accepted). Rejected positions are
rolled back by resetting the cache lengths (stale K/V beyond a row's length are masked and
overwritten). The output is therefore exactly the target's greedy output, token for token; what
changes is how many target calls produce it.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass
class SpeculativeResult:
    tokens: list[int]          # the new ids (max_new_tokens of them; stop ids not handled)
    proposed: int              # draft tokens proposed
    accepted: int              # of them, accepted by the target
    target_calls: int          # target forward calls (prefill included)
    draft_calls: int
    seconds: float             # wall time without compilation

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else float("nan")


@functools.lru_cache(maxsize=None)
def _fns(model: Any):
    def prefill(variables, cache, tokens):
        return model.apply(variables, tokens, cache=cache)

    def step(variables, cache, tokens):
        return model.apply(variables, tokens, cache=cache, decode=True)

    return jax.jit(prefill, donate_argnums=(1,)), jax.jit(step, donate_argnums=(1,))


def speculative_generate(target: Any, target_vars: Any, draft: Any, draft_vars: Any,
                         prompt: Sequence[int], *, max_new_tokens: int, k: int = 4,
                         warmup: bool = True, max_len: Optional[int] = None
                         ) -> SpeculativeResult:
    """Greedy decoding of ``target`` (a :class:`tfm_jax.model.TransformerLM`) after ``prompt``,
    with ``draft`` proposing ``k`` tokens per round. Returns the ``max_new_tokens`` new ids
    (equal to the target's greedy decoding alone) and the acceptance counts. ``warmup``
    compiles every call first (same shapes: ``max_len``, the caches' length), so ``seconds``
    is decode time only."""
    if k < 1 or max_new_tokens < 1 or not prompt:
        raise ValueError(f"speculative decoding needs k >= 1, max_new_tokens >= 1 and a "
                         f"prompt; got k={k}, max_new_tokens={max_new_tokens}, "
                         f"{len(prompt)} prompt tokens")
    if target.cfg.vocab_size != draft.cfg.vocab_size:
        raise ValueError(f"the draft's vocabulary ({draft.cfg.vocab_size}) differs from the "
                         f"target's ({target.cfg.vocab_size}): they must share the tokenizer")
    max_len = max_len or len(prompt) + max_new_tokens + k + 1
    if warmup:
        speculative_generate(target, target_vars, draft, draft_vars, prompt,
                             max_new_tokens=min(max_new_tokens, k + 2), k=k, warmup=False,
                             max_len=max_len)
    t_prefill, t_step = _fns(target)
    d_prefill, d_step = _fns(draft)
    t0 = time.perf_counter()
    p = jnp.asarray([list(prompt)], jnp.int32)
    logits, tcache = t_prefill(target_vars, target.init_cache(1, max_len), p)
    _, dcache = d_prefill(draft_vars, draft.init_cache(1, max_len), p)
    seq = [int(t) for t in prompt] + [int(np.argmax(np.asarray(logits)[0, -1]))]
    n_prompt = len(prompt)
    t_len, d_len = len(prompt), len(prompt)          # positions held by each cache
    proposed = accepted = 0
    target_calls, draft_calls = 1, 1
    while len(seq) - n_prompt < max_new_tokens:
        # the draft catches up on the tokens it has not seen, then proposes k
        proposal: list[int] = []
        while len(proposal) < k:
            pending = seq + proposal
            dlog, dcache = d_step(draft_vars,
                                  dcache.replace(lengths=jnp.asarray([d_len], jnp.int32)),
                                  jnp.asarray([[pending[d_len]]], jnp.int32))
            d_len += 1
            draft_calls += 1
            if d_len == len(pending):            # caught up: its logits propose the next token
                proposal.append(int(np.argmax(np.asarray(dlog)[0, -1])))
        # the target verifies [last, d_1 .. d_k] in one call
        feed = jnp.asarray([[seq[-1]] + proposal], jnp.int32)
        tlog, tcache = t_step(target_vars,
                              tcache.replace(lengths=jnp.asarray([t_len], jnp.int32)), feed)
        target_calls += 1
        greedy = np.argmax(np.asarray(tlog)[0], axis=-1)          # (k + 1,)
        m = 0
        while m < k and proposal[m] == int(greedy[m]):
            m += 1
        proposed += k
        accepted += m
        seq += proposal[:m] + [int(greedy[m])]
        t_len += m + 1                      # last + accepted drafts are now in the target cache
        d_len = min(d_len, len(seq) - 1)    # the draft's rejected proposals roll back
    return SpeculativeResult(seq[n_prompt:n_prompt + max_new_tokens], proposed, accepted,
                             target_calls, draft_calls, time.perf_counter() - t0)


def greedy_alone(target: Any, target_vars: Any, prompt: Sequence[int], *, max_new_tokens: int,
                 warmup: bool = True, max_len: Optional[int] = None
                 ) -> tuple[list[int], float]:
    """The baseline of the same style: the target alone, one jitted decode call per token from
    Python (as :func:`speculative_generate` drives its calls). Returns (new ids, seconds)."""
    max_len = max_len or len(prompt) + max_new_tokens
    if warmup:
        greedy_alone(target, target_vars, prompt, max_new_tokens=min(max_new_tokens, 2),
                     warmup=False, max_len=max_len)
    t_prefill, t_step = _fns(target)
    t0 = time.perf_counter()
    logits, cache = t_prefill(target_vars, target.init_cache(1, max_len),
                              jnp.asarray([list(prompt)], jnp.int32))
    out = [int(np.argmax(np.asarray(logits)[0, -1]))]
    while len(out) < max_new_tokens:
        logits, cache = t_step(target_vars, cache, jnp.asarray([[out[-1]]], jnp.int32))
        out.append(int(np.argmax(np.asarray(logits)[0, -1])))
    return out, time.perf_counter() - t0
