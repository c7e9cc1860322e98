"""lm-evaluation-harness on a trained run: ``tfm-jax lm-eval --run-dir R --tasks T``.

:class:`HarnessLM` is an ``lm_eval`` ``LM`` over a :class:`~tfm_jax.tools.run.Run`:

* ``loglikelihood(context, continuation)``: the sum of the continuation tokens' log-probabilities
  after ``EOS + context`` (EOS is the "document start" the run was trained with), and whether
  greedy decoding would produce exactly those tokens;
* ``loglikelihood_rolling(text)``: the whole text's log-likelihood in windows of at most
  ``max_length`` tokens, each token predicted once (the harness's own window helpers);
* ``generate_until(context, {until, max_gen_toks, ...})``: greedy (or sampled, with
  ``do_sample``) generation through the KV cache, cut before the first ``until`` string.

Requests are scored ``batch_size`` rows at a time, right-padded to a power-of-two length, so
few shapes are compiled. Contexts longer than ``max_length`` (default 8 x ``data.seq_len``, as
``tfm-jax generate``) keep their last tokens. The ``lm_eval`` package is the ``[eval]`` extra.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Optional, Sequence

import numpy as np

from tfm_jax.config import ConfigError
from tfm_jax.tools.run import Run

CONTEXT_FACTOR = 8          # default max_length: 8 x the trained data.seq_len
MISSING = ("tfm-jax lm-eval needs the lm-evaluation-harness package (lm_eval): "
           "pip install 'tfm-jax[eval]'")


def _lm_base():
    try:
        from lm_eval.api.model import LM
    except ImportError:
        raise ConfigError(MISSING) from None
    return LM


def _bucket(n: int, cap: int) -> int:
    """The padded length of a row of ``n`` tokens: the next power of two >= 16, at most cap."""
    return min(max(16, 1 << (n - 1).bit_length()), max(cap, n))


def score(run: Run, pairs: Sequence[tuple[list[int], list[int]]], *, batch_size: int,
          max_length: int) -> list[tuple[float, bool]]:
    """(sum of log p(target tokens), greedy?) for each (context ids, target ids) pair: the
    targets follow the context; the context is cut from the left so that the row holds at most
    ``max_length`` inputs."""
    out: list[tuple[float, bool]] = []
    for lo in range(0, len(pairs), batch_size):
        chunk = pairs[lo:lo + batch_size]
        rows = []
        for ctx, cont in chunk:
            if not cont:
                raise ConfigError("lm-eval: a request with an empty continuation")
            whole = (list(ctx) + list(cont))[-(max_length + 1):]
            rows.append((whole[:-1], len(cont)))
        width = _bucket(max(len(r) for r, _ in rows), max_length)
        ids = np.zeros((batch_size, width), np.int32)
        for i, (r, _) in enumerate(rows):
            ids[i, :len(r)] = r
        logits = run.logits(ids)                                        # (B, W, V)
        for i, ((ctx, cont), (r, n)) in enumerate(zip(chunk, rows)):
            x = logits[i, len(r) - n:len(r)].astype(np.float64)         # (n, V) predicting cont
            m = x.max(-1, keepdims=True)
            logp = x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
            target = np.asarray(cont[-n:])
            out.append((float(logp[np.arange(n), target].sum()),
                        bool((x.argmax(-1) == target).all())))
    return out


def make_lm(run: Run, *, batch_size: int = 8, max_length: Optional[int] = None) -> Any:
    """An ``lm_eval`` ``LM`` over ``run`` (raises a one-line error without ``lm_eval``)."""
    base = _lm_base()
    limit = max_length or CONTEXT_FACTOR * run.config.data.seq_len
    if batch_size < 1 or limit < 2:
        raise ConfigError(f"lm-eval: --batch-size {batch_size} / max length {limit}: need "
                          "batch size >= 1 and max length >= 2")

    class HarnessLM(base):
        """lm-evaluation-harness ``LM`` over a tfm-jax :class:`Run` (module docstring)."""

        def __init__(self):
            super().__init__()
            self.run, self.batch_size, self.max_length = run, batch_size, limit
            self.eos = run.tokenizer.eos_id

        def _context(self, text: str) -> list[int]:
            return [self.eos] + run.encode(text)

        def loglikelihood(self, requests) -> list[tuple[float, bool]]:
            pairs = [(self._context(ctx), run.encode(cont)) for ctx, cont in
                     (r.args for r in requests)]
            return score(run, pairs, batch_size=self.batch_size, max_length=self.max_length)

        def loglikelihood_rolling(self, requests) -> list[float]:
            from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

            totals = []
            for (text, *_) in (r.args for r in requests):
                windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                    run.encode(text), self.eos, self.max_length, 1)]
                totals.append(sum(s for s, _ in score(run, windows, batch_size=self.batch_size,
                                                      max_length=self.max_length)))
            return totals

        def generate_until(self, requests) -> list[str]:
            out = []
            for ctx, kw in (r.args for r in requests):
                kw = dict(kw or {})
                until = kw.pop("until", None) or []
                new = int(kw.pop("max_gen_toks", 256))
                sample = bool(kw.pop("do_sample", False))
                temperature = float(kw.pop("temperature", 1.0 if sample else 0.0))
                ids = self._context(ctx)[-max(self.max_length - new, 1):]
                out.append(run.generate([ids], max_new_tokens=new,
                                        temperature=temperature if sample else 0.0,
                                        top_p=float(kw.pop("top_p", 1.0)),
                                        top_k=int(kw.pop("top_k", 0) or 0),
                                        stop=[until] if isinstance(until, str) else until)[0])
            return out

    return HarnessLM()


def evaluate_run(run: Run, tasks: Sequence[str], *, include_path: Optional[str] = None,
                 limit: Optional[float] = None, batch_size: int = 8,
                 max_length: Optional[int] = None) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` of ``tasks`` (names; ``include_path``: a folder of task
    YAML files) on ``run``; returns the harness's results dict."""
    lm = make_lm(run, batch_size=batch_size, max_length=max_length)
    import lm_eval
    from lm_eval.tasks import TaskManager

    if include_path is not None and not pathlib.Path(include_path).is_dir():
        raise FileNotFoundError(f"--include-path {include_path}: no such folder")
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"lm-eval: unknown task(s) {', '.join(unknown)}; "
                          + ("check the names in --include-path" if include_path else
                             "pass --include-path DIR for your own task YAML files"))
    return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit,
                                   task_manager=manager, log_samples=False,
                                   bootstrap_iters=0)


def summary(results: dict[str, Any]) -> str:
    """The harness's results table."""
    from lm_eval.utils import make_table

    return make_table(results)


def to_json(results: dict[str, Any]) -> str:
    from lm_eval.utils import handle_non_serializable

    keep = {k: results[k] for k in ("results", "versions", "n-shot", "configs", "config")
            if k in results}
    return json.dumps(keep, indent=2, default=handle_non_serializable)
