"""The tfm-jax command line (also ``python -m tfm_jax``): one subcommand per task, listed by
``tfm-jax --help`` with one line each (:data:`COMMANDS`).

Every command takes ``--config FILE`` (default ``configs/tiny.yaml``; a bare name such as
``small`` is looked up in the shipped configs) and trailing ``section.key=value`` overrides.
Exit codes: 0 ok, 2 invalid config or input, 1 training diverged, 3 a multi-process run's peer
never connected (:mod:`tfm_jax.parallel.distributed`), 130/143 interrupted by SIGINT/SIGTERM at any
moment (one line says what was saved: in the training loop a checkpoint, continue with
``--resume``; see :mod:`tfm_jax.core.interrupts`).

Each command is a small :class:`Command` unit (name, arguments, run). Its run function imports
what it needs, so light commands stay light: ``tfm-jax config show`` imports neither jax nor
orbax. This module itself imports only the standard library and :mod:`tfm_jax.config`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import signal
import sys
from typing import Callable, Optional, Sequence

from tfm_jax.core import interrupts, rundir
from tfm_jax.config import WEIGHT_ONLY_RECIPES, Config, ConfigError, load_config
from tfm_jax.config.schema import PLUGIN_ENV
from tfm_jax.core.errors import CheckpointDamaged, CheckpointMismatch, DataError


@dataclasses.dataclass(frozen=True)
class Command:
    """One CLI command: ``name`` (e.g. ``("config", "show")``), its arguments and its run."""

    name: tuple[str, ...]
    help: str
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None,
                   help="YAML config (default configs/tiny.yaml); bare names resolve in configs/")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="dotted overrides, e.g. model.n_kv_heads=1 train.steps=500")


def _run_config(args) -> Config:
    """For eval/generate: the run's saved config (if --run-dir given), with overrides."""
    if getattr(args, "run_dir", None):
        from tfm_jax.tools.run import run_config

        return run_config(args.run_dir, args.overrides)
    return load_config(args.config, args.overrides)


def _add_step(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--step", type=int, default=None, metavar="N",
                   help=f"{what} checkpoint step N (default: the newest intact one; a damaged "
                   "newer step is skipped with one line)")


def _add_corpus_change(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--allow-corpus-change", action="store_true",
                   help=f"{what} on a corpus whose fingerprint differs from the one the run "
                   "recorded (corpus.json); without it that stops with both fingerprints")


def _restore(cfg: Config, calib_batches: int = 16, step: Optional[int] = None):
    from tfm_jax.tools.run import restore     # the Python API's restore (tfm_jax.load_run)

    return restore(cfg, calib_batches, step)


def _sample(setup, state, prompt: str, tokens: int, temperature: float, top_k: int,
            seed: int) -> str:
    from tfm_jax.data import run_tokenizer
    from tfm_jax.generate import generate_text

    variables = {"params": state.params, **state.model_state}
    q = setup.cfg.quant
    tok = run_tokenizer(setup.cfg.run_dir, setup.cfg.data.tokenizer)
    with setup.context():
        return generate_text(setup.model, variables, prompt, max_new_tokens=tokens,
                             temperature=temperature, top_k=top_k, seed=seed,
                             kv_cache=q.kv_cache, kv_scale=q.kv_scale, tokenizer=tok)


# ----------------------------------------------------------------------------- train


def _train_args(p: argparse.ArgumentParser) -> None:
    from tfm_jax.parallel import distributed

    _add_common(p)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    _add_step(p, "with --resume: continue from")
    _add_corpus_change(p, "with --resume: continue")
    p.add_argument("--init-from", default=None, metavar="RUN_DIR",
                   help="start a new run from this run's parameters (fresh optimizer, step 0; "
                   "fine-tuning, uptraining after convert); without --config the base config is "
                   "its config.yaml: give run.dir=NEW_DIR")
    p.add_argument("--init-step", type=int, default=None, metavar="N",
                   help="with --init-from: its checkpoint step N (default: the newest)")
    distributed.add_args(p)


