"""MoE routing details (tfm_jax.layers.moe): the sigmoid router with its aux-loss-free balancing
bias and padding tokens (not routed, not counted) against the numpy reference, single-device and
sharded. (Through the train step: tests/integration/test_moe_train_step.py.)"""

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn

from tfm_jax.layers import moe as moe_lib
from tfm_jax.layers.moe import dispatch as md

from moe_support import D, _mesh, _np_moe, _weights



def test_sigmoid_router_with_bias_matches_numpy():
    """Selection on s + b, weights from the un-biased s renormalised over the chosen k."""
    e, k, n = 6, 2, 30
    wr, ks = _weights(e, seed=4)
    x = np.random.default_rng(5).normal(size=(1, n, D)).astype(np.float32)
    bias = np.array([0.3, -0.2, 0.0, 0.15, -0.4, 0.1], np.float32)
    cap = moe_lib.expert_capacity(n, e, k, 0.75)
    spec = md.MoESpec(e, k, 0.75, router="sigmoid")
    y, st = md.moe_layer(x, jnp.asarray(wr), ks, spec, strategy="dense",
                         router_bias=jnp.asarray(bias))
    y_ref, keep, aux, z, counts = _np_moe(x[0], wr.astype(np.float64), ks, k, cap,
                                          router="sigmoid", bias=bias.astype(np.float64))
    # the bias changes the choice (the probe can fail): without it the experts differ
    _, _, _, _, counts0 = _np_moe(x[0], wr.astype(np.float64), ks, k, cap, router="sigmoid")
    assert not np.array_equal(counts, counts0)
    assert (~keep).sum() > 0
    np.testing.assert_allclose(np.asarray(y[0]), y_ref, atol=2e-5, rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(st["counts"]), counts)
    assert int(st["dropped"]) == (~keep).sum()
    np.testing.assert_allclose(float(st["aux_loss"]), aux, rtol=1e-5)
    np.testing.assert_allclose(float(st["z_loss"]), z, rtol=1e-5)
    # the bias gets no gradient through the routing (selection only)
    g = jax.grad(lambda b: jnp.sum(md.moe_layer(x, jnp.asarray(wr), ks, spec,
                                                router_bias=b)[0]))(jnp.asarray(bias))
    assert not np.any(np.asarray(g))
    # the update rule: b += rate * sign(mean - load)
    np.testing.assert_allclose(
        np.asarray(moe_lib.balance_bias_update(jnp.asarray(bias), jnp.asarray(counts), 1e-2)),
        bias + np.float32(1e-2) * np.sign(counts.mean() - counts).astype(np.float32),
        rtol=0, atol=0)
    with pytest.raises(ValueError, match="balancing bias"):
        md.moe_layer(x, jnp.asarray(wr), ks, md.MoESpec(e, k, 0.75), router_bias=bias)


def test_padding_is_not_routed_nor_counted():
    """Padding takes no capacity and counts in no statistic: real tokens' outputs and every
    statistic equal the numpy reference that skips padding, whatever the padding holds."""
    e, k, n = 4, 2, 24
    wr, ks = _weights(e, seed=6)
    rng = np.random.default_rng(7)
    x = rng.normal(size=(1, n, D)).astype(np.float32)
    valid = np.ones(n, bool)
    valid[::3] = False                                   # 8 padding positions, interleaved
    cap = moe_lib.expert_capacity(n, e, k, 0.5)
    spec = md.MoESpec(e, k, 0.5)
    x2 = x.copy()
    x2[0, ~valid] = 5 * wr[:, 0] / np.linalg.norm(wr[:, 0])   # padding that loves expert 0
    outs = [md.moe_layer(xx, jnp.asarray(wr), ks, spec, token_mask=jnp.asarray(valid[None]))
            for xx in (x, x2)]
    y_ref, keep, aux, z, counts = _np_moe(x[0], wr.astype(np.float64), ks, k, cap, valid=valid)
    assert (~keep[valid]).sum() > 0                       # some real drops remain
    for y, st in outs:
        np.testing.assert_allclose(np.asarray(y[0]), y_ref, atol=2e-5, rtol=1e-4)
        assert not np.any(np.asarray(y[0])[~valid])
        assert int(st["dropped"]) == (~keep[valid]).sum()
        np.testing.assert_allclose(float(st["drop_fraction"]), (~keep[valid]).mean(), rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(st["counts"]), counts)
        np.testing.assert_allclose(float(st["aux_loss"]), aux, rtol=1e-5)
        np.testing.assert_allclose(float(st["z_loss"]), z, rtol=1e-5)
    # without the mask the loud padding would take expert 0's slots (the probe can fail)
    y_nomask, _ = md.moe_layer(x2, jnp.asarray(wr), ks, spec)
    assert not np.allclose(np.asarray(y_nomask[0])[valid], y_ref[valid], atol=1e-3)


