"""Greedy speculative decoding equals the target's greedy decoding alone (tfm_jax.generate), with a
different draft (rejections and rollbacks) and with the target as its own draft (everything
accepted: one target call per k + 1 tokens). Integration tier: seven compilations, ~8 s."""

import numpy as np
import pytest

from serve_support import V, cfg_of, model_and_vars
from tfm_jax.generate import generate, make_decoder
from tfm_jax.serve.speculative import speculative_generate

N = 12


def test_speculative_equals_target_greedy():
    target, tv = model_and_vars(cfg_of(2, scan_layers=True))
    draft, dv = model_and_vars(cfg_of(1, scan_layers=True, n_layers=1), seed=1)
    prompt = [int(t) for t in np.random.default_rng(0).integers(0, V, 6)]
    want = [int(t) for t in generate(make_decoder(target, batch=1, max_len=24), tv, [prompt],
                                     max_new_tokens=N).tokens[0]]
    got = speculative_generate(target, tv, draft, dv, prompt, max_new_tokens=N, k=3,
                               warmup=False)
    assert got.tokens == want
    assert got.accepted < got.proposed                 # a different draft: some rejected
    same = speculative_generate(target, tv, target, tv, prompt, max_new_tokens=N, k=3,
                                warmup=False)
    assert same.tokens == want
    assert same.accepted == same.proposed              # its own draft: all accepted
    assert same.target_calls == 1 + -(-(N - 1) // 4)   # prefill + one call per k + 1 tokens


def test_speculative_rejects_a_foreign_vocabulary():
    target, tv = model_and_vars(cfg_of(2, scan_layers=True))
    draft, dv = model_and_vars(cfg_of(2, scan_layers=True, vocab_size=V * 2))
    with pytest.raises(ValueError, match="vocabulary"):
        speculative_generate(target, tv, draft, dv, [1, 2], max_new_tokens=4)