def run_train(args) -> int:
    if args.init_from is not None and args.config is None:
        from tfm_jax.train.init_from import source_config

        src = source_config(pathlib.Path(args.init_from))
        cfg = src.replace(**{"run.dir": None})
        if args.overrides:
            from tfm_jax.config.schema import parse_overrides
            cfg = cfg.replace(**parse_overrides(list(args.overrides)))
        if cfg.run.dir is None:
            raise ConfigError("--init-from without --config: give the new run's directory as "
                              "run.dir=NEW_DIR")
    else:
        cfg = load_config(args.config, args.overrides)
    if args.init_from is not None and args.resume:
        raise ConfigError("--init-from starts a new run; --resume continues one: use one")
    if args.init_step is not None and args.init_from is None:
        raise ConfigError("--init-step N picks a checkpoint of --init-from RUN_DIR: give both")
    if cfg.quant.recipe in WEIGHT_ONLY_RECIPES:        # a run written by `tfm-jax quantize`
        raise ConfigError(
            f"quant.recipe={cfg.quant.recipe} is weight-only post-training quantization: a "
            "quantized run cannot be trained or resumed (quantization-aware training is not "
            "supported). Train the full-precision run (quant.recipe=none) and quantize it "
            "afterwards with 'tfm-jax quantize'")
    if args.step is not None and not args.resume:
        raise ConfigError("--step N continues a run from checkpoint N: use it with --resume")
    from tfm_jax.parallel import distributed

    dist = distributed.from_args(args)      # before any jax backend starts
    distributed.initialize(dist)
    interrupts.note("before training resumed; the run's checkpoints are unchanged" if args.resume
                    else "before step 1, nothing saved")
    from tfm_jax import train as train_lib

    try:
        result = train_lib.train(cfg, resume=args.resume, resume_step=args.step,
                                 init_from=args.init_from, init_step=args.init_step,
                                 allow_corpus_change=args.allow_corpus_change)
    except train_lib.Interrupted as err:
        print(f"\ntfm-jax: interrupted by {err}", file=sys.stderr)
        return 128 + err.signum
    except train_lib.NonFiniteError as err:
        print(f"\n{ERROR_PREFIX}training stopped: {err}", file=sys.stderr)
        return 1
    run_dir = pathlib.Path(result.run_dir)
    ev = result.eval
    loss = (f"train loss {result.last_loss:.4f} (mean of the log window ending at step "
            f"{result.last_loss_step}, as in metrics.jsonl)" if result.last_loss_step is not None
            else "no finite train loss logged")
    val = (f"val loss {ev.get('val_loss', float('nan')):.4f} nats/token "
           f"(ppl {ev.get('val_ppl', float('nan')):.2f}) vs unigram baseline "
           f"{result.unigram_baseline:.4f}")
    if result.already_finished:
        print(f"\nrun {run_dir} is already finished: step {result.final_step} of train.steps="
              f"{cfg.train.steps}, nothing trained; last {loss}, {val}. To train it further, "
              f"raise train.steps and keep its directory (run.dir={run_dir})")
    else:
        print(f"\nfinished step {result.final_step}: {loss}, {val}"
              + (f"; {result.skipped_steps} steps skipped (non-finite)" if result.skipped_steps
                 else ""))
    interrupts.note(f"after training finished at step {result.final_step} (checkpoint saved)"
                    + ("; no sample written" if cfg.train.sample_tokens else ""))
    if cfg.train.sample_tokens and dist is not None and dist.num_processes > 1:
        print(f"\nno sample: a multi-process run ({dist.describe()}); sample with "
              f"'tfm-jax generate --run-dir {run_dir}' in one process")
    elif cfg.train.sample_tokens:
        text = _sample(result.setup, result.state, cfg.train.sample_prompt, cfg.train.sample_tokens,
                       0.8, 40, cfg.train.seed)
        rundir.atomic_write(run_dir / "samples.txt", text)
        print(f"\n--- sample (prompt {cfg.train.sample_prompt!r}) ---\n{text}\n---")
    print(f"\nrun directory: {run_dir}\n  config      {run_dir / 'config.yaml'}\n"
          f"  metrics     {run_dir / 'metrics.jsonl'}\n  checkpoints {run_dir / 'checkpoints'}"
          + (f"\n  tensorboard {run_dir / 'events'}  (tensorboard --logdir {run_dir / 'events'})"
             if cfg.run.tensorboard else "")
          + (f"\n  sample      {run_dir / 'samples.txt'}" if cfg.train.sample_tokens else ""))
    distributed.shutdown(dist)
    return 0


# ----------------------------------------------------------------------------- eval / generate


def _eval_args(p: argparse.ArgumentParser) -> None:
    from tfm_jax.parallel import distributed

    _add_common(p)
    distributed.add_args(p)
    p.add_argument("--run-dir", help="run directory (default: the config's run.dir)")
    _add_step(p, "evaluate")
    _add_corpus_change(p, "evaluate")
    p.add_argument("--calib-batches", type=int, default=16,
                   help="quant.recipe=fp8_delayed on a run trained without it: the training "
                   "batches whose amaxes fill the delayed-scaling histories (default 16)")


def run_eval(args) -> int:
    cfg = _run_config(args)
    if args.calib_batches < 1:
        raise ConfigError(f"--calib-batches {args.calib_batches}: fill the fp8_delayed "
                          "histories from at least 1 batch")
    from tfm_jax.parallel import distributed

    dist = distributed.from_args(args)      # before any jax backend starts
    distributed.initialize(dist)
    from tfm_jax import data as data_lib
    from tfm_jax.train import eval_positions, eval_span, evaluate

    tok = data_lib.run_tokenizer(cfg.run_dir, cfg.data.tokenizer)
    corpus = data_lib.corpus_for(cfg.data, tok)
    note = data_lib.check_fingerprint(data_lib.run_corpus(cfg.run_dir), corpus.fingerprint,
                                      what="eval", allow=args.allow_corpus_change)
    if note:
        print(note, file=sys.stderr)
    setup, state = _restore(cfg, args.calib_batches, args.step)
    row = evaluate(setup, state, corpus.val)
    row["step"] = int(state.step)
    row["corpus_digest"] = corpus.digest
    row["val_bpb"] = data_lib.bits_per_byte(row["val_loss"], row["val_tokens"], corpus.bytes_of(
        eval_positions(cfg, corpus.val)))
    row["unigram_baseline"] = data_lib.unigram_entropy(corpus.train, eval_span(cfg, corpus.val),
                                                       vocab_size=tok.vocab_size)
    if cfg.quant.recipe != "none":
        row["quant_recipe"] = cfg.quant.recipe
    print(json.dumps(row, indent=2))
    distributed.shutdown(dist)
    return 0


CONTEXT_FACTOR = 8      # generate: prompt + new tokens <= 8 x the trained length by default


def _generate_args(p: argparse.ArgumentParser) -> None:
    _add_common(p)
    p.add_argument("--run-dir", help="run directory (default: the config's run.dir)")
    _add_step(p, "generate from")
    p.add_argument("--prompt", action="append", default=None,
                   help="prompt text; repeat for several prompts, generated as one batch "
                   "(default train.sample_prompt)")
    p.add_argument("--prompts-file", default=None,
                   help="more prompts: one per line (a .json file: a list of strings)")
    p.add_argument("--tokens", type=int, default=None, help="new tokens (default "
                   "train.sample_tokens)")
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=40, help="0: no top-k truncation")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass; 1: no truncation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (completions, timings) instead of text")
    p.add_argument("--max-context", type=int, default=None,
                   help=f"longest prompt + --tokens allowed (default {CONTEXT_FACTOR} x "
                   "data.seq_len of the run)")
    p.add_argument("--max-prompts", type=int, default=256,
                   help="most prompts in one batch (default 256)")
    p.add_argument("--draft-run-dir", default=None,
                   help="speculative decoding (greedy): this run (same tokenizer, e.g. the MQA "
                   "conversion of the run) proposes tokens the run verifies; reports acceptance "
                   "and the speed-up over the run alone")
    p.add_argument("--speculate", type=int, default=4, metavar="K",
                   help="with --draft-run-dir: draft tokens per round (default 4)")


