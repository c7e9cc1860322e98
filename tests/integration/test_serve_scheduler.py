"""The scheduler on int8 / fp8 pages of an unscanned model (one page pool per layer, scales
donated with the pages): greedy output equal to decoding alone with the same quantized contiguous
cache (tfm_jax.generate). Integration tier: several compilations."""

import numpy as np
import pytest

from serve_support import V, cfg_of, model_and_vars
from tfm_jax.generate import generate, make_decoder
from tfm_jax.serve import SamplingParams, Scheduler


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_quantized_pages_unscanned_equal_decoding_alone(fmt):
    model, variables = model_and_vars(cfg_of(2, scan_layers=False))
    r = np.random.default_rng(0)
    prompts = [[int(t) for t in r.integers(0, V, 7)] for _ in range(4)]
    dec = make_decoder(model, batch=1, max_len=24, kv_cache=fmt)
    want = [[int(t) for t in generate(dec, variables, [p], max_new_tokens=8).tokens[0]]
            for p in prompts]
    sched = Scheduler(model, variables, slots=2, num_pages=7, page_size=4, chunk=4,
                      max_len=24, kv_cache=fmt)
    reqs = [sched.submit(p, SamplingParams(max_tokens=8)) for p in prompts]
    sched.run()
    assert [q.output for q in reqs] == want
    assert sched.preemptions > 0 and sched.pages_used == 0
