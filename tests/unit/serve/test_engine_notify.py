"""Engine.submit's token notifications are coalesced: a burst of tokens while the event loop is
busy puts one ``None`` in the request's queue, never one per token, and no news is lost (a token
after the reader woke gets a new ``None``). Needs the [serve] extra (fastapi)."""

import asyncio
import threading

import pytest

pytest.importorskip("fastapi", reason="needs the [serve] extra")

from tfm_jax.serve.server import Engine  # noqa: E402


class _Sched:
    def submit(self, ids, params, on_token):
        self.on_token = on_token
        return object()


def test_burst_of_tokens_is_one_wakeup_and_later_news_is_kept():
    sched = _Sched()
    engine = Engine(sched, tokenizer=None)
    loop = asyncio.new_event_loop()
    try:
        req, q = engine.submit([1, 2], None, loop)

        def burst(n):
            for _ in range(n):
                sched.on_token(req)

        t = threading.Thread(target=burst, args=(200,))     # the loop is not running: busy
        t.start()
        t.join()
        loop.run_until_complete(asyncio.sleep(0))           # the scheduled callbacks run
        assert q.qsize() == 1
        loop.run_until_complete(q.get())                    # the reader takes the news
        assert q.qsize() == 0
        burst(3)                                            # later tokens: news again
        loop.run_until_complete(asyncio.sleep(0))
        assert q.qsize() == 1
    finally:
        loop.close()