def _speculate(args, cfg, setup, variables, ids, want, tokens, tok) -> dict:
    """--draft-run-dir: greedy speculative decoding of every prompt, against the run alone."""
    from tfm_jax.data import run_tokenizer
    from tfm_jax.serve.speculative import greedy_alone, speculative_generate

    dcfg = _run_config(argparse.Namespace(run_dir=args.draft_run_dir, overrides=[],
                                          config=None))
    dtok = run_tokenizer(dcfg.run_dir, dcfg.data.tokenizer)
    if dtok.fingerprint != tok.fingerprint or dcfg.model.vocab_size != cfg.model.vocab_size:
        raise ConfigError(f"--draft-run-dir {args.draft_run_dir}: its tokenizer or vocabulary "
                          "differs from the run's; the draft must share the tokenizer")
    dsetup, dstate = _restore(dcfg)
    dvars = {"params": dstate.params, **dstate.model_state}
    proposed = accepted = 0
    spec_s = alone_s = 0.0
    n_tok = 0
    identical = True
    for prompt, ref in zip(ids, want):
        r = speculative_generate(setup.model, variables, dsetup.model, dvars, prompt,
                                 max_new_tokens=tokens, k=args.speculate)
        base, secs = greedy_alone(setup.model, variables, prompt, max_new_tokens=tokens)
        proposed, accepted = proposed + r.proposed, accepted + r.accepted
        spec_s, alone_s, n_tok = spec_s + r.seconds, alone_s + secs, n_tok + tokens
        cut = r.tokens.index(tok.eos_id) if tok.eos_id in r.tokens else len(r.tokens)
        identical &= r.tokens == base and r.tokens[:cut] == [int(t) for t in ref]
    return {"k": args.speculate, "draft_run_dir": str(args.draft_run_dir),
            "acceptance": accepted / max(proposed, 1), "tokens_per_s": n_tok / spec_s,
            "alone_tokens_per_s": n_tok / alone_s, "speedup": alone_s / spec_s,
            "identical": bool(identical)}


def _read_prompts(path: Optional[str]) -> list[str]:
    if path is None:
        return []
    p = pathlib.Path(path)
    if not p.is_file():
        raise ConfigError(f"--prompts-file {path}: no such file")
    text = p.read_text(encoding="utf-8", errors="replace")
    if p.suffix == ".json":
        try:
            prompts = json.loads(text)
        except ValueError as err:
            raise ConfigError(f"--prompts-file {path}: not valid JSON ({err})") from None
        if not (isinstance(prompts, list) and all(isinstance(x, str) for x in prompts)):
            raise ConfigError(f"--prompts-file {path}: a .json file must hold a list of strings")
        return prompts
    return [line for line in text.splitlines() if line]


