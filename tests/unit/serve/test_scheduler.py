"""Continuous batching: under greedy sampling every request gets the tokens it gets decoding
alone (tfm_jax.generate.generate, temperature 0) -- with requests arriving at different steps,
chunked prefill, and a page budget small enough to force preemption; seeded sampling independent
of the batch; stop ids / strings; cancel frees pages; one compilation per step kind; the numpy
sampler against its definition."""

import functools

import numpy as np
import pytest

from serve_support import V, cfg_of, model_and_vars
from tfm_jax.generate import generate, make_decoder
from tfm_jax.serve import SamplingParams, Scheduler, sample

MAX_LEN = 32


@functools.lru_cache(maxsize=None)
def setup(kv_heads=2):
    model, variables = model_and_vars(cfg_of(kv_heads, scan_layers=True))
    return model, variables, make_decoder(model, batch=1, max_len=MAX_LEN)


@functools.lru_cache(maxsize=None)
def _alone(prompt, kv_heads):
    model, variables, dec = setup(kv_heads)
    return [int(t) for t in generate(dec, variables, [list(prompt)], max_new_tokens=10).tokens[0]]


def alone(prompt, max_tokens, kv_heads=2):
    """The greedy tokens of ``prompt`` decoded by itself (batch 1); greedy decoding is
    prefix-consistent, so one compiled length (10 new tokens) serves every max_tokens <= 10."""
    assert max_tokens <= 10
    return _alone(tuple(int(t) for t in prompt), kv_heads)[:max_tokens]


def prompts(n, seed=0):
    """Prompts of 4 or 9 tokens (two compiled reference shapes): 9 spans chunk boundaries."""
    r = np.random.default_rng(seed)
    return [[int(t) for t in r.integers(0, V, int(r.choice([4, 9])))] for _ in range(n)]


def test_greedy_continuous_batching_equals_decoding_alone_with_preemption():
    model, variables, _ = setup()
    # 8 usable pages of 4 = 32 positions for 6 requests of up to 11 + 10 positions: the
    # decodes run out of pages, so the youngest are preempted and recomputed
    sched = Scheduler(model, variables, slots=3, num_pages=9, page_size=4, chunk=5,
                      max_len=MAX_LEN)
    ps = prompts(6)
    max_tokens = [10, 7, 10, 4, 9, 10]
    arrive = [0, 0, 1, 3, 6, 6]               # the step each request is submitted at
    reqs = {}
    step = 0
    while len(reqs) < len(ps) or sched.has_work():
        for i, a in enumerate(arrive):
            if a == step:
                reqs[i] = sched.submit(ps[i], SamplingParams(max_tokens=max_tokens[i]))
        sched.step()
        assert sched.pages_used <= 8
        step += 1
        assert step < 500
    assert sched.preemptions > 0                              # the budget forced preemption
    for i, p in enumerate(ps):
        assert reqs[i].finish_reason == "length"
        assert reqs[i].output == alone(p, max_tokens[i]), i
    assert sched.pages_used == 0 and not any(sched.slot_of)
    assert sched.traces == {"decode": 1, "prefill": 1}       # no recompilation per request


def test_seeded_sampling_does_not_depend_on_the_batch():
    model, variables, _ = setup()
    params = SamplingParams(max_tokens=8, temperature=0.9, top_k=20, top_p=0.9, seed=7)
    one = Scheduler(model, variables, slots=3, num_pages=9, page_size=4, chunk=5,
                    max_len=MAX_LEN)
    a = one.submit(prompts(1, seed=3)[0], params)
    one.run()
    crowd = Scheduler(model, variables, slots=3, num_pages=9, page_size=4, chunk=5,
                      max_len=MAX_LEN)
    others = [crowd.submit(p, SamplingParams(max_tokens=9)) for p in prompts(3, seed=4)]
    b = crowd.submit(prompts(1, seed=3)[0], params)
    crowd.run()
    assert a.output == b.output and len(a.output) == 8
    assert all(o.done for o in others)
    c = crowd.submit(prompts(1, seed=3)[0], SamplingParams(**{**params.__dict__, "seed": 8}))
    crowd.run()
    assert c.output != a.output                   # the seed matters


def test_stop_ids_stop_strings_and_cancel():
    model, variables, _ = setup()
    p = prompts(1, seed=5)[0]
    ref = alone(p, 10)
    detok = lambda ids: "".join(chr(ord("a") + t % 26) for t in ids)   # noqa: E731
    sched = Scheduler(model, variables, slots=3, num_pages=9, page_size=4, chunk=5,
                      max_len=MAX_LEN, detokenize=detok)
    by_id = sched.submit(p, SamplingParams(max_tokens=10, stop_ids=(ref[3],)))
    stop = detok(ref[4:6])
    by_str = sched.submit(p, SamplingParams(max_tokens=10, stop=(stop,)))
    gone = sched.submit(p, SamplingParams(max_tokens=10))
    sched.step()
    sched.step()
    sched.cancel(gone)
    sched.run()
    first = ref.index(ref[3])
    assert by_id.finish_reason == "stop" and by_id.output == ref[:first]
    cut = detok(ref).find(stop)
    assert by_str.finish_reason == "stop" and by_str.text == detok(ref)[:cut]
    assert gone.finish_reason == "cancelled" and len(gone.output) < 10
    assert sched.pages_used == 0


def test_submit_rejects_what_can_never_run():
    model, variables, _ = setup()
    sched = Scheduler(model, variables, slots=1, num_pages=9, page_size=4, max_len=MAX_LEN)
    with pytest.raises(ValueError, match="max_tokens"):
        sched.submit([1, 2], SamplingParams(max_tokens=0))
    with pytest.raises(ValueError, match="context"):
        sched.submit([1] * 30, SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="top_p"):
        sched.submit([1], SamplingParams(top_p=0.0))
    with pytest.raises(ValueError, match="pages"):
        Scheduler(model, variables, slots=1, num_pages=8, page_size=4, max_len=MAX_LEN)


def test_sample_top_k_top_p_support():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    rng = np.random.default_rng(0)
    seen = {sample(logits, SamplingParams(temperature=1.0, top_k=2), rng) for _ in range(200)}
    assert seen == {0, 1}
    # nucleus 0.7: 0.5 does not reach it, 0.5 + 0.3 does -> {0, 1}
    seen = {sample(logits, SamplingParams(temperature=1.0, top_p=0.7), rng) for _ in range(200)}
    assert seen == {0, 1}
    seen = {sample(logits, SamplingParams(temperature=1.0, top_p=0.81), rng) for _ in range(300)}
    assert seen == {0, 1, 2}
    counts = np.bincount([sample(logits, SamplingParams(temperature=1.0), rng)
                          for _ in range(4000)], minlength=4) / 4000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    assert sample(logits, SamplingParams(), rng) == 0


def test_kv_memory_sizes_parse():
    from tfm_jax.cli import parse_bytes
    from tfm_jax.config import ConfigError

    assert parse_bytes("2GiB") == 2 * 2**30 and parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes("1.5GB") == 1_500_000_000 and parse_bytes("4096") == 4096
    for bad in ("2 parsecs", "GiB", "-1MiB"):
        with pytest.raises(ConfigError, match="--kv-memory"):
            parse_bytes(bad)
