"""Serving under load: Poisson arrivals over loopback against ``tfm-jax serve``'s app.

The server (:mod:`tfm_jax.serve.server` on uvicorn, in this process) serves a model with random
weights (the throughput of a decoder does not depend on what it learned); ``--clients`` client
threads (in their own process unless ``--no-client-process``) send streaming ``POST
/v1/completions`` requests whose arrival times are a Poisson process of rate ``--rate`` per
second (a request waits for a free client: the clients bound the concurrency). Prompt lengths
are drawn uniformly from ``--prompt-len``, output lengths from ``--output-len`` (uniformly, or
log-uniformly with ``--output-dist log-uniform``: a long tail, as in chat traffic); requests set
``ignore_eos`` (every request produces its output length). The run is bounded: ``--requests``
requests or ``--duration`` seconds, whichever comes first.

Reported per scenario: throughput (generated tokens / wall time from the first arrival to the
last completion), p50 / p99 time to first token (TTFT: request sent -> first streamed token) and
per-token latency ((last streamed event - first) / (tokens - 1); the token count comes from the
final event's ``usage``), the peak number of requests admitted together, the mean number of
rows per decode step, and preemptions. Scenarios:

* ``sequential``: 1 client, requests one at a time (the baseline for concurrency);
* ``batching``: continuous vs static batching, the same requests, same budget (static batching
  admits requests only into an empty batch and runs it until all of them finish), ``--repeats``
  interleaved rounds and the median of the rounds' ratios with their range;
* ``kv-heads``: MHA / GQA / MQA variants of the same model at one KV memory budget
  (``--kv-memory``, bytes): the budget's page count, and so the concurrent requests, grows as the
  KV heads shrink -- the throughput that buys is measured, not assumed.

``--engine`` runs the same scenarios without HTTP: the scheduler stepped in this process, each
request submitted at its arrival time once a client is free -- the batching policy without the
front end (and without the ``[serve]`` extra; what the GPU device check runs).

    python -m benchmarks.serve_load                          # every scenario, CPU defaults
    python -m benchmarks.serve_load --scenario kv-heads --json out.json
    JAX_PLATFORMS=cuda python -m benchmarks.serve_load --engine --d-model 1024 --layers 8 \
        --kv-memory 67108864                                 # a GPU host
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import pathlib
import socket
import sys
import threading
import time
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")   # no effect if jax was already imported
_ROOT = str(pathlib.Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import linen as nn  # noqa: E402

from tfm_jax.config import ModelConfig  # noqa: E402
from tfm_jax.data.tokenizer import load_tokenizer  # noqa: E402
from tfm_jax.layers.paged_cache import bytes_per_page  # noqa: E402
from tfm_jax.model import TransformerLM  # noqa: E402
from tfm_jax.serve import Scheduler  # noqa: E402


def random_model(args, kv_heads: int):
    cfg = ModelConfig(vocab_size=259, d_model=args.d_model, n_layers=args.layers,
                      n_heads=args.heads, n_kv_heads=kv_heads, scan_layers=True)
    model = TransformerLM(cfg)
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0),
                                          jnp.zeros((1, 8), jnp.int32)))
    r = np.random.default_rng(0)
    # {"params": ...}: random weights, std 0.05
    params = jax.tree.map(lambda a: jnp.asarray(0.05 * r.normal(size=a.shape), a.dtype), shapes)
    return model, params


def serve(sched, tok):
    """(port, stop): the app on uvicorn in a thread."""
    import uvicorn

    from tfm_jax.serve.server import Engine, make_app

    engine = Engine(sched, tok)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(make_app(engine), host="127.0.0.1", port=port,
                                        log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    while not srv.started:
        time.sleep(0.02)

    def stop():
        srv.should_exit = True
        th.join(timeout=30)

    return port, stop


def one_request(port: int, prompt: str, n_out: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body=json.dumps(
        {"prompt": prompt, "max_tokens": n_out, "temperature": 0, "stream": True,
         "ignore_eos": True}),
        headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    first, last, n = None, None, 0
    while True:
        line = resp.fp.readline()
        if not line:
            break
        line = line.decode().strip()
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            raise RuntimeError(f"the server failed a request: {chunk['error']}")
        now = time.perf_counter()
        if chunk["choices"][0]["finish_reason"] is None:
            first = now if first is None else first
            last = now
        if "usage" in chunk:                        # the last event counts the tokens
            n = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    conn.close()
    first = end if first is None else first
    last = end if last is None else last
    return {"sent": t0, "ttft": first - t0, "end": end, "tokens": n,
            "per_token": (last - first) / (n - 1) if n > 1 else float("nan")}


def load(port: int, workload: list, clients: int, rate: float, duration: float,
         seed: int) -> dict:
    """Send ``workload`` [(prompt, n_out)] at Poisson arrival times through ``clients``
    threads; stops launching at ``duration`` seconds."""
    arrivals = _arrivals(len(workload), rate, seed)
    lock = threading.Lock()
    nxt = [0]
    out: list = []
    t0 = time.perf_counter()

    def client():
        while True:
            with lock:
                i = nxt[0]
                nxt[0] += 1
            if i >= len(workload):
                return
            wait = t0 + arrivals[i] - time.perf_counter()
            if arrivals[i] > duration:
                return
            if wait > 0:
                time.sleep(wait)
            res = one_request(port, *workload[i])
            with lock:
                out.append(res)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tokens = sum(x["tokens"] for x in out)
    wall = max(x["end"] for x in out) - min(x["sent"] for x in out)
    ttft = np.array([x["ttft"] for x in out])
    per = np.array([x["per_token"] for x in out if np.isfinite(x["per_token"])])
    return _summary(tokens, wall, ttft, per, len(out))


def _arrivals(n: int, rate: float, seed: int) -> np.ndarray:
    r = np.random.default_rng(seed)
    return np.cumsum(r.exponential(1.0 / rate, n)) if rate > 0 else np.zeros(n)


def _summary(tokens: int, wall: float, ttft: np.ndarray, per: np.ndarray, n: int) -> dict:
    return {"requests": n, "tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 2),
            "ttft_p50_ms": round(1e3 * float(np.percentile(ttft, 50)), 1),
            "ttft_p99_ms": round(1e3 * float(np.percentile(ttft, 99)), 1),
            "per_token_p50_ms": round(1e3 * float(np.percentile(per, 50)), 2),
            "per_token_p99_ms": round(1e3 * float(np.percentile(per, 99)), 2)}


def load_engine(sched, tok, workload: list, clients: int, rate: float, duration: float,
                seed: int) -> dict:
    """:func:`load` without HTTP: the scheduler stepped here, each request submitted at its
    arrival time once one of ``clients`` is free (the batching policy alone, no front end)."""
    from tfm_jax.serve.scheduler import SamplingParams

    arrivals = _arrivals(len(workload), rate, seed)
    todo = collections.deque(i for i in range(len(workload)) if arrivals[i] <= duration)
    active: list = []
    finished: list = []
    t0 = time.perf_counter()
    while todo or active:
        now = time.perf_counter() - t0
        while todo and len(active) < clients and arrivals[todo[0]] <= now:
            prompt, n_out = workload[todo.popleft()]
            active.append(sched.submit(tok.encode(prompt), SamplingParams(max_tokens=n_out)))
        if sched.has_work():
            sched.step()
        elif todo:
            time.sleep(max(0.0, min(arrivals[todo[0]] - now, 0.01)))
        finished += [q for q in active if q.done]
        active = [q for q in active if not q.done]
    tokens = sum(len(q.output) for q in finished)
    wall = max(q.finished_s for q in finished) - min(q.submitted_s for q in finished)
    ttft = np.array([q.first_token_s - q.submitted_s for q in finished])
    per = np.array([(q.finished_s - q.first_token_s) / (len(q.output) - 1)
                    for q in finished if len(q.output) > 1])
    return _summary(tokens, wall, ttft, per, len(finished))


def load_in_process(*args) -> dict:
    """:func:`load` in a separate process: the clients' HTTP and JSON work does not compete
    with the server for this process's interpreter lock."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(load, args)