def run_generate(args) -> int:
    cfg = _run_config(args)
    prompts = list(args.prompt or []) + _read_prompts(args.prompts_file)
    if not prompts:
        prompts = [cfg.train.sample_prompt]
    tokens = cfg.train.sample_tokens if args.tokens is None else args.tokens
    if tokens < 1:
        raise ConfigError(f"--tokens {tokens}: generate at least 1 token")
    if args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1:
        raise ConfigError(f"--temperature {args.temperature} / --top-k {args.top_k} / --top-p "
                          f"{args.top_p}: need temperature >= 0, top-k >= 0, 0 < top-p <= 1")
    if args.draft_run_dir and (args.temperature != 0 or args.speculate < 1):
        raise ConfigError(f"--draft-run-dir: speculative decoding here is greedy with "
                          f"--speculate >= 1; pass --temperature 0 (got {args.temperature}, "
                          f"--speculate {args.speculate})")
    if len(prompts) > args.max_prompts:
        raise ConfigError(f"{len(prompts):,} prompts: at most --max-prompts {args.max_prompts} "
                          "in one batch; split the file or raise --max-prompts")
    from tfm_jax.data import run_tokenizer

    tok = run_tokenizer(cfg.run_dir, cfg.data.tokenizer)
    # Packed training streams separate documents with EOS: EOS is the "document start" context.
    ids = [[tok.eos_id] + list(tok.encode(p)) for p in prompts]
    limit = args.max_context or CONTEXT_FACTOR * cfg.data.seq_len
    longest = max(range(len(ids)), key=lambda i: len(ids[i]))
    if len(ids[longest]) + tokens > limit:
        raise ConfigError(
            f"prompt {longest + 1} is {len(ids[longest]):,} tokens; with --tokens {tokens} that "
            f"is {len(ids[longest]) + tokens:,} positions, beyond the context limit {limit:,} "
            + ("(--max-context)" if args.max_context else f"({CONTEXT_FACTOR} x data.seq_len="
               f"{cfg.data.seq_len}, the length the model was trained on)")
            + "; shorten the prompt, lower --tokens or raise --max-context")
    setup, state = _restore(cfg, step=args.step)
    from tfm_jax.generate import bytes_of_cache, generate, make_decoder

    shards = setup.mesh.shape["data"] * setup.mesh.shape["fsdp"]
    batch = -(-len(ids) // shards) * shards          # rows split evenly over the batch shards
    q = cfg.quant
    variables = {"params": state.params, **state.model_state}
    with setup.context():
        decoder = make_decoder(setup.model, batch=batch,
                               max_len=max(map(len, ids)) + tokens - 1,
                               kv_cache=q.kv_cache, kv_scale=q.kv_scale)
        g = generate(decoder, variables, ids, max_new_tokens=tokens,
                     temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                     stop_ids=[tok.eos_id], seed=args.seed)
    texts = [tok.decode(list(i) + list(new)) for i, new in zip(ids, g.tokens)]
    spec = _speculate(args, cfg, setup, variables, ids, g.tokens, tokens, tok) \
        if args.draft_run_dir else None
    stats = {"prefill_s": g.prefill_s, "decode_s": g.decode_s,
             "decode_tokens_per_s": g.decode_tokens_per_s if g.decode_steps else None,
             "decode_tokens": g.decode_tokens,
             "decode_steps": g.decode_steps, "compile_s": g.compile_s, "batch": batch,
             "kv_cache": q.kv_cache, "kv_scale": q.kv_scale,
             "kv_cache_bytes": bytes_of_cache(g.cache), "kernels": setup.ops.describe()}
    if spec is not None:
        stats["speculative"] = spec
        print(f"speculative (k={spec['k']}): acceptance {spec['acceptance']:.2f}, "
              f"{spec['tokens_per_s']:,.1f} tokens/s vs {spec['alone_tokens_per_s']:,.1f} alone "
              f"(x{spec['speedup']:.2f}); greedy output identical to the run alone: "
              f"{spec['identical']}", file=sys.stderr)
    if args.json:
        rows = [{"prompt": p, "text": t, "new_tokens": len(new), "stopped": bool(stop)}
                for p, t, new, stop in zip(prompts, texts, g.tokens, g.stopped)]
        print(json.dumps({"completions": rows, **stats}, indent=2))
        return 0
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"=== prompt {i + 1}/{len(texts)} ===")
        print(text)
    rate = (f"{g.decode_tokens_per_s:,.1f} tokens/s ({g.decode_tokens} tokens in "
            f"{g.decode_steps} steps of batch {batch})" if g.decode_steps else "no decode steps")
    print(f"prefill {g.prefill_s * 1e3:.1f} ms ({len(ids)} prompts), decode {rate}; KV cache "
          f"{q.kv_cache}, {stats['kv_cache_bytes'] / 2**10:,.1f} KiB; compile "
          f"{g.compile_s:.1f} s (not timed)", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- lm-eval


def _lm_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", required=True, help="trained run to evaluate")
    _add_step(p, "evaluate")
    p.add_argument("--tasks", required=True, help="task names, comma-separated (lm-evaluation-"
                   "harness names, or those of --include-path)")
    p.add_argument("--include-path", default=None, help="folder of your own task YAML files")
    p.add_argument("--limit", type=float, default=None, help="examples per task (a fraction "
                   "if < 1; default all)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward (default 8)")
    p.add_argument("--max-length", type=int, default=None, help="longest context in tokens; "
                   "longer ones keep their end (default 8 x data.seq_len of the run)")
    p.add_argument("--output", default=None, help="also write the results as JSON to this file")


def run_lm_eval(args) -> int:
    """lm-evaluation-harness tasks on a run (tfm_jax.tools.lm_eval; the [eval] extra)."""
    try:
        import lm_eval  # noqa: F401  (the [eval] extra; checked before jax starts)
    except ImportError:
        raise ConfigError("tfm-jax lm-eval needs the lm-evaluation-harness package (lm_eval): "
                          "pip install 'tfm-jax[eval]'") from None
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ConfigError("--tasks: give at least one task name")
    from tfm_jax.tools import lm_eval as harness
    from tfm_jax.tools.run import open_run

    run = open_run(args.run_dir, step=args.step)
    res = harness.evaluate_run(run, tasks, include_path=args.include_path, limit=args.limit,
                               batch_size=args.batch_size, max_length=args.max_length)
    print(harness.summary(res))
    if args.output:
        rundir.atomic_write(pathlib.Path(args.output), harness.to_json(res))
        print(f"results: {args.output}")
    return 0


# ----------------------------------------------------------------------------- config show


def run_config_show(args) -> int:
    from tfm_jax.config import param_counts

    cfg = load_config(args.config, args.overrides)
    m = cfg.model
    print(cfg.to_yaml(), end="")
    print(f"# derived: model.head_dim={m.resolved_head_dim}, model.ffn_hidden="
          f"{m.resolved_ffn_hidden}, parameters={param_counts(m)['total']:,}")
    from tfm_jax.config import profiles
    for line in profiles.describe(cfg):      # backend.profile / emulate: what it resolved
        print(f"# {line}")
    if getattr(args, "memory", False):   # only then import jax (builds and compiles the step)
        from tfm_jax.platform import backends
        from tfm_jax.tools import memory

        backends.configure(cfg.backend)
        print(memory.format_report(memory.report(cfg, peak=not args.no_peak)))
    return 0


def _config_show_args(p: argparse.ArgumentParser) -> None:
    _add_common(p)
    p.add_argument("--memory", action="store_true", help="also print the train state's bytes "
                   "(params by dtype, fp8 state, optimizer moments; from the abstract pytree) "
                   "and the compiled train step's peak memory per device (imports jax and "
                   "compiles the step)")
    p.add_argument("--no-peak", action="store_true", help="with --memory: skip compiling the "
                   "step (state bytes only)")


# ----------------------------------------------------------------------------- kv-cache


def _kv_cache_args(p: argparse.ArgumentParser) -> None:
    _add_common(p)
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default "
                   "data.seq_len)")
    p.add_argument("--batch", type=int, default=1, help="sequences (default 1)")
    p.add_argument("--dtype", default=None, help="cache element type: fp32, bf16, fp16, int8 or "
                   "fp8 (default: model.dtype); int8/fp8 totals exclude the scales, shown apart")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")