def test_sigmoid_and_padding_sharded_equal_dense(devices):
    """all_to_all and implicit == dense with the sigmoid router, a bias and padding (data 2 x
    expert 4): outputs, gradients, counts, drops."""
    mesh, rules = _mesh((2, 4))
    e, k = 8, 2
    wr, ks = _weights(e, seed=8)
    b, t = 16, 4
    rng = np.random.default_rng(9)
    x = jnp.asarray(rng.normal(size=(b, t, D)), jnp.float32)
    cot = jnp.asarray(rng.normal(size=(b, t, D)), jnp.float32)
    mask = jnp.asarray(rng.random((b, t)) > 0.3)
    bias = jnp.asarray(rng.normal(0, 0.2, e), jnp.float32)
    spec = md.MoESpec(e, k, 0.5, router="sigmoid")
    res = {}
    for strategy in ("dense", "all_to_all", "implicit"):
        def loss(x, wr, ks):
            y, st = md.moe_layer(x, wr, ks, spec, strategy=strategy, token_mask=mask,
                                 router_bias=bias)
            return jnp.sum(y * cot) + st["aux_loss"] + st["z_loss"], (y, st)

        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
            res[strategy] = jax.device_get(fn(x, jnp.asarray(wr), ks))
    (_, (y0, st0)), g0 = res["dense"]
    assert int(st0["dropped"]) > 0
    for strategy in ("all_to_all", "implicit"):
        (_, (y, st)), g = res[strategy]
        np.testing.assert_allclose(y, y0, atol=1e-5, rtol=1e-5, err_msg=strategy)
        np.testing.assert_array_equal(st["counts"], st0["counts"])
        assert int(st["dropped"]) == int(st0["dropped"])
        for a, r in zip(jax.tree.leaves(g), jax.tree.leaves(g0)):
            np.testing.assert_allclose(a, r, atol=1e-5, rtol=1e-4, err_msg=strategy)
    # numpy, group by group (8 groups: data 2 x expert 4)
    xs, ms = np.asarray(x).reshape(8, -1, D), np.asarray(mask).reshape(8, -1)
    cap = moe_lib.expert_capacity(xs.shape[1], e, k, 0.5)
    refs = [_np_moe(xs[i], wr.astype(np.float64), ks, k, cap, router="sigmoid",
                    bias=np.asarray(bias, np.float64), valid=ms[i]) for i in range(8)]
    np.testing.assert_allclose(y0.reshape(8, -1, D), np.stack([r[0] for r in refs]),
                               atol=3e-5, rtol=1e-4)
    np.testing.assert_array_equal(st0["counts"], sum(r[4] for r in refs))


def test_sigmoid_top1_router_gets_a_task_gradient():
    """Sigmoid router, top_k = 1: the weight is the raw score (renormalised it would be exactly
    1 and the router would learn nothing from the task loss). The router gradient of the task
    loss alone (no auxiliary losses) is nonzero and equals central differences of the float64
    numpy reference."""
    e = 4
    wr, ks = _weights(e, seed=21)
    x = np.random.default_rng(22).normal(size=(1, 8, D)).astype(np.float32)
    cot = np.random.default_rng(23).normal(size=(8, D))
    spec = md.MoESpec(e, 1, None, router="sigmoid")

    def task(wr):
        y, _ = md.moe_layer(jnp.asarray(x), wr, ks, spec, strategy="dense",
                            router_bias=jnp.zeros((e,)))
        return jnp.sum(y[0] * cot)

    g = np.asarray(jax.jit(jax.grad(task))(jnp.asarray(wr)))
    assert np.abs(g).max() > 1e-3

    def ref(w):
        return np.sum(_np_moe(x[0], w, ks, 1, 8, router="sigmoid")[0] * cot)

    w64, h = wr.astype(np.float64), 1e-6
    for i, j in [(0, 0), (3, 1), (7, 2), (15, 3)]:
        wp, wm = w64.copy(), w64.copy()
        wp[i, j] += h
        wm[i, j] -= h
        assert g[i, j] == pytest.approx((ref(wp) - ref(wm)) / (2 * h), rel=2e-3, abs=1e-5)