def workload_of(args) -> list:
    r = np.random.default_rng(args.seed)
    letters = "abcdefghijklmnopqrstuvwxyz "
    out = []
    for _ in range(args.requests):
        n_in = int(r.integers(args.prompt_len[0], args.prompt_len[1] + 1))
        lo, hi = args.output_len
        if args.output_dist == "log-uniform":     # long-tailed: most short, a few long
            n_out = int(round(float(np.exp(r.uniform(np.log(lo), np.log(hi))))))
        else:
            n_out = int(r.integers(lo, hi + 1))
        out.append(("".join(r.choice(list(letters), n_in)), n_out))
    return out


def scenario(args, kv_heads: int, *, clients: int, rate: float, static: bool = False) -> dict:
    model, params = random_model(args, kv_heads)
    cfg = model.cfg
    per_page = bytes_per_page(n_layers=cfg.n_layers, page_size=args.page_size,
                              n_kv_heads=kv_heads, head_dim=cfg.resolved_head_dim, itemsize=4)
    num_pages = args.kv_memory // per_page
    tok = load_tokenizer(None)
    sched = Scheduler(model, params, slots=args.slots, num_pages=int(num_pages),
                      page_size=args.page_size, chunk=args.chunk, max_len=args.max_len,
                      detokenize=tok.decode, static=static)
    if args.engine:
        from tfm_jax.serve.scheduler import SamplingParams

        sched.submit(tok.encode("warm up"), SamplingParams(max_tokens=4))
        sched.run()                                     # compile both steps before timing
        sched.peak_running = 0
        before = sched.preemptions
        steps0, rows0 = sched.decode_steps, sched.decode_rows
        row = load_engine(sched, tok, workload_of(args), clients, rate, args.duration,
                          args.seed)
    else:
        port, stop = serve(sched, tok)
        try:
            one_request(port, "warm up", 4)             # compile both steps before timing
            sched.peak_running = 0
            before = sched.preemptions
            steps0, rows0 = sched.decode_steps, sched.decode_rows
            run = load_in_process if args.client_process else load
            row = run(port, workload_of(args), clients, rate, args.duration, args.seed)
        finally:
            stop()
    row.update(kv_heads=kv_heads, clients=clients, rate=rate, static=static,
               kv_pages=int(num_pages) - 1, kv_page_bytes=per_page,
               peak_running=sched.peak_running, preemptions=sched.preemptions - before,
               mean_decode_rows=round((sched.decode_rows - rows0)
                                      / max(sched.decode_steps - steps0, 1), 2))
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", choices=["all", "sequential", "batching", "kv-heads"],
                    default="all")
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=1, help="for sequential/batching")
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--kv-memory", type=int, default=None,
                    help="KV budget in bytes (default: 4 MHA sequences of max-len)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--rate", type=float, default=40.0, help="arrivals per second (Poisson)")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--duration", type=float, default=60.0, help="stop launching after (s)")
    ap.add_argument("--prompt-len", type=int, nargs=2, default=[8, 32])
    ap.add_argument("--output-len", type=int, nargs=2, default=[16, 64])
    ap.add_argument("--output-dist", choices=["uniform", "log-uniform"], default="uniform",
                    help="how output lengths are drawn from --output-len (log-uniform: a long "
                         "tail, as in chat traffic)")
    ap.add_argument("--engine", action="store_true",
                    help="no HTTP: step the scheduler here and submit each request at its "
                         "arrival time (the batching policy without the front end; needs no "
                         "[serve] extra)")
    ap.add_argument("--client-process", action=argparse.BooleanOptionalAction, default=True,
                    help="run the clients in a separate process (default; --no-client-process: "
                         "threads beside the server)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="batching: interleaved continuous/static rounds (the ratio's median "
                         "and range are reported)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)
    if args.prompt_len[1] + 1 + args.output_len[1] > args.max_len:
        ap.error("--max-len must hold the longest prompt + EOS + output")
    if args.kv_memory is None:           # 4 MHA sequences of max_len: the budget binds
        args.kv_memory = 4 * bytes_per_page(
            n_layers=args.layers, page_size=args.page_size, n_kv_heads=args.heads,
            head_dim=args.d_model // args.heads, itemsize=4) * (
            -(-args.max_len // args.page_size)) + bytes_per_page(
            n_layers=args.layers, page_size=args.page_size, n_kv_heads=args.heads,
            head_dim=args.d_model // args.heads, itemsize=4)
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}

    def show(name, row):
        row["scenario"] = name
        rows.append(row)
        print(f"{name:<22} kv_heads={row['kv_heads']} pages={row['kv_pages']:>4} "
              f"peak={row['peak_running']:>2} mean={row['mean_decode_rows']:>5.1f} "
              f"{row['tokens_per_s']:>8.1f} tok/s  "
              f"TTFT p50/p99 {row['ttft_p50_ms']:.0f}/{row['ttft_p99_ms']:.0f} ms  "
              f"per-token p50/p99 {row['per_token_p50_ms']:.1f}/{row['per_token_p99_ms']:.1f} ms"
              f"  ({row['requests']} requests, {row['tokens']} tokens, "
              f"{row['preemptions']} preemptions)", flush=True)

    if args.scenario in ("all", "sequential"):
        show("sequential", scenario(args, args.kv_heads, clients=1, rate=0.0))
        show("concurrent", scenario(args, args.kv_heads, clients=args.clients, rate=0.0))
    if args.scenario in ("all", "batching"):
        ratios = []
        for rep in range(args.repeats):   # interleaved: a drift of the machine hits both
            cont = scenario(args, args.kv_heads, clients=args.clients, rate=args.rate)
            show("continuous", cont)
            stat = scenario(args, args.kv_heads, clients=args.clients, rate=args.rate,
                            static=True)
            show("static", stat)
            cont["round"] = stat["round"] = rep
            ratios.append(cont["tokens_per_s"] / stat["tokens_per_s"])
        summary = {"ratios": [round(x, 3) for x in ratios],
                   "median": round(float(np.median(ratios)), 3)}
        print(f"continuous / static tokens/s: median {summary['median']:.2f}x "
              f"(range {min(ratios):.2f}-{max(ratios):.2f}, {len(ratios)} interleaved "
              f"round{'s' if len(ratios) > 1 else ''}; outputs {args.output_dist} "
              f"{args.output_len[0]}-{args.output_len[1]} tokens)", flush=True)
    if args.scenario in ("all", "kv-heads"):
        for kvh, name in ((args.heads, "MHA"), (max(args.heads // 2, 1), "GQA"), (1, "MQA")):
            show(f"budget {name}", scenario(args, kvh, clients=args.clients, rate=args.rate))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows,
                                                       "continuous_over_static": summary},
                                                      indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