def run_kv_cache(args) -> int:
    """KV-cache bytes for MHA / the config's GQA / MQA. Needs no jax: config + arithmetic."""
    from tfm_jax.config import sizing as kvm

    cfg = load_config(args.config, args.overrides)
    m = cfg.model
    seq = cfg.data.seq_len if args.seq is None else args.seq
    try:
        dtype = kvm.canonical_dtype(m.dtype if args.dtype is None else args.dtype)
        rows = kvm.kv_table(cfg, seq, args.batch, dtype)
    except ValueError as err:
        raise ConfigError(f"kv-cache: {err}") from None
    quant = dtype in kvm.QUANTIZED
    scale_note = ("total_bytes excludes the scales: scale_bytes counts one float32 scale per "
                  "token and K/V head, for K and V, in every layer; total_with_scales adds them"
                  if quant else "no scales (unquantized cache)")
    formula = "total = 2 * n_kv_heads * head_dim * bytes * n_layers * seq * batch"
    if args.json:
        print(json.dumps({"config": str(args.config or "tiny"), "seq": seq, "batch": args.batch,
                          "dtype": dtype, "formula": formula, "scales": scale_note,
                          "variants": {r["kind"]: r for r in rows}}, indent=2))
        return 0
    hb = kvm.human_bytes
    print(f"KV cache, {args.config or 'tiny'}: {m.n_layers} layers, {m.n_heads} query heads, "
          f"head_dim {m.resolved_head_dim}; seq {seq:,} x batch {args.batch}, {dtype} "
          f"({kvm.DTYPE_BYTES[dtype]} byte{'s' if kvm.DTYPE_BYTES[dtype] > 1 else ''}/element)"
          f"\n{formula}\n")
    head = (f"{'attention':<14}{'kv heads':>9}{'B/token/layer':>15}{'B/token':>12}"
            f"{'per layer':>12}{'total':>12}" + (f"{'+scales':>12}" if quant else "")
            + f"{'weights':>12}{'KV share':>10}")
    print(head)
    for r in rows:
        name = r["kind"] + (" (config)" if r["config"] else "")
        print(f"{name:<14}{r['n_kv_heads']:>9}{r['bytes_per_token_per_layer']:>15,}"
              f"{r['bytes_per_token']:>12,}{hb(r['bytes_per_layer']):>12}{hb(r['total_bytes']):>12}"
              + (f"{hb(r['total_with_scales']):>12}" if quant else "")
              + f"{hb(r['weights_bytes']):>12}{100 * r['kv_share']:>9.2f}%")
    print(f"\nweights: the parameters of each variant (its own K/V projections) stored as {dtype}"
          f"; KV share = KV{' with scales' if quant else ''} / (KV + weights)."
          + ("\nint8/fp8: 'total' excludes the scales; '+scales' adds one float32 scale per token "
             "and K/V head, for K and V, in every layer." if quant else ""))
    return 0


# ----------------------------------------------------------------------------- convert


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", required=True, help="trained MHA/GQA run to convert")
    p.add_argument("--kv-heads", type=int, required=True,
                   help="K/V heads of the new run (must divide the source's)")
    p.add_argument("--out", default=None, help="new run directory (default <run-dir>-kv<N>)")
    p.add_argument("--steps", type=int, default=None, help="train.steps of the new run, i.e. "
                   "uptraining steps (default 5%% of the source's)")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation right after "
                   "conversion")


def run_convert(args) -> int:
    """Mean-pool a trained run's K/V heads into a new run (GQA uptraining, tfm_jax.tools.convert)."""
    from tfm_jax.tools.convert import convert_run

    res = convert_run(args.run_dir, args.kv_heads, args.out, steps=args.steps,
                      evaluate=not args.no_eval)
    out = res.out_dir
    print(f"converted {args.run_dir} (step {res.source_step}, {res.source_n_kv_heads} K/V heads)"
          f" -> {out} ({args.kv_heads} K/V heads, checkpoint at step 0, fresh optimizer state)")
    if res.eval:
        print(f"right after conversion: val loss {res.eval['val_loss']:.4f} nats/token "
              f"(ppl {res.eval['val_ppl']:.2f})")
    print(f"  config      {out / 'config.yaml'}  (train.steps={res.config.train.steps})\n"
          f"  checkpoints {out / 'checkpoints'}\n  provenance  {out / 'convert.json'}\n"
          f"continue training: tfm-jax train --config {out / 'config.yaml'} --resume\n"
          f"evaluate:          tfm-jax eval --run-dir {out}")
    return 0


# ----------------------------------------------------------------------------- hugging face


def _import_hf_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="SRC", help="local Hugging Face model folder (config.json, "
                   "model.safetensors or a sharded index, tokenizer files)")
    p.add_argument("--out", required=True, help="new run directory")
    p.add_argument("--param-dtype", choices=("float32", "bfloat16"), default=None,
                   help="dtype of the stored parameters (default float32)")


def run_import_hf(args) -> int:
    from tfm_jax.hf import import_hf

    out = import_hf(args.src, args.out, param_dtype=args.param_dtype)
    cfg = load_config(str(out / "config.yaml"))
    m = cfg.model
    print(f"imported {args.src} -> {out} ({m.n_layers} layers, d_model {m.d_model}, "
          f"{m.n_heads}/{m.n_kv_heads} heads, vocab {m.vocab_size}; checkpoint at step 0)\n"
          f"  config      {out / 'config.yaml'}\n  checkpoints {out / 'checkpoints'}\n"
          f"  tokenizer   {out / 'tokenizer' if (out / 'tokenizer').is_dir() else 'none'}\n"
          f"evaluate:  tfm-jax eval --run-dir {out}\n"
          f"fine-tune: tfm-jax train --init-from {out} run.dir=NEW_DIR data.path=...")
    return 0


def _export_hf_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", required=True, help="run to export")
    p.add_argument("--out", required=True, help="new folder for the Hugging Face files")
    _add_step(p, "export")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="dtype of the saved tensors (default the run's model.param_dtype)")


