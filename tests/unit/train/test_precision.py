"""The mixed-precision policy: stochastic rounding against ml_dtypes' bf16 neighbours and the
policy from config. (Train steps with bf16 parameters: tests/integration/test_mixed_precision.py.)"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from tfm_jax.config import ConfigError, load_config
from tfm_jax.train import precision

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


def test_bf16_step_lowered_for_gpu_has_only_bf16_gemms():
    """The 2-layer bf16 step lowered with the GPU op set: no dot with a float32 operand (the
    score einsum's dQ/dK and the head's backward included). Every structure, remat policy and
    attention core: tests/integration/test_mixed_precision.py."""
    from tfm_jax.tools.inspect import dot_dtypes, lower_step

    cfg = load_config(None, ["model.d_model=32", "model.n_layers=2", "model.n_heads=4",
                             "model.n_kv_heads=2", "model.multiple_of=16", "data.seq_len=32",
                             "train.batch_size=2", "model.dtype=bfloat16",
                             "model.attn_block_q=16"])
    dots = dot_dtypes(lower_step(cfg, "gpu"))
    assert len(dots) > 40
    assert all(d[:2] == ("bf16", "bf16") for d in dots), [d for d in dots if "f32" in d[:2]]


def test_evaluate_dispatches_every_batch_before_one_sync():
    """``evaluate`` reads no batch's result on the host before the last batch is dispatched."""
    import contextlib
    import types

    from tfm_jax.train import evaluate

    cfg = load_config(None, ["data.seq_len=8", "train.batch_size=2", "train.eval_batches=4"])
    events = []

    class Lazy:                      # a device scalar: reading it is a host sync
        def __init__(self, v):
            self.v = v

        def __float__(self):
            events.append("sync")
            return float(self.v)

    def eval_step(state, batch):
        events.append("dispatch")
        return Lazy(3.0 * batch["mask"].sum()), Lazy(batch["mask"].sum())

    setup = types.SimpleNamespace(cfg=cfg, context=contextlib.nullcontext,
                                  shard_batch=lambda b: b, eval_step=eval_step,
                                  eval_state=lambda s: s)
    out = evaluate(setup, None, np.arange(200, dtype=np.int32) % 7)
    assert events.count("dispatch") == 4
    assert events.index("sync") > max(i for i, e in enumerate(events) if e == "dispatch")
    assert out["val_loss"] == pytest.approx(3.0)
