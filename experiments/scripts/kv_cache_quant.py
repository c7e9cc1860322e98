"""Perplexity cost of a quantized KV cache, measured by teacher-forced decoding through the cache.

For a trained run, every validation window that ``tfm-jax eval`` scores is decoded through the
KV cache one token at a time, feeding the true next token (:func:`tfm_jax.generate.
eval_through_cache`): with an int8 / e4m3 cache each step reads quantized K/V of all earlier
positions, so the error accumulates as in real decoding. The table compares each format (and
scale granularity) with the unquantized cache; the full-forward validation loss is shown as the
check that the unquantized cache path computes the same thing.

    tfm-jax train train.steps=300 run.dir=runs/tiny-300          # a short trained run
    python experiments/scripts/kv_cache_quant.py --run-dir runs/tiny-300 [--batches 8] [--json out.json]

Targets: int8 within 0.5 %, fp8 within 1 % of the unquantized perplexity.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time
from typing import Any, Optional

_ROOT = str(pathlib.Path(__file__).resolve().parents[2])   # the repository root
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

VARIANTS = [("none", "per_token_head"), ("int8", "per_token_head"), ("int8", "per_token"),
            ("fp8", "per_token_head"), ("fp8", "per_token")]
TARGETS = {"int8": 0.5, "fp8": 1.0}    # max perplexity increase in %


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", required=True, help="a run directory written by tfm-jax train")
    p.add_argument("--batches", type=int, default=None,
                   help="validation batches (default: the run's train.eval_batches)")
    p.add_argument("--json", metavar="PATH", help="also write the results here")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import jax.numpy as jnp

    from tfm_jax import data as data_lib
    from tfm_jax.cli import _restore
    from tfm_jax.config import load_config
    from tfm_jax.generate import eval_through_cache
    from tfm_jax.layers import kv_cache as kv
    from tfm_jax.train import evaluate

    overrides = [f"run.dir={args.run_dir}"]
    if args.batches:
        overrides.append(f"train.eval_batches={args.batches}")
    cfg = load_config(str(pathlib.Path(args.run_dir) / "config.yaml"), overrides)
    setup, state = _restore(cfg)
    corpus = data_lib.load_corpus(cfg.data.path, cfg.data.val_fraction, cfg.data.cache_dir,
                                  include=cfg.data.include)
    variables = {"params": state.params, **state.model_state}
    full = evaluate(setup, state, corpus.val)
    m = cfg.model
    rows = []
    for fmt, scale in VARIANTS:
        t0 = time.perf_counter()
        total, n = 0.0, 0
        with setup.context():
            for batch in data_lib.eval_batches(corpus.val, batch_size=cfg.train.batch_size,
                                               seq_len=cfg.data.seq_len,
                                               max_batches=cfg.train.eval_batches,
                                               rows=data_lib.process_rows(cfg.train.batch_size)):
                # the window as a sequence: inputs then the last target
                tokens = jnp.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)
                nll = eval_through_cache(setup.model, variables, tokens, kv_cache=fmt,
                                         kv_scale=scale)
                count = tokens.shape[0] * (tokens.shape[1] - 1)
                total, n = total + nll * count, n + count
        nll = total / n
        cache = kv.init_cache(n_layers=m.n_layers, batch=1, max_len=1, n_kv_heads=m.n_kv_heads,
                              head_dim=m.resolved_head_dim, kv_cache=fmt, kv_scale=scale)
        rows.append({"kv_cache": fmt, "kv_scale": scale if fmt != "none" else None,
                     "nll": nll, "ppl": math.exp(nll), "tokens": n,
                     "kv_bytes_per_token": kv.bytes_of_cache(cache),
                     "seconds": time.perf_counter() - t0})
    base = rows[0]["ppl"]
    for r in rows:
        r["ppl_increase_pct"] = 100.0 * (r["ppl"] / base - 1.0)
        target = TARGETS.get(r["kv_cache"])
        r["target_pct"] = target
        r["within_target"] = None if target is None else r["ppl_increase_pct"] <= target
    return {"run_dir": str(args.run_dir), "step": int(state.step), "model": m.model_dump(),
            "full_forward_val_loss": full["val_loss"], "rows": rows}


def print_report(res: dict[str, Any]) -> None:
    print(f"run {res['run_dir']} (step {res['step']}): full-forward val loss "
          f"{res['full_forward_val_loss']:.5f} nats/token")
    print("| KV cache | scales | NLL (nats/token) | perplexity | vs none | target | "
          "KV bytes/token |")
    print("|---|---|---|---|---|---|---|")
    for r in res["rows"]:
        target = "" if r["target_pct"] is None else (
            f"<= {r['target_pct']} % {'ok' if r['within_target'] else 'MISSED'}")
        print(f"| {r['kv_cache']} | {r['kv_scale'] or '-'} | {r['nll']:.5f} | {r['ppl']:.4f} | "
              f"{r['ppl_increase_pct']:+.3f} % | {target} | {r['kv_bytes_per_token']} |")


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    res = run(args)
    print_report(res)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(res, indent=2))
        print(f"wrote {args.json}")
    return res


if __name__ == "__main__":
    main()