def run_export_hf(args) -> int:
    from tfm_jax.hf import export_hf

    out = export_hf(args.run_dir, args.out, step=args.step, dtype=args.dtype)
    files = ", ".join(sorted(p.name for p in pathlib.Path(out).iterdir() if p.is_file()))
    print(f"exported {args.run_dir} -> {out} ({files})\n"
          f"load it: transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


# ----------------------------------------------------------------------------- quantize


def _quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", required=True, help="trained full-precision run to quantize")
    p.add_argument("--recipe", required=True, choices=WEIGHT_ONLY_RECIPES,
                   help="int8_weight (symmetric), int8_weight_asym (uint8 + zero point), "
                   "int4_weight (packed two per byte); all per output channel, weight-only")
    p.add_argument("--out", default=None, help="new run directory (default <run-dir>-<recipe>)")
    p.add_argument("--no-eval", action="store_true", help="skip the perplexity comparison")


def run_quantize(args) -> int:
    """Weight-only PTQ of a trained run into a new run directory (tfm_jax.tools.quantize)."""
    from tfm_jax.tools.quantize import quantize_run, summary

    res = quantize_run(args.run_dir, args.recipe, args.out, evaluate=not args.no_eval)
    print(summary(res))
    return 0


# ----------------------------------------------------------------------------- calibrate


_CALIB_METHODS = ("max", "percentile", "ema")   # == tfm_jax.tools.calibrate.METHODS


def _calibrate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", required=True, help="trained run to calibrate")
    p.add_argument("--batches", type=int, default=16,
                   help="training batches to run (steps 0..N-1 of the run's data stream; "
                   "default 16)")
    p.add_argument("--method", default="max", help="max | percentile | ema: how the per-batch "
                   "input amaxes become one static scale (default max)")
    p.add_argument("--percentile", type=float, default=99.99,
                   help="--method percentile: the percentile of |x| per batch (default 99.99)")
    p.add_argument("--ema-beta", type=float, default=0.999,
                   help="--method ema: beta of the scale EMA (default 0.999, as the seed)")
    p.add_argument("--out", default=None,
                   help="calibration file (default <run-dir>/calibration-<method>.json)")
    p.add_argument("overrides", nargs="*", metavar="quant.key=value",
                   help="quant.fwd_format / quant.margin / quant.kernel_granularity of the "
                   "scales (default: the run's)")


def run_calibrate(args) -> int:
    """Static FP8 scales of a trained run (tfm_jax.tools.calibrate)."""
    if args.method not in _CALIB_METHODS:
        raise ConfigError(f"calibrate: --method {args.method!r}; valid: "
                          f"{', '.join(_CALIB_METHODS)}")
    if args.batches < 1:
        raise ConfigError(f"calibrate: --batches {args.batches}; calibrate over at least 1 "
                          "batch")
    from tfm_jax.tools.calibrate import calibrate_run, summary

    res = calibrate_run(args.run_dir, args.batches, args.method, percentile=args.percentile,
                        ema_beta=args.ema_beta, out=args.out, overrides=list(args.overrides))
    note = "".join(f" {o}" for o in args.overrides if not o.startswith("quant.margin"))
    print(summary(res, args.run_dir, note))
    return 0


# ----------------------------------------------------------------------------- ablate


def _ablate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment", help="experiment YAML (e.g. experiments/attention.yaml) or the "
                   "name of a shipped one (attention, smoke)")
    p.add_argument("--dry-run", action="store_true", help="validate every run's config and "
                   "show what would be trained, skipped or resumed; train nothing. With --pilot "
                   "or --sd: the seeds each declared claim needs for its margin")
    p.add_argument("--pilot", metavar="RESULTS_JSON", help="with --dry-run: a pilot's "
                   "results.json; each claim's per-seed sd comes from its runs")
    p.add_argument("--sd", type=float, metavar="SD", help="with --dry-run: a stated per-seed "
                   "standard deviation of every claim's metric (instead of --pilot)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every run, after the experiment's own (a "
                   "variant's value still wins); repeatable; needs --name")
    p.add_argument("--variants", metavar="A,B", help="run only these variants (in this order)")
    p.add_argument("--seeds", metavar="0,1,2", help="these seeds instead of the file's")
    p.add_argument("--name", help="the derived experiment's name: its output goes to "
                   "runs/ablate/NAME")


def run_ablate(args) -> int:
    """Variants x seeds of an experiment file (tfm_jax.ablate); exit 1 if a run failed."""
    import shlex

    from tfm_jax import train as train_lib
    from tfm_jax.ablate.runner import run_experiment
    from tfm_jax.ablate.spec import ExperimentError, load_experiment
    from tfm_jax.config import parse_overrides

    experiment = args.experiment
    flags = []
    if args.sets or args.variants or args.seeds or args.name:
        try:
            seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else None
        except ValueError:
            raise ExperimentError(f"--seeds {args.seeds!r}: integers separated by commas, "
                                  "e.g. --seeds 0,1,2") from None
        experiment = load_experiment(args.experiment).derive(
            sets=parse_overrides(args.sets), seeds=seeds, name=args.name,
            variants=[v.strip() for v in args.variants.split(",")] if args.variants else None)
        flags = ([f"--set {shlex.quote(x)}" for x in args.sets]
                 + [f"--{k} {getattr(args, k)}" for k in ("variants", "seeds", "name")
                    if getattr(args, k)])
    interrupts.note("before the first run of the experiment; nothing trained")
    try:
        if (args.pilot or args.sd is not None) and not args.dry_run:
            raise ExperimentError("--pilot and --sd size the seeds of a plan: use them with "
                                  "--dry-run")
        res = run_experiment(experiment, dry_run=args.dry_run, pilot=args.pilot, sd=args.sd,
                             command=shlex.join(["tfm-jax", "ablate", args.experiment])
                             + "".join(f" {f}" for f in flags))
    except train_lib.Interrupted as err:
        print(f"\ntfm-jax: ablation interrupted by {err}; the same command continues the "
              "experiment", file=sys.stderr)
        return 128 + err.signum
    return 1 if res.failed else 0


def _inspect_args(p: argparse.ArgumentParser) -> None:
    _add_common(p)
    p.add_argument("--json", action="store_true",
                   help='print the report as JSON: {"collectives": {"all-to-all": {"count": n, '
                        '"bytes": b, ...}, ...}, "params": ..., "memory": ...}')


def run_inspect(args) -> int:
    """Compile the train step of a config; parameters, FLOPs, memory, HLO collectives."""
    from tfm_jax.tools.inspect import format_report, inspect_train_step

    cfg = load_config(args.config, args.overrides)
    rep = inspect_train_step(cfg)
    print(json.dumps(rep, indent=1) if args.json else format_report(rep))
    return 0


# ----------------------------------------------------------------------------- claims


