"""An OpenAI-compatible completions endpoint over the continuous-batching scheduler.

``POST /v1/completions`` (prompt, max_tokens, temperature, top_p, top_k, seed, stop, stream),
``GET /health``, ``GET /metrics`` (Prometheus text). Built on FastAPI + uvicorn (the ``[serve]``
extra); this module is imported only by ``tfm-jax serve`` and the tests.

One engine thread owns the :class:`~tfm_jax.serve.scheduler.Scheduler` and steps it while there
is work; HTTP handlers submit requests and await their tokens (a thread-safe hand-off into the
event loop). A client that disconnects cancels its request, which frees its pages. A bad request
gets HTTP 400 with ``{"error": {"message", "type", "param"}}`` naming the field; an exception
inside a step fails the requests of that step (HTTP 500 / an error event) and the server goes on
with fresh page pools.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import threading
import time
from typing import Any, Optional

from fastapi import Request as HTTPRequest   # the [serve] extra (module-level: FastAPI reads
                                             # the handlers' annotations from this namespace)

from tfm_jax.serve.scheduler import Request, SamplingParams, Scheduler

log = logging.getLogger("tfm_jax.serve")


class BadRequest(ValueError):
    def __init__(self, param: Optional[str], message: str):
        super().__init__(message)
        self.param = param


class Engine:
    """The scheduler stepped by one background thread; ``tokenizer`` encodes prompts (the run's
    own: EOS first, as the training stream separates documents, and EOS stops a completion)."""

    def __init__(self, scheduler: Scheduler, tokenizer: Any, *, model_name: str = "tfm-jax"):
        self.sched, self.tok, self.model_name = scheduler, tokenizer, model_name
        self.wake = threading.Event()
        self.stop_flag = threading.Event()
        self.errors = 0
        self.started = time.time()
        self._recent: collections.deque = collections.deque()   # (time, tokens) per step
        self.thread = threading.Thread(target=self._loop, name="tfm-serve-engine", daemon=True)

    def start(self) -> "Engine":
        self.thread.start()
        return self

    def close(self) -> None:
        self.stop_flag.set()
        self.wake.set()
        self.thread.join(timeout=10)

    def _loop(self) -> None:
        s = self.sched
        while not self.stop_flag.is_set():
            if not s.has_work():
                self.wake.wait(0.05)
                self.wake.clear()
                continue
            before = s.generated
            try:
                s.step()
            except Exception:                       # never let one step take the server down
                log.exception("serve: a scheduler step failed; failing its requests")
                self.errors += 1
                s.recover("error")
            time.sleep(0)        # let the event loop take the interpreter lock between steps
            now = time.time()
            self._recent.append((now, s.generated - before))
            while self._recent and self._recent[0][0] < now - 10.0:
                self._recent.popleft()

    def tokens_per_s(self) -> float:
        """Tokens generated per second over the last 10 s."""
        recent = list(self._recent)
        if not recent:
            return 0.0
        span = max(time.time() - recent[0][0], 1e-3)
        return sum(n for _, n in recent) / span

    # ---------------------------------------------------------------------------- requests

    def parse(self, body: bytes) -> tuple[list[int], SamplingParams, bool, str]:
        """The request body -> (prompt ids, sampling, stream, prompt text); BadRequest naming
        the field otherwise."""
        try:
            req = json.loads(body)
        except (ValueError, UnicodeDecodeError) as err:
            raise BadRequest(None, f"the body is not valid JSON ({err})") from None
        if not isinstance(req, dict):
            raise BadRequest(None, "the body must be a JSON object")
        prompt = req.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise BadRequest("prompt", "prompt: a string is required")

        def num(name, default, kind, ok, what):
            v = req.get(name, default)
            if v is None:
                v = default
            if isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else int):
                what_type = "a number" if kind is float else "an integer"
                raise BadRequest(name, f"{name}: must be {what_type}")
            v = kind(v)
            if not ok(v):
                raise BadRequest(name, f"{name}: must be {what}, got {v}")
            return v

        max_tokens = num("max_tokens", 16, int, lambda v: v >= 1, ">= 1")
        temperature = num("temperature", 1.0, float, lambda v: v >= 0, ">= 0")
        top_p = num("top_p", 1.0, float, lambda v: 0 < v <= 1, "in (0, 1]")
        top_k = num("top_k", 0, int, lambda v: v >= 0, ">= 0")
        seed = num("seed", 0, int, lambda v: v >= 0, ">= 0")
        stop = req.get("stop")
        stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
        if not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)
                and len(stop) <= 4):
            raise BadRequest("stop", "stop: a non-empty string or a list of up to 4 of them")
        stream, ignore_eos = req.get("stream", False), req.get("ignore_eos", False)
        if not isinstance(stream, bool):
            raise BadRequest("stream", "stream: must be true or false")
        if not isinstance(ignore_eos, bool):
            raise BadRequest("ignore_eos", "ignore_eos: must be true or false")
        ids = [int(self.tok.eos_id)] + [int(t) for t in self.tok.encode(prompt)]
        ctx = self.sched.max_len
        if len(ids) > ctx:
            raise BadRequest("prompt", f"prompt: {len(ids)} tokens, longer than the context of "
                             f"{ctx} positions")
        if len(ids) + max_tokens - 1 > ctx:
            raise BadRequest("max_tokens", f"max_tokens: the prompt's {len(ids)} tokens + "
                             f"{max_tokens} exceed the context of {ctx} positions")
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                                top_p=top_p, seed=seed, stop=tuple(stop),
                                stop_ids=() if ignore_eos else (int(self.tok.eos_id),))
        return ids, params, stream, prompt

    def submit(self, ids: list[int], params: SamplingParams,
               loop: asyncio.AbstractEventLoop) -> tuple[Request, asyncio.Queue]:
        """Queue a request; its queue gets ``None`` when there is news (new tokens, the end),
        coalesced: while one ``None`` waits unread or on its way, later tokens add none (the
        reader takes all the text there is), so a busy event loop is not handed one callback
        per token of every running request."""
        q: asyncio.Queue = asyncio.Queue()
        on_its_way = [False]

        def put() -> None:
            on_its_way[0] = False
            if q.empty():
                q.put_nowait(None)

        def notify(_req: Request) -> None:
            if on_its_way[0]:
                return
            on_its_way[0] = True
            try:
                loop.call_soon_threadsafe(put)
            except RuntimeError:                  # the event loop is gone (shutdown)
                on_its_way[0] = False

        req = self.sched.submit(ids, params, on_token=notify)
        self.wake.set()
        return req, q

    def metrics(self) -> str:
        s = self.sched
        rows = [("tfm_serve_requests_queued", "gauge", "requests waiting for a slot",
                 len(s.waiting)),
                ("tfm_serve_requests_running", "gauge", "requests holding a slot",
                 len(s.running)),
                ("tfm_serve_pages_used", "gauge", "KV pages held by requests", s.pages_used),
                ("tfm_serve_pages_total", "gauge", "KV pages in the pool (scratch excluded)",
                 s.num_pages - 1),
                ("tfm_serve_tokens_per_second", "gauge", "tokens generated per second, last 10 s",
                 round(self.tokens_per_s(), 3)),
                ("tfm_serve_generated_tokens_total", "counter", "tokens generated", s.generated),
                ("tfm_serve_preemptions_total", "counter", "requests preempted (recompute)",
                 s.preemptions),
                ("tfm_serve_step_errors_total", "counter", "scheduler steps that failed",
                 self.errors)]
        out = []
        for name, kind, help_, value in rows:
            out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]
        name = "tfm_serve_requests_finished_total"
        out += [f"# HELP {name} requests finished, by reason", f"# TYPE {name} counter"]
        out += [f'{name}{{reason="{r}"}} {s.finished[r]}'
                for r in ("length", "stop", "cancelled", "error")]
        return "\n".join(out) + "\n"


def _error(status: int, message: str, param: Optional[str] = None,
           kind: str = "invalid_request_error"):
    from fastapi.responses import JSONResponse
    return JSONResponse({"error": {"message": message, "type": kind, "param": param}},
                        status_code=status)


def _hold_back(req: Request) -> int:
    """Characters of the text not yet safe to stream: a stop string may still complete there."""
    if req.done:
        return 0
    partial = len(req.text) - len(req.text.rstrip("\ufffd"))    # an unfinished UTF-8 character
    return max([len(s) - 1 for s in req.params.stop] + [partial])


def make_app(engine: Engine):
    """The FastAPI application of ``engine`` (started and closed with the app's lifespan)."""
    import contextlib

    from fastapi import FastAPI
    from fastapi.responses import PlainTextResponse, StreamingResponse

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        if not engine.thread.is_alive() and not engine.stop_flag.is_set():
            engine.start()
        yield
        engine.close()

    app = FastAPI(title="tfm-jax serve", lifespan=lifespan)

    @app.exception_handler(Exception)
    async def _any(_request, err):                  # a handler bug: 500, never a crash
        log.exception("serve: request failed")
        return _error(500, f"internal error: {type(err).__name__}", kind="server_error")

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": len(engine.sched.running),
                "queued": len(engine.sched.waiting)}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics(), media_type="text/plain; version=0.0.4")

    def body(req: Request, text: str, finish: Optional[str], created: int) -> dict:
        return {"id": f"cmpl-{req.id}", "object": "text_completion", "created": created,
                "model": engine.model_name,
                "choices": [{"text": text, "index": 0, "logprobs": None,
                             "finish_reason": finish}]}

    def usage(req: Request) -> dict:
        n_in, n_out = len(req.prompt), len(req.output)
        return {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        try:
            ids, params, stream, _ = engine.parse(await http.body())
        except BadRequest as err:
            return _error(400, str(err), err.param)
        loop = asyncio.get_running_loop()
        req, q = engine.submit(ids, params, loop)
        created = int(time.time())
        if not stream:
            try:
                while not req.done:
                    try:
                        await asyncio.wait_for(q.get(), timeout=0.25)
                    except asyncio.TimeoutError:
                        if await http.is_disconnected():
                            engine.sched.cancel(req)
                            return _error(499, "client disconnected")
            except asyncio.CancelledError:
                engine.sched.cancel(req)
                raise
            if req.finish_reason == "error":
                return _error(500, "the request failed inside the engine", kind="server_error")
            out = body(req, req.text, req.finish_reason, created)
            out["usage"] = usage(req)
            return out

        async def events():
            sent = 0
            try:
                while True:
                    await q.get()
                    done = req.done
                    upto = len(req.text) - _hold_back(req)
                    if upto > sent:
                        delta = body(req, req.text[sent:upto], None, created)
                        yield f"data: {json.dumps(delta)}\n\n"
                        sent = upto
                    if done:
                        if req.finish_reason == "error":
                            err = {"error": {"message": "the request failed inside the engine",
                                             "type": "server_error", "param": None}}
                            yield f"data: {json.dumps(err)}\n\n"
                        else:
                            last = body(req, '', req.finish_reason, created)
                            last["usage"] = usage(req)
                            yield f"data: {json.dumps(last)}\n\n"
                        yield "data: [DONE]\n\n"
                        return
            finally:                                 # a client gone mid-stream: free its pages
                if not req.done:
                    engine.sched.cancel(req)

        return StreamingResponse(events(), media_type="text/event-stream")

    return app
