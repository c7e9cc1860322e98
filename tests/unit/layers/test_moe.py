"""MoE (tfm_jax.layers.moe, tfm_jax.layers.moe.dispatch): routing, capacity and losses vs numpy;
all_to_all and implicit dispatch == the dense reference (outputs, gradients, drops) on 8 fake
CPU devices; parameter/FLOP counts; a tiny training run whose loss falls."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn

from tfm_jax.config import ConfigError, load_config, param_counts
from tfm_jax.layers import moe as moe_lib
from tfm_jax.model import TransformerLM, count_params, train_flops_per_token
from tfm_jax.parallel import mesh as mesh_lib
from tfm_jax.layers.moe import dispatch as md

from moe_support import _np_moe as _np_moe_general, _weights  # shared references

D, F = 16, 24


def _np_softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _np_moe(x, wr, ks, top_k, cap):
    """float64 reference of one group (softmax router, no padding): x (N, d) -> (y, keep, aux,
    z); the general reference (sigmoid router, bias, padding) is in tests/moe_support.py."""
    return _np_moe_general(x, wr, ks, top_k, cap)[:4]


def test_routing_capacity_and_losses_match_numpy():
    e, k, n = 4, 2, 24
    wr, ks = _weights(e)
    x = np.random.default_rng(1).normal(size=(1, n, D)).astype(np.float32)
    cap = moe_lib.expert_capacity(n, e, k, 0.5)
    assert cap == 6                                                   # ceil(0.5 * 24 * 2 / 4)
    spec = md.MoESpec(e, k, 0.5)
    y, st = md.moe_layer(x, jnp.asarray(wr), ks, spec, strategy="dense")
    y_ref, keep, aux, z = _np_moe(x[0], wr.astype(np.float64), ks, k, cap)
    assert (~keep).sum() > 0                                          # the probe can drop
    assert int(st["dropped"]) == (~keep).sum()
    np.testing.assert_allclose(float(st["drop_fraction"]), (~keep).mean(), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(y[0]), y_ref, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(float(st["aux_loss"]), aux, rtol=1e-5)
    np.testing.assert_allclose(float(st["z_loss"]), z, rtol=1e-5)
    # uniform router -> aux loss exactly 1
    probs = jnp.full((8, e), 1 / e)
    experts = jnp.asarray(np.arange(16).reshape(8, 2) % e)
    assert float(moe_lib.load_balance_loss(probs, experts)) == pytest.approx(1.0)
    # top-1: the raw probability is the weight (the router still gets a gradient)
    r1 = moe_lib.route(jnp.asarray(x[0] @ wr), 1)
    np.testing.assert_allclose(np.asarray(r1.weights[:, 0]),
                               _np_softmax((x[0] @ wr).astype(np.float64)).max(1), rtol=1e-5)


def _mesh(shape):
    cfg = load_config(None, ["moe.n_experts=8", f"mesh.data={shape[0]}",
                             f"mesh.expert={shape[1]}"])
    return mesh_lib.make_mesh(cfg.mesh), mesh_lib.rules_tuple(cfg.mesh.rules)


@pytest.mark.parametrize("mesh_shape,n_experts,top_k", [
    ((2, 4), 8, 2), ((1, 8), 16, 1),
    pytest.param((2, 4), 8, 1, marks=pytest.mark.slow),
    pytest.param((1, 8), 16, 2, marks=pytest.mark.slow)])
def test_dispatch_strategies_equal_dense(devices, mesh_shape, n_experts, top_k):
    """Outputs, gradients and drop counts of all_to_all and implicit == dense (2 experts per
    device), with dropless capacity and with a small one (both in one compiled function)."""
    mesh, rules = _mesh(mesh_shape)
    wr, ks = _weights(n_experts, seed=top_k)
    b, t = 16, 4                                     # 8 groups of 8 tokens
    x = jnp.asarray(np.random.default_rng(2).normal(size=(b, t, D)), jnp.float32)
    cot = jnp.asarray(np.random.default_rng(3).normal(size=(b, t, D)), jnp.float32)
    specs = [md.MoESpec(n_experts, top_k, cf) for cf in (None, 0.5)]
    res = {}
    for strategy in ("dense", "all_to_all", "implicit"):
        def loss(x, wr, ks):
            outs = [md.moe_layer(x, wr, ks, spec, strategy=strategy) for spec in specs]
            return sum(jnp.sum(y * cot) * (i + 1) + st["aux_loss"] + st["z_loss"]
                       for i, (y, st) in enumerate(outs)), outs

        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            assert md.n_groups() == 8
            fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
            res[strategy] = jax.device_get(fn(x, jnp.asarray(wr), ks))
    (_, outs0), g0 = res["dense"]
    assert int(outs0[0][1]["dropped"]) == 0 and int(outs0[1][1]["dropped"]) > 0
    for strategy in ("all_to_all", "implicit"):
        (_, outs), g = res[strategy]
        for (y, st), (y0, st0) in zip(outs, outs0):
            np.testing.assert_allclose(y, y0, atol=1e-5, rtol=1e-5, err_msg=strategy)
            assert int(st["dropped"]) == int(st0["dropped"]), strategy
            for key in ("aux_loss", "z_loss", "load", "router_entropy"):
                np.testing.assert_allclose(st[key], st0[key], rtol=1e-5, err_msg=key)
        for a, r in zip(jax.tree.leaves(g), jax.tree.leaves(g0)):
            np.testing.assert_allclose(a, r, atol=1e-5, rtol=1e-4, err_msg=strategy)
    y0 = outs0[1][0]
    # the dense reference of one group per token shard equals numpy group by group
    g = 8
    xs = np.asarray(x).reshape(g, -1, D)
    cap = moe_lib.expert_capacity(xs.shape[1], n_experts, top_k, 0.5)
    ref = np.stack([_np_moe(xs[i], wr.astype(np.float64), ks, top_k, cap)[0] for i in range(g)])
    np.testing.assert_allclose(y0.reshape(g, -1, D), ref, atol=3e-5, rtol=1e-4)


def _moe_cfg(*extra):
    return load_config(None, ["model.n_layers=4", "model.d_model=32", "model.n_heads=2",
                              "model.n_kv_heads=1", "model.ffn_hidden=48", "moe.n_experts=4",
                              "moe.top_k=2", "moe.every=2", "moe.shared_expert=true",
                              "moe.expert_hidden=40", "moe.dispatch=dense", *extra])


def test_param_counts_and_flops_active_vs_total():
    cfg = _moe_cfg()
    model = TransformerLM(cfg.model, moe=cfg.moe)
    params = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0),
                                          jnp.zeros((1, 8), jnp.int32)))["params"]
    n_real = sum(x.size for x in jax.tree.leaves(params))
    counts = count_params(cfg.model, cfg.moe)
    assert counts["total"] == n_real
    assert "ffn" in params["layers_0"] and "router" not in params["layers_0"]["ffn"]  # dense
    assert set(params["layers_1"]["ffn"]) == {"router", "experts_wi_0", "experts_wi_1",
                                              "experts_wo", "shared"}
    # by hand: 2 MoE layers replace a 3*32*48 FFN with router 32*4, 4 experts / top-2 of
    # 3*32*40 and a shared 3*32*40
    dense = param_counts(cfg.model)
    per_e = 3 * 32 * 40
    assert counts["total"] - dense["total"] == 2 * (32 * 4 + 4 * per_e + per_e - 3 * 32 * 48)
    assert counts["active"] - dense["total"] == 2 * (32 * 4 + 2 * per_e + per_e - 3 * 32 * 48)
    flops = train_flops_per_token(cfg.model, 64, cfg.moe)
    assert flops - train_flops_per_token(cfg.model, 64) == 3 * 2 * (
        counts["active"] - dense["total"])
    # scan_layers (every=1): stacked blocks carry the experts with a leading layers axis
    cfg_s = _moe_cfg("moe.every=1", "model.scan_layers=true")
    ps = jax.eval_shape(TransformerLM(cfg_s.model, moe=cfg_s.moe).init, jax.random.key(0),
                        jnp.zeros((1, 8), jnp.int32))["params"]
    assert ps["layers"]["ffn"]["experts_wo"]["kernel"].value.shape == (4, 4, 40, 32)
    assert sum(x.size for x in jax.tree.leaves(ps)) == count_params(cfg_s.model,
                                                                     cfg_s.moe)["total"]


def test_moe_config_validation():
    load_config(None, ["moe.n_experts=4", "moe.dispatch=ragged", "backend.platform=cpu"])
    with pytest.raises(ConfigError, match="mesh.expert=2.*only used by MoE"):
        load_config(None, ["mesh.expert=2", "mesh.data=1"])
    with pytest.raises(ConfigError, match="moe.n_experts=6 is not divisible by mesh.expert=4"):
        load_config(None, ["moe.n_experts=6", "mesh.expert=4", "mesh.data=2"])
    with pytest.raises(ConfigError, match="moe.top_k=3 exceeds moe.n_experts=2"):
        load_config(None, ["moe.n_experts=2", "moe.top_k=3"])
    with pytest.raises(ConfigError, match="scan_layers.*moe.every=2.*n_layers=3 must be a "
                       "multiple"):
        load_config(None, ["moe.n_experts=4", "moe.every=2", "model.scan_layers=true",
                           "model.n_layers=3"])
    load_config(None, ["moe.n_experts=4", "moe.every=2", "model.scan_layers=true",
                       "model.n_layers=4"])    # groups of 2 layers (tests/unit/layers/test_moe_routing.py)
    cfg = load_config("moe-tiny")
    assert cfg.mesh.expert == 4 and cfg.moe.n_experts == 8 and cfg.moe.dispatch == "all_to_all"



def _sharded_weights(mesh, ks):
    from jax.sharding import NamedSharding
    return {n: jax.device_put(jnp.asarray(k), NamedSharding(
        mesh, nn.logical_to_mesh_axes(moe_lib.kernel_axes(n)))) for n, k in ks.items()}


@pytest.mark.parametrize("sizes", [
    pytest.param({"fsdp": 2, "tensor": 2, "expert": 2}, marks=pytest.mark.slow),  # integration
    pytest.param({"fsdp": 2, "expert": 4}, marks=pytest.mark.slow),
    pytest.param({"tensor": 2, "expert": 4}, marks=pytest.mark.slow)])
def test_fsdp_and_tensor_meshes_equal_dense(devices, sizes, monkeypatch):
    """With the experts' embed dim over fsdp and their hidden width over tensor (the rules'
    layout): all_to_all, implicit and the dropless ragged dispatch (rows exchanged in padded
    all_to_all buffers, and through ragged_all_to_all -- emulated on CPU, which lacks it) ==
    dense (outputs, gradients of input, router and experts, statistics); all_to_all and ragged
    gather each device's own
    experts over fsdp only (bytes = its E/ep experts once, not all E) and never over tensor --
    each tensor rank computes its slice of the hidden width (no duplicated expert FLOPs)."""
    from tfm_jax.tools.inspect import collectives

    e, k = 8, 2
    cfg = load_config(None, [f"moe.n_experts={e}", "mesh.data=1",
                             *(f"mesh.{a}={n}" for a, n in sizes.items())])
    mesh, rules = mesh_lib.make_mesh(cfg.mesh), mesh_lib.rules_tuple(cfg.mesh.rules)
    wr, ks = _weights(e, seed=4)
    x = jnp.asarray(np.random.default_rng(5).normal(size=(8, 4, D)), jnp.float32)
    cot = jnp.asarray(np.random.default_rng(6).normal(size=(8, 4, D)), jnp.float32)
    res, gathered = {}, {}
    for name in ("dense", "all_to_all", "implicit", "ragged", "ragged_exchange"):
        strategy = "ragged" if name.startswith("ragged") else name
        monkeypatch.setattr(md, "EXCHANGE", "ragged" if name == "ragged_exchange" else "padded")
        spec = md.MoESpec(e, k, None)

        def loss(x, wr, ks):
            y, st = md.moe_layer(x, wr, ks, spec, strategy=strategy)
            return jnp.sum(y * cot) + st["aux_loss"] + st["z_loss"], (y, st)

        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
            args = (x, jnp.asarray(wr), _sharded_weights(mesh, ks))
            compiled = fn.lower(*args).compile()
            res[name] = jax.device_get(compiled(*args))
            if name in ("all_to_all", "ragged"):
                gathered[name] = collectives(compiled.as_text())
    (_, (y0, st0)), g0 = res["dense"]
    for strategy in ("all_to_all", "implicit", "ragged", "ragged_exchange"):
        (_, (y, st)), g = res[strategy]
        np.testing.assert_allclose(y, y0, atol=1e-5, rtol=1e-5, err_msg=strategy)
        for key in ("aux_loss", "z_loss", "load", "router_entropy"):
            np.testing.assert_allclose(st[key], st0[key], rtol=1e-5, err_msg=key)
        assert int(st["dropped"]) == 0
        for a, r in zip(jax.tree.leaves(g), jax.tree.leaves(g0)):
            np.testing.assert_allclose(a, r, atol=2e-5, rtol=1e-4, err_msg=strategy)
    # per device: its E/ep experts' slice of the hidden width (F/tp), whole in d; the router
    local_experts = (sum(v.size for v in ks.values()) * 4 // sizes["expert"]
                     // sizes.get("tensor", 1) + wr.size * 4)
    for strategy, c in gathered.items():
        expect = local_experts if sizes.get("fsdp", 1) > 1 else 0
        assert c["all-gather"]["bytes"] == expect, (strategy, c["all-gather"])


def test_ragged_is_dropless_and_equals_dense_without_a_mesh():
    """moe.dispatch=ragged needs no mesh: one group, grouped GEMMs (jax.lax.ragged_dot) over
    the assignments sorted by expert == the dropless dense reference == numpy; padding tokens
    are not routed."""
    e, k = 4, 2
    wr, ks = _weights(e, seed=7)
    x = jnp.asarray(np.random.default_rng(8).normal(size=(2, 6, D)), jnp.float32)
    mask = np.ones((2, 6), bool)
    mask[0, 4:] = False
    spec = md.MoESpec(e, k, None)
    run = jax.jit(lambda x, wr, ks, m: [md.moe_layer(x, wr, ks, spec, strategy=s, token_mask=m)
                                        for s in ("ragged", "dense")])
    (y, st), (y0, st0) = run(x, jnp.asarray(wr), ks, jnp.asarray(mask))
    np.testing.assert_allclose(y, y0, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(st["counts"], st0["counts"])
    xs = np.asarray(x).reshape(-1, D)
    ref = _np_moe_general(xs, wr.astype(np.float64), ks, k, xs.shape[0],
                          valid=mask.reshape(-1))[0]
    np.testing.assert_allclose(np.asarray(y).reshape(-1, D), ref, atol=3e-5, rtol=1e-4)
    assert int(st["dropped"]) == 0 and not np.asarray(y)[0, 4:].any()
