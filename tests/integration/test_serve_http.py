"""tfm-jax serve over loopback: the FastAPI app on uvicorn in a thread (a tiny random model and the
byte tokenizer) -- greedy completions equal decoding alone, concurrent clients, server-sent events,
400s naming the field, a disconnecting client frees its pages, a failing step does not take the
server down, Prometheus metrics; and the CLI command on a trained run in a subprocess."""

import http.client
import json
import socket
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from serve_support import cfg_of, model_and_vars  # noqa: E402
from tfm_jax.data.tokenizer import load_tokenizer  # noqa: E402
from tfm_jax.generate import generate, make_decoder  # noqa: E402
from tfm_jax.serve import Scheduler  # noqa: E402
from tfm_jax.serve.server import Engine, make_app  # noqa: E402

MAX_LEN = 48


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    tok = load_tokenizer(None)                                # bytes: 259 ids
    model, variables = model_and_vars(cfg_of(2, scan_layers=True, vocab_size=tok.vocab_size))
    sched = Scheduler(model, variables, slots=4, num_pages=16, page_size=8, chunk=8,
                      max_len=MAX_LEN, detokenize=tok.decode)
    engine = Engine(sched, tok)
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(make_app(engine), host="127.0.0.1", port=port,
                                        log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    dec = make_decoder(model, batch=1, max_len=MAX_LEN)
    yield dict(port=port, engine=engine, tok=tok, model=model, variables=variables, dec=dec)
    srv.should_exit = True
    th.join(timeout=10)


def call(port, method, path, body=None, raw=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    data = raw if raw is not None else (None if body is None else json.dumps(body))
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    out = resp.status, resp.read().decode()
    conn.close()
    return out


def alone(s, prompt, n):
    """Greedy reference: the prompt's ids (EOS first) decoded by themselves, EOS stops."""
    tok = s["tok"]
    ids = [tok.eos_id] + list(tok.encode(prompt))
    g = generate(s["dec"], s["variables"], [ids], max_new_tokens=n, stop_ids=[tok.eos_id])
    return tok.decode(list(g.tokens[0]))


def test_health_and_greedy_completion(server):
    status, body = call(server["port"], "GET", "/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, body = call(server["port"], "POST", "/v1/completions",
                        {"prompt": "def f(x):", "max_tokens": 12, "temperature": 0})
    assert status == 200, body
    out = json.loads(body)
    assert out["choices"][0]["text"] == alone(server, "def f(x):", 12)
    assert out["choices"][0]["finish_reason"] in ("length", "stop")
    assert out["usage"]["prompt_tokens"] == 1 + len("def f(x):")


def test_concurrent_clients_get_their_own_greedy_completions(server):
    prompts = ["import os", "class A:", "x = 1\n", "return", "for i in", "while True"]
    results = {}

    def client(p):
        results[p] = call(server["port"], "POST", "/v1/completions",
                          {"prompt": p, "max_tokens": 10, "temperature": 0})

    threads = [threading.Thread(target=client, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in prompts:
        status, body = results[p]
        assert status == 200, body
        assert json.loads(body)["choices"][0]["text"] == alone(server, p, 10), p


def test_stream_equals_the_whole_completion(server):
    req = {"prompt": "def g():", "max_tokens": 10, "temperature": 0}
    _, whole = call(server["port"], "POST", "/v1/completions", req)
    status, body = call(server["port"], "POST", "/v1/completions", {**req, "stream": True})
    assert status == 200
    events = [line[len("data: "):] for line in body.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) >= 2
    assert "".join(c["choices"][0]["text"] for c in chunks) == \
        json.loads(whole)["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")


def test_stop_string_cuts_the_text(server):
    ref = alone(server, "x = ", 12)
    stop = ref[3:5]
    assert stop
    status, body = call(server["port"], "POST", "/v1/completions",
                        {"prompt": "x = ", "max_tokens": 12, "temperature": 0, "stop": stop})
    out = json.loads(body)["choices"][0]
    assert status == 200 and out["text"] == ref[:ref.find(stop)]
    assert out["finish_reason"] == "stop"


@pytest.mark.parametrize("body,param", [
    ({"prompt": "a", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "a", "temperature": -0.5}, "temperature"),
    ({"prompt": "a", "top_p": 0}, "top_p"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": "a" * 60}, "prompt"),
    ({"prompt": "a" * 40, "max_tokens": 20}, "max_tokens"),
    ({"prompt": "a", "stop": 3}, "stop"),
    (None, None),                                       # invalid JSON
])
def test_bad_requests_get_400_naming_the_field(server, body, param):
    status, text = call(server["port"], "POST", "/v1/completions",
                        body, raw="{not json" if body is None else None)
    assert status == 400, text
    err = json.loads(text)["error"]
    assert err["param"] == param and err["message"]
    if param:
        assert param in err["message"]


def metric(server, name):
    _, text = call(server["port"], "GET", "/metrics")
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics:\n{text}")


def test_disconnecting_client_frees_its_pages(server):
    cancelled = metric(server, 'tfm_serve_requests_finished_total{reason="cancelled"}')
    sched = server["engine"].sched
    real = sched._decode

    def slow(*a):                 # 46 tokens take > 1 s: the client leaves long before the end
        time.sleep(0.025)
        return real(*a)

    sched._decode = slow
    try:
        _disconnect_mid_stream(server)
    finally:
        sched._decode = real
    assert metric(server, 'tfm_serve_requests_finished_total{reason="cancelled"}') == \
        cancelled + 1


def _disconnect_mid_stream(server):
    conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps(
        {"prompt": "w", "max_tokens": 46, "temperature": 0.8, "stop": ["\x00\x01\x02"],
         "stream": True}),
        headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    resp.fp.readline()                                   # the first event arrived
    assert metric(server, "tfm_serve_pages_used") > 0
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    for _ in range(200):
        if metric(server, "tfm_serve_pages_used") == 0 and \
                metric(server, "tfm_serve_requests_running") == 0:
            break
        time.sleep(0.05)
    assert metric(server, "tfm_serve_pages_used") == 0
    assert metric(server, "tfm_serve_requests_running") == 0


def test_a_failing_step_does_not_take_the_server_down(server):
    sched = server["engine"].sched
    real = sched._decode
    calls = {"n": 0}

    def flaky(*a):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected")
        return real(*a)

    sched._decode = flaky
    try:
        status, body = call(server["port"], "POST", "/v1/completions",
                            {"prompt": "abc", "max_tokens": 5, "temperature": 0})
        assert status == 500 and json.loads(body)["error"]["type"] == "server_error"
        status, body = call(server["port"], "POST", "/v1/completions",
                            {"prompt": "abc", "max_tokens": 5, "temperature": 0})
        assert status == 200 and json.loads(body)["choices"][0]["text"] == alone(server, "abc", 5)
    finally:
        sched._decode = real
    assert metric(server, "tfm_serve_step_errors_total") >= 1
    for name in ("tfm_serve_requests_queued", "tfm_serve_pages_total",
                 "tfm_serve_tokens_per_second"):
        metric(server, name)


# ------------------------------------------------------------------------------ the CLI command

def test_cli_serve_on_a_trained_run(tmp_path, text_corpus):
    """`tfm-jax serve` in a subprocess on a 6-step run: /health, a greedy completion equal to
    `tfm-jax generate --temperature 0` for the same prompt, and a budget too small for one
    sequence rejected with one line (exit 2); `generate --draft-run-dir` (speculative) gives
    the same text."""
    import os
    import pathlib
    import subprocess
    import sys

    root = str(pathlib.Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               XLA_FLAGS="--xla_force_host_platform_device_count=1",
               TFM_JAX_CACHE=str(tmp_path / "cache"))
    tiny = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=1",
            "data.seq_len=32", "train.batch_size=4", "train.warmup_steps=1",
            "train.eval_every=3", "train.checkpoint_every=3", "train.eval_batches=1",
            "run.progress=false"]
    rd = tmp_path / "run"

    def cli(*args, **kw):
        return subprocess.run([sys.executable, "-m", "tfm_jax", *map(str, args)], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=300, **kw)

    proc = cli("train", *tiny, "train.steps=6", f"data.path={text_corpus}", f"run.dir={rd}")
    assert proc.returncode == 0, proc.stderr
    gen = cli("generate", "--run-dir", rd, "--prompt", "def ", "--temperature", "0",
              "--tokens", "12", "--json")
    assert gen.returncode == 0, gen.stderr
    want = json.loads(gen.stdout)["completions"][0]["text"]

    # speculative decoding with the run as its own draft: same text, every proposal accepted
    spec = cli("generate", "--run-dir", rd, "--prompt", "def ", "--temperature", "0",
               "--tokens", "12", "--json", "--draft-run-dir", rd, "--speculate", "3")
    assert spec.returncode == 0, spec.stderr
    out = json.loads(spec.stdout)
    assert out["completions"][0]["text"] == want
    assert out["speculative"]["identical"] is True and out["speculative"]["acceptance"] == 1.0
    hot = cli("generate", "--run-dir", rd, "--draft-run-dir", rd, "--temperature", "0.8")
    assert hot.returncode == 2 and "greedy" in hot.stderr and "Traceback" not in hot.stderr

    bad = cli("serve", "--run-dir", rd, "--kv-memory", "1KiB")
    assert bad.returncode == 2 and bad.stderr.startswith("tfm-jax: error: --kv-memory 1KiB")
    assert "Traceback" not in bad.stderr

    port = free_port()
    srv = subprocess.Popen([sys.executable, "-m", "tfm_jax", "serve", "--run-dir", str(rd),
                            "--port", str(port), "--kv-memory", "4MiB", "--slots", "4"],
                           cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            try:
                if call(port, "GET", "/health")[0] == 200:
                    break
            except OSError:
                pass
            assert srv.poll() is None, srv.communicate()[1]
            time.sleep(0.1)
        status, body = call(port, "POST", "/v1/completions",
                            {"prompt": "def ", "max_tokens": 12, "temperature": 0})
        assert status == 200, body
        assert "def " + json.loads(body)["choices"][0]["text"] == want
    finally:
        srv.terminate()
        err = srv.communicate(timeout=30)[1]
    assert "; decode attention: gathered pages" in err, err     # CPU: no paged kernel


def test_load_benchmark_smoke(tmp_path):
    """benchmarks/serve_load.py end to end at a tiny size: every scenario's rows, each request
    answered with its full output length, the KV budget's page counts in proportion to the KV
    heads (MHA 4 : GQA 2 : MQA 1); the continuous/static ratio is the median of the interleaved
    rounds' ratios."""
    from benchmarks import serve_load

    out = tmp_path / "load.json"
    assert serve_load.main(["--requests", "6", "--output-len", "4", "8", "--prompt-len", "4",
                            "8", "--clients", "3", "--max-len", "32", "--page-size", "8",
                            "--slots", "4", "--repeats", "2", "--output-dist", "log-uniform",
                            "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    rows = {r["scenario"]: r for r in res["rows"]}
    rounds = [(c["tokens_per_s"], s["tokens_per_s"]) for c, s in zip(
        [r for r in res["rows"] if r["scenario"] == "continuous"],
        [r for r in res["rows"] if r["scenario"] == "static"])]
    ratios = [c / s for c, s in rounds]
    assert len(ratios) == 2
    assert res["continuous_over_static"]["ratios"] == pytest.approx(ratios, abs=1e-3)
    assert res["continuous_over_static"]["median"] == pytest.approx(np.median(ratios), abs=1e-3)
    assert set(rows) == {"sequential", "concurrent", "continuous", "static", "budget MHA",
                         "budget GQA", "budget MQA"}
    want_tokens = rows["sequential"]["tokens"]
    assert 6 * 4 <= want_tokens <= 6 * 8
    for r in rows.values():
        assert r["requests"] == 6 and r["tokens"] == want_tokens, r
        assert r["tokens_per_s"] > 0 and r["ttft_p99_ms"] >= r["ttft_p50_ms"] > 0
    assert rows["sequential"]["peak_running"] == 1
    pages = [rows[f"budget {n}"]["kv_pages"] + 1 for n in ("MHA", "GQA", "MQA")]
    assert pages[1] // pages[0] == 2 and pages[2] // pages[0] == 4