def _claims_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", default=".", help="repository root holding studies/ (default: "
                   "the current directory)")
    p.add_argument("--out", default=None, help="output file (default <root>/CLAIMS.md)")


def run_claims(args) -> int:
    """The claims ledger (tfm_jax.ablate.claims): every claim of the seed with a verdict."""
    from tfm_jax.ablate import claims

    root = pathlib.Path(args.root)
    if not (root / "studies").is_dir():
        raise FileNotFoundError(f"{root.resolve()} has no studies/ folder: run from the "
                                "repository root or pass --root")
    rows = claims.ledger(root)
    path = pathlib.Path(args.out) if args.out else root / "CLAIMS.md"
    rundir.atomic_write(path, claims.markdown(rows))
    counts = {v: sum(r["verdict"] == v for r in rows) for v in claims.VERDICTS}
    print(f"{len(rows)} claims: " + ", ".join(f"{n} {v}" for v, n in counts.items() if n))
    print(f"  ledger  {path}")
    return 0


# ----------------------------------------------------------------------------- env


def run_env(args) -> int:
    from tfm_jax.platform import environment

    cfg = load_config(args.config, args.overrides)
    rep = environment.report(cfg.backend, measure=not args.no_measure)
    print(json.dumps(rep, indent=1) if args.json else environment.format_report(rep))
    return 2 if rep["plugins"]["error"] else 0


def _env_args(p: argparse.ArgumentParser) -> None:
    _add_common(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-measure", action="store_true", help="do not measure the matmul peak "
                   "when none is cached")


def _serve_args(p: argparse.ArgumentParser) -> None:
    _add_common(p)
    p.add_argument("--run-dir", required=True, help="the trained run to serve")
    _add_step(p, "serve")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free)")
    p.add_argument("--kv-memory", default="2GiB",
                   help="KV-cache budget, e.g. 512MiB, 2GiB (default 2GiB): the page pool's size")
    p.add_argument("--slots", type=int, default=16,
                   help="most requests decoded together (the compiled batch; default 16)")
    p.add_argument("--page-size", type=int, default=16, help="positions per KV page (default 16)")
    p.add_argument("--chunk", type=int, default=64,
                   help="prefill chunk in tokens, interleaved with decode steps (default 64)")
    p.add_argument("--max-context", type=int, default=None,
                   help=f"prompt + max_tokens allowed (default {CONTEXT_FACTOR} x data.seq_len "
                   "of the run)")


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20,
          "gib": 2**30}


