"""Sampling: ``tfm_jax.generate.sample_logits`` against its definition (greedy = argmax;
temperature T samples softmax(logits / T); top-k samples that softmax renormalised over the k
largest logits; top-p over the smallest most-probable set whose mass reaches p), checked on
empirical distributions of many draws with a chi-square bound."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tfm_jax.generate import sample_logits

N_DRAWS = 40_000
# Chi-square quantile for p = 1e-4 by degrees of freedom (a correct sampler with fixed keys
# fails this about once in 10^4 seeds; a wrong distribution exceeds it by orders of magnitude).
CHI2_1E4 = {1: 15.14, 2: 18.42, 3: 21.11, 4: 23.51, 5: 25.74, 6: 27.86, 7: 29.88}


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _draws(logits, temperature, top_k, seed=0, top_p=1.0):
    """N_DRAWS independent samples for one row of logits (a batch of identical rows)."""
    batch = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (N_DRAWS, len(logits)))
    ids = np.asarray(sample_logits(batch, jax.random.key(seed), temperature, top_k, top_p))
    assert ids.shape == (N_DRAWS,)
    return np.bincount(ids, minlength=len(logits))


def _chi2(counts, probs):
    expected = probs * counts.sum()
    keep = expected > 0
    return float(np.sum((counts[keep] - expected[keep]) ** 2 / expected[keep]))


LOGITS = np.array([1.5, 0.2, -0.7, 2.1, 0.9, -1.8, 0.0, 1.1])


def test_greedy_is_argmax():
    logits = np.random.default_rng(0).standard_normal((64, 50)).astype(np.float32)
    for top_k in (0, 5):
        got = sample_logits(jnp.asarray(logits), jax.random.key(1), 0.0, top_k)
        np.testing.assert_array_equal(np.asarray(got), logits.argmax(-1))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_samples_softmax_of_scaled_logits(temperature):
    counts = _draws(LOGITS, temperature, 0)
    target = _softmax(LOGITS / temperature)
    assert _chi2(counts, target) < CHI2_1E4[7], (counts / N_DRAWS, target)
    # the same statistic rejects the unscaled distribution: the check can tell T apart
    if temperature != 1.0:
        assert _chi2(counts, _softmax(LOGITS)) > 10 * CHI2_1E4[7]


@pytest.mark.parametrize("top_k,temperature", [(3, 1.0), (5, 0.7), (1, 1.0)])
def test_top_k_keeps_only_the_k_largest_renormalised(top_k, temperature):
    counts = _draws(LOGITS, temperature, top_k, seed=3)
    top = np.argsort(LOGITS)[::-1][:top_k]
    outside = np.setdiff1d(np.arange(len(LOGITS)), top)
    assert counts[outside].sum() == 0, counts          # no mass outside the top k
    target = np.zeros(len(LOGITS))
    target[top] = _softmax(LOGITS[top] / temperature)   # renormalised within the top k
    if top_k == 1:
        assert counts[top[0]] == N_DRAWS
    else:
        assert _chi2(counts, target) < CHI2_1E4[top_k - 1], (counts / N_DRAWS, target)


def _nucleus(probs, top_p):
    """Reference nucleus: indices of the most probable tokens, in order, until their mass
    reaches top_p (the token that crosses it included)."""
    order = np.argsort(probs)[::-1]
    mass, keep = 0.0, []
    for i in order:
        keep.append(i)
        mass += probs[i]
        if mass >= top_p:
            break
    return np.asarray(keep)


@pytest.mark.parametrize("top_p,temperature,top_k", [(0.5, 1.0, 0), (0.8, 0.7, 0),
                                                     (0.75, 1.0, 3), (0.05, 1.0, 0)])
def test_top_p_keeps_the_nucleus_renormalised(top_p, temperature, top_k):
    probs = _softmax(LOGITS / temperature)
    if top_k:                                     # top-k first, then the nucleus of the rest
        top = np.argsort(LOGITS)[::-1][:top_k]
        probs = np.zeros_like(probs)
        probs[top] = _softmax(LOGITS[top] / temperature)
    keep = _nucleus(probs, top_p)
    counts = _draws(LOGITS, temperature, top_k, seed=7, top_p=top_p)
    outside = np.setdiff1d(np.arange(len(LOGITS)), keep)
    assert counts[outside].sum() == 0, (counts, keep)     # no mass outside the nucleus
    target = np.zeros(len(LOGITS))
    target[keep] = probs[keep] / probs[keep].sum()
    if len(keep) == 1:
        assert counts[keep[0]] == N_DRAWS
    else:
        assert _chi2(counts, target) < CHI2_1E4[len(keep) - 1], (counts / N_DRAWS, target)
    # the nucleus really truncates here (p < 1 drops tokens the plain softmax would sample)
    assert len(keep) < (top_k or len(LOGITS))


def test_top_p_one_is_no_truncation_and_bad_values_are_refused():
    a = _draws(LOGITS, 1.0, 0, seed=11)
    b = _draws(LOGITS, 1.0, 0, seed=11, top_p=1.0)
    np.testing.assert_array_equal(a, b)
    for bad in (dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1), dict(temperature=-0.1)):
        kw = {**dict(temperature=1.0, top_k=0, top_p=1.0), **bad}
        with pytest.raises(ValueError, match="top_p|top_k|temperature"):
            sample_logits(jnp.zeros((1, 4)), jax.random.key(0), **kw)
