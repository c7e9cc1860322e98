"""The mixed-precision policy: stochastic rounding against ml_dtypes' bf16 neighbours, the
policy from config, and one train step with bf16 parameters in each policy cross-checked
against the others (the master copy's cast is the nearest-even update, bit for bit)."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from tfm_jax.config import ConfigError, load_config
from tfm_jax.train import build, precision
from train_support import small_cfg

ONE_LAYER = ["model.n_layers=1", "data.seq_len=16", "train.batch_size=4", "train.warmup_steps=0"]


def test_stochastic_round_bf16_is_unbiased_between_neighbours():
    rng = np.random.default_rng(0)
    x = rng.normal(size=8).astype(np.float32) * np.float32(10.0) ** rng.integers(-3, 3, 8)
    lo = x.astype(ml_dtypes.bfloat16)                      # nearest; make it the lower one
    lo = np.where(lo.astype(np.float32) > x, np.nextafter(lo, lo - 1), lo)
    hi = np.nextafter(lo, lo + 1)   # (ml_dtypes: nextafter steps one bf16 ulp)
    lo32, hi32 = lo.astype(np.float32), hi.astype(np.float32)
    assert np.all((lo32 <= x) & (x < hi32))
    n = 4000
    keys = jax.random.split(jax.random.key(1), n)
    y = np.asarray(jax.vmap(lambda k: precision.stochastic_round_bf16(jnp.asarray(x), k))(keys)
                   ).astype(np.float32)
    assert np.all((y == lo32) | (y == hi32))
    p = (x - lo32) / (hi32 - lo32)                         # P(round up)
    freq = (y == hi32).mean(0)
    assert np.all(np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1e-3), (freq, p)
    # representable values, signs, infinities: unchanged
    exact = jnp.asarray([1.0, -2.5, 0.0, np.inf, -np.inf], jnp.float32)
    np.testing.assert_array_equal(
        np.asarray(precision.stochastic_round_bf16(exact, jax.random.key(0)), np.float32), exact)


def test_policy_from_config():
    pol = precision.policy(load_config(None, ["model.dtype=bfloat16"]).model)
    assert (pol.compute, pol.param, pol.master) == (jnp.bfloat16, jnp.float32, False)
    assert not pol.low_precision_params
    bf = ["model.dtype=bfloat16", "model.param_dtype=bfloat16"]
    assert precision.policy(load_config(None, bf).model).master          # auto -> float32
    pol = precision.policy(load_config(None, bf + ["model.master_weights=none"]).model)
    assert not pol.master and pol.rounding == "stochastic"
    with pytest.raises(ConfigError, match="master_weights=none needs"):
        load_config(None, ["model.master_weights=none"])


def _one_step(tmp_path, *extra):
    cfg = small_cfg(tmp_path, *ONE_LAYER, "model.dtype=bfloat16", "model.param_dtype=bfloat16",
                    *extra)
    setup = build(cfg, jax.devices()[:1])
    state = setup.init_state()
    rng = np.random.default_rng(0)
    toks = rng.integers(0, 256, (4, 17)).astype(np.int32)
    batch = setup.shard_batch({"inputs": toks[:, :-1], "targets": toks[:, 1:],
                               "mask": np.ones((4, 16), np.float32)})
    before = jax.device_get(state.params)        # (the step donates the state)
    with setup.context():
        new, m = setup.train_step(state, batch)
    assert bool(m["finite"])
    return before, new


def test_bf16_parameters_train_in_each_policy(tmp_path):
    s0, master = _one_step(tmp_path, "model.master_weights=float32")
    _, nearest = _one_step(tmp_path, "model.master_weights=none", "model.param_rounding=nearest")
    _, stoch = _one_step(tmp_path, "model.master_weights=none", "model.param_rounding=stochastic")
    leaves = lambda s: jax.tree.leaves(jax.device_get(getattr(s, "params", s)))   # noqa: E731
    assert {x.dtype for x in leaves(master)} == {jnp.dtype(jnp.bfloat16)}
    # master copy: float32, its cast is the parameters, and it moved
    m32 = jax.tree.leaves(jax.device_get(master.opt_state.master))
    assert {x.dtype for x in m32} == {jnp.dtype(jnp.float32)}
    for p, m in zip(leaves(master), m32):
        np.testing.assert_array_equal(p, m.astype(ml_dtypes.bfloat16))
    assert any(not np.array_equal(a, b) for a, b in zip(leaves(master), leaves(s0)))
    # moments in float32 (not the parameter dtype)
    moments = [x for x in jax.tree.leaves(jax.device_get(master.opt_state.inner))
               if getattr(x, "ndim", 0) >= 1]
    assert moments and {x.dtype for x in moments} == {jnp.dtype(jnp.float32)}
    # first step from the same bf16 start (the master copy starts equal to the parameters):
    # the cast of the master p + u is the nearest-even rounding of p + u, bit for bit
    for a, b in zip(leaves(master), leaves(nearest)):
        np.testing.assert_array_equal(a, b)
    # stochastic: within one bf16 ulp of the float32 value p + u, not always the nearest one
    same = total = 0
    for s, m in zip(leaves(stoch), m32):
        cast = m.astype(ml_dtypes.bfloat16)
        ulp = np.abs(np.nextafter(cast, np.inf).astype(np.float32) - cast.astype(np.float32))
        assert np.all(np.abs(s.astype(np.float32) - m) <= ulp)
        same += int(np.sum(s == cast))
        total += m.size
    assert 0.3 * total < same < total, (same, total)