def parse_bytes(text: str) -> int:
    """'2GiB', '512MiB', '1.5GB', '1000000' -> bytes."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"--kv-memory {text}: give a size such as 512MiB or 2GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def run_serve(args) -> int:
    cfg = _run_config(args)
    budget = parse_bytes(args.kv_memory)
    for name in ("slots", "page_size", "chunk"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    if not 0 <= args.port < 65536:
        raise ConfigError(f"--port {args.port}: must lie in [0, 65535]")
    import importlib.util

    if any(importlib.util.find_spec(m) is None for m in ("fastapi", "uvicorn")):
        raise ConfigError("tfm-jax serve needs the [serve] extra: pip install "
                          "'tfm-jax[serve]' (FastAPI + uvicorn)")
    import uvicorn
    from tfm_jax.data import run_tokenizer
    from tfm_jax.layers.paged_cache import bytes_per_page
    from tfm_jax.model import DTYPES
    from tfm_jax.serve.scheduler import Scheduler
    from tfm_jax.serve.server import Engine, make_app

    max_len = args.max_context or CONTEXT_FACTOR * cfg.data.seq_len
    m, q = cfg.model, cfg.quant
    itemsize = 1 if q.kv_cache != "none" else jnp_itemsize(DTYPES[m.dtype])
    per_page = bytes_per_page(n_layers=m.n_layers, page_size=args.page_size,
                              n_kv_heads=m.n_kv_heads, head_dim=m.resolved_head_dim,
                              itemsize=itemsize, kv_cache=q.kv_cache, kv_scale=q.kv_scale)
    num_pages = budget // per_page
    need = -(-max_len // args.page_size) + 1
    if num_pages < need:
        raise ConfigError(f"--kv-memory {args.kv_memory} holds {num_pages} pages of {per_page:,} "
                          f"bytes; one sequence of {max_len} positions needs {need} (one is "
                          "scratch): raise --kv-memory or lower --max-context")
    tok = run_tokenizer(cfg.run_dir, cfg.data.tokenizer)
    setup, state = _restore(cfg, step=args.step)
    variables = {"params": state.params, **state.model_state}
    sched = Scheduler(setup.model, variables, slots=args.slots, num_pages=int(num_pages),
                      page_size=args.page_size, chunk=args.chunk, max_len=max_len,
                      kv_cache=q.kv_cache, kv_scale=q.kv_scale, detokenize=tok.decode)
    engine = Engine(sched, tok, model_name=str(cfg.run_dir))
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"tfm-jax serve: listening on {args.host}, not loopback only: anyone who can "
              "reach it can use it (no authentication)", file=sys.stderr)
    from tfm_jax.layers.attention_ops import paged

    kernel = setup.ops.paged_attention
    interpreted = kernel is not None and getattr(kernel, "keywords", {}).get("interpret")
    why_not = ("quantized pages" if q.kv_cache != "none" else None if interpreted else
               paged.unsupported(m.resolved_head_dim, args.page_size))
    decode = ("gathered pages" if kernel is None else f"gathered pages ({why_not})" if why_not
              else "Pallas paged-attention kernel" + (" (interpreted)" if interpreted else ""))
    print(f"tfm-jax serve: {cfg.run_dir} on http://{args.host}:{args.port} -- {num_pages - 1} "
          f"KV pages of {args.page_size} positions ({per_page:,} bytes each), {args.slots} "
          f"slots, context {max_len}; decode attention: {decode}", file=sys.stderr, flush=True)
    uvicorn.run(make_app(engine), host=args.host, port=args.port, log_level="warning")
    return 0


def jnp_itemsize(dtype) -> int:
    import numpy as np

    return np.dtype(dtype).itemsize


def _tokenizer_train_args(p: argparse.ArgumentParser) -> None:
    _add_common(p)
    p.add_argument("--vocab-size", type=int, required=True, help="tokens in the vocabulary "
                   "(256 bytes + 3 specials + merges)")
    p.add_argument("--out", required=True, help="folder to write (tokenizer.json + the files "
                   "transformers' AutoTokenizer reads); use it as data.tokenizer=OUT")


def run_tokenizer_train(args) -> int:
    cfg = load_config(args.config, args.overrides)
    from tfm_jax.data import tokenizer_train

    print(tokenizer_train.train_from_config(cfg.data, args.vocab_size, args.out))
    return 0


COMMANDS: tuple[Command, ...] = (
    Command(("train",), "train a model (default: tiny config, built-in corpus)", _train_args,
            run_train),
    Command(("eval",), "validation loss/perplexity of a run's latest checkpoint", _eval_args,
            run_eval),
    Command(("generate",), "sample text from a run's latest checkpoint", _generate_args,
            run_generate),
    Command(("lm-eval",), "lm-evaluation-harness tasks on a run (loglikelihood, "
            "generate_until; the [eval] extra)", _lm_eval_args, run_lm_eval),
    Command(("config", "show"), "print the resolved config as YAML (--memory: train-state "
            "bytes and the step's peak memory)", _config_show_args, run_config_show),
    Command(("kv-cache",), "KV-cache bytes for MHA / GQA / MQA at a length, batch and dtype",
            _kv_cache_args, run_kv_cache),
    Command(("convert",), "mean-pool a trained run's K/V heads into a new GQA/MQA run",
            _convert_args, run_convert),
    Command(("import-hf",), "a local Hugging Face Llama/Mistral/Qwen2 folder -> a new run "
            "directory (checkpoint at step 0)", _import_hf_args, run_import_hf),
    Command(("export-hf",), "a run's checkpoint -> a Hugging Face folder (config.json + "
            "model.safetensors + tokenizer) transformers loads", _export_hf_args, run_export_hf),
    Command(("quantize",), "weight-only INT8/INT4 post-training quantization of a trained run",
            _quantize_args, run_quantize),
    Command(("calibrate",), "static FP8 scales of a trained run (for quant.recipe=fp8_static)",
            _calibrate_args, run_calibrate),
    Command(("ablate",), "run an experiment: variants x seeds, results table, plots, claims",
            _ablate_args, run_ablate),
    Command(("inspect",), "compile a config's train step: params, FLOPs/token, memory, and "
            "every collective XLA emits (count, bytes)", _inspect_args, run_inspect),
    Command(("claims",), "write CLAIMS.md: every claim of the seed document with the measured "
            "figure and a verdict (from studies/*/results.json + arithmetic)",
            _claims_args, run_claims),
    Command(("serve",), "an OpenAI-compatible completions server over a run: paged KV cache, "
            "continuous batching", _serve_args, run_serve),
    Command(("tokenizer", "train"), "train a byte-level BPE tokenizer on the configured data "
            "(data.* overrides), offline", _tokenizer_train_args, run_tokenizer_train),
    Command(("env",), "platforms, devices, PJRT plugins, versions, CPU kernels, FP8 native or "
            "emulated, matmul peak, recommended FP8 scaling", _env_args, run_env),
)
_GROUP_HELP = {"config": "config show: print the resolved config as YAML (--memory: train-state "
                          "bytes)",
               "tokenizer": "tokenizer train: a byte-level BPE on the configured data"}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="tfm-jax", description="tfm-jax: Transformer LM components, measured. Every command "
        "takes --config FILE (or a shipped config name) and trailing section.key=value overrides.")
    subs = {(): ap.add_subparsers(dest="command", required=True)}
    for cmd in COMMANDS:
        for depth in range(1, len(cmd.name)):          # groups such as `config`
            group = cmd.name[:depth]
            if group not in subs:
                gp = subs[group[:-1]].add_parser(group[-1], help=_GROUP_HELP.get(group[-1]))
                subs[group] = gp.add_subparsers(dest=f"{'_'.join(group)}_command",
                                                required=True)
        p = subs[cmd.name[:-1]].add_parser(cmd.name[-1], help=cmd.help)
        cmd.add_args(p)
        if cmd.name not in _NO_BACKEND:
            p.add_argument("--pjrt-plugin", metavar="PATH", default=None,
                           help="PJRT plugin library (.so) for backend.platform gpu/tpu/hpu "
                           f"(sets ${PLUGIN_ENV}; never read from a config or run directory)")
        p.set_defaults(_run=cmd.run, _name=" ".join(cmd.name))
    return ap


ERROR_PREFIX = "tfm-jax: error: "       # every user-fixable error, every command: exit 2
_NO_BACKEND = {("kv-cache",), ("claims",)}     # commands that start no jax backend


def _main(argv: Optional[Sequence[str]]) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "pjrt_plugin", None):   # absolute: a bare name would be a library search
        os.environ[PLUGIN_ENV] = os.path.abspath(os.path.expanduser(args.pjrt_plugin))
    interrupts.note(f"during 'tfm-jax {args._name}'")
    try:
        return args._run(args)
    except (ConfigError, DataError, CheckpointMismatch, CheckpointDamaged, FileNotFoundError,
            FileExistsError) as err:
        print(f"{ERROR_PREFIX}{err}", file=sys.stderr)     # one format for every command
        return 2


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The CLI. As the program (``argv`` None), SIGINT/SIGTERM exit 130/143 with one line at
    any point (:mod:`tfm_jax.core.interrupts`); called with an ``argv`` list (in-process) signals are
    left alone and the exit code is returned."""
    as_program = argv is None
    if as_program:
        interrupts.install()
    code = _main(argv)
    if as_program and code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
        interrupts.exit_now(code)      # no interpreter teardown after an interrupt
    return code


if __name__ == "__main__":
    sys.exit(main())
