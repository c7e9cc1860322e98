"""MoE through the model and the train step: the balancing bias's sign step, scan_layers over
groups of moe.every layers (== unscanned), the aux/z losses under grad_accum, a batch not
divisible by the token shards, the ablation measurement."""

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn

from tfm_jax.core import roles as param_roles, telemetry
from tfm_jax.config import load_config
from tfm_jax.layers import moe as moe_lib
from tfm_jax.model import TransformerLM
from tfm_jax.layers.moe import dispatch as md

from moe_support import D, _mesh, _weights


# --------------------------------------------------------------------------------------------
# Through the train step.

_TINY = ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1",
         "model.ffn_hidden=32", "data.seq_len=16", "train.batch_size=16",
         "train.warmup_steps=0", "moe.n_experts=4", "moe.top_k=2", "moe.every=1",
         "mesh.data=2", "mesh.expert=4"]


def _batch(setup, b=16, t=16, seed=0, pad_rows=0):
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, 259, (b, t + 1))
    mask = np.ones((b, t), np.float32)
    if pad_rows:
        mask[:pad_rows, t // 2:] = 0
    return setup.shard_batch({"inputs": toks[:, :-1].astype(np.int32),
                              "targets": toks[:, 1:].astype(np.int32), "mask": mask})


def _setup(devices, tmp_path, *extra):
    from tfm_jax import train as train_lib

    cfg = load_config(None, [*_TINY, f"run.dir={tmp_path}", *extra])
    return train_lib.build(cfg, devices)


def _bias_paths(params):
    return [(p, x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
            if param_roles.param_role(p) == "balance"]


def test_balance_bias_evens_a_skewed_load():
    """Skewed input (every token leans towards expert 0): the bias rule alone (router fixed)
    brings the max load down towards the mean within a few updates."""
    e, k, n, rate = 4, 1, 64, 0.05
    wr, ks = _weights(e, seed=10)
    u = np.random.default_rng(11).normal(size=D)
    u /= np.linalg.norm(u)
    wr[:, 0] += 2.0 * u
    x = jnp.asarray(np.random.default_rng(12).normal(0, 0.3, (1, n, D)) + u, jnp.float32)
    spec = md.MoESpec(e, k, None, router="sigmoid")
    step = jax.jit(lambda b: md.moe_layer(x, jnp.asarray(wr), ks, spec, router_bias=b)[1])
    b, loads = jnp.zeros(e, jnp.float32), []
    for _ in range(30):
        st = step(b)
        loads.append(float(st["load_max"]))
        b = moe_lib.balance_bias_update(b, st["counts"], rate)
    assert loads[0] > 2.0, loads                         # skewed: 1 = balanced, 4 = one expert
    # (a fixed-size sign step then oscillates around balance: DeepSeek-V3's rule, not a bug)
    assert max(loads[-10:]) <= 2.0 and np.mean(loads[-10:]) < loads[0] / 2, loads
    assert float(b[0]) < 0 and float(b[0]) == min(np.asarray(b))


def test_balance_bias_train_step(devices, tmp_path):
    """The bias is a 'balance' leaf: no optimizer moments; one step sets exactly b + rate *
    sign(mean load - load) whatever lr / decay / clip do (the load read back from the model's
    own telemetry, padding excluded); grad_accum=2 (load summed over micro-batches) gives the
    same bias."""
    from tfm_jax.train import input_mask

    rate = 0.05
    common = ["moe.router=sigmoid", f"moe.bias_update_rate={rate}", "moe.dispatch=all_to_all",
              "moe.capacity_factor=null"]
    setup = _setup(devices, tmp_path, *common, "train.lr=1e-1", "train.weight_decay=10",
                   "train.grad_clip=1e-3")
    state = setup.init_state()
    biases = _bias_paths(state.params)
    assert len(biases) == 2 and all(x.shape == (4,) for _, x in biases)
    # no AdamW moments for the bias (set_to_zero partition)
    assert not any(getattr(x, "shape", None) == (4,) for x in jax.tree.leaves(state.opt_state))
    batch = _batch(setup, pad_rows=4)
    tmask = input_mask(batch["mask"])
    kernel0 = np.asarray(state.params["layers_0"]["ffn"]["router"]["kernel"])  # (state donated)
    with setup.context():
        sown = jax.jit(lambda p, b: setup.model.apply(
            {"params": p}, b["inputs"], token_mask=tmask, train=True,
            mutable=list(telemetry.COLLECTIONS))[1])(state.params, batch)
        new, m = setup.train_step(state, batch)
    tel = telemetry.flatten(jax.device_get(sown))
    n_assign = float(np.sum(np.asarray(tmask))) * 2
    assert n_assign < 16 * 16 * 2                        # padding present
    for i in range(2):
        load = np.array([tel[f"layers_{i}/ffn/moe/load/{j}"] for j in range(4)])
        counts = np.rint(load * n_assign)
        assert counts.sum() == n_assign
        want = rate * np.sign(counts.mean() - counts)
        assert np.any(want != 0)
        np.testing.assert_array_equal(
            np.asarray(new.params[f"layers_{i}"]["ffn"]["balance_bias"]), want.astype(np.float32))
    # the other parameters did move (lr > 0): the step is not a no-op
    assert not np.allclose(np.asarray(new.params["layers_0"]["ffn"]["router"]["kernel"]),
                           kernel0)
    # grad_accum=2: same load, same bias
    setup2 = _setup(devices, tmp_path / "acc", *common, "train.lr=1e-1", "train.grad_accum=2")
    with setup2.context():
        new2, _ = setup2.train_step(setup2.init_state(), _batch(setup2, pad_rows=4))
    for (_, a), (_, b) in zip(_bias_paths(new.params), _bias_paths(new2.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --------------------------------------------------------------------------------------------
# scan_layers over groups of moe.every layers.


def _to_groups(params, n_layers, every):
    """Unscanned params (layers_i) -> scanned over groups (layers/block_j, leading group axis)."""
    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    out["layers"] = {f"block_{j}": jax.tree.map(
        lambda *a: jnp.stack(a), *[params[f"layers_{g * every + j}"]
                                   for g in range(n_layers // every)]) for j in range(every)}
    return out


def test_scan_layers_groups_equal_unscanned():
    """moe.every=2 with scan_layers (groups of dense + MoE block) == the unscanned model with
    the same parameters: logits, aux losses, gradients (balance-bias load included), and a KV
    cache prefill + decode."""
    over = ["model.n_layers=4", "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1",
            "model.ffn_hidden=48", "moe.n_experts=4", "moe.top_k=2", "moe.every=2",
            "moe.dispatch=dense", "moe.router=sigmoid", "moe.capacity_factor=1.0",
            "moe.aux_loss_coef=0.1"]
    cfg_u = load_config(None, [*over, "model.scan_layers=false"])
    cfg_s = load_config(None, [*over, "model.scan_layers=true"])
    mu, ms = TransformerLM(cfg_u.model, moe=cfg_u.moe), TransformerLM(cfg_s.model, moe=cfg_s.moe)
    rng = np.random.default_rng(0)
    toks = jnp.asarray(rng.integers(0, 259, (2, 12)), jnp.int32)
    mask = jnp.asarray(np.arange(12)[None, :] < np.array([[12], [7]]))
    pu = nn.meta.unbox(mu.init(jax.random.key(0), toks)["params"])
    pu = jax.tree_util.tree_map_with_path(   # a non-zero bias, so that it matters
        lambda p, x: jnp.asarray(rng.normal(0, 0.3, x.shape), x.dtype)
        if param_roles.param_role(p) == "balance" else x, pu)
    ps = _to_groups(pu, 4, 2)
    shapes = nn.meta.unbox(jax.eval_shape(ms.init, jax.random.key(0), toks)["params"])
    assert jax.tree.structure(shapes) == jax.tree.structure(ps)
    assert all(a.shape == b.shape for a, b in zip(jax.tree.leaves(shapes), jax.tree.leaves(ps)))
    # every parameter has a known role (the bias: 'balance'); counts by formula == the tree
    roles = {jax.tree_util.keystr(p): param_roles.param_role(p)
             for p, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]}
    assert "other" not in roles.values() and list(roles.values()).count("balance") == 1
    from tfm_jax.model import count_params
    assert count_params(cfg_s.model, cfg_s.moe)["total"] == sum(
        x.size for x in jax.tree.leaves(shapes))

    def loss(model, p):
        logits, sown = model.apply({"params": p}, toks, token_mask=mask, train=True,
                                   mutable=list(telemetry.COLLECTIONS))
        aux = telemetry.aux_loss(sown)
        return jnp.sum(logits * mask[..., None]) * 1e-2 + aux, (logits, aux)

    (lu, (logit_u, aux_u)), gu = jax.jit(jax.value_and_grad(lambda p: loss(mu, p),
                                                             has_aux=True))(pu)
    (ls, (logit_s, aux_s)), gs = jax.jit(jax.value_and_grad(lambda p: loss(ms, p),
                                                             has_aux=True))(ps)
    np.testing.assert_allclose(logit_s, logit_u, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(float(aux_s), float(aux_u), rtol=1e-6)
    assert float(aux_u) > 0
    gu_g = _to_groups(gu, 4, 2)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(gs)[0], jax.tree.leaves(gu_g)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4,
                                   err_msg=jax.tree_util.keystr(path))
    # the balance-bias cotangent is the per-layer load: non-zero, real tokens x top_k
    load = np.asarray(gs["layers"]["block_1"]["ffn"]["balance_bias"])
    assert load.shape == (2, 4) and np.all(load.sum(1) == 2 * int(mask.sum()))
    # KV cache: prefill 8 tokens, then decode 1, scanned == unscanned
    outs = []
    for model, p in ((mu, pu), (ms, ps)):
        @jax.jit
        def prefill_decode(p, model=model):
            cache = model.init_cache(2, 16)
            lp, cache = model.apply({"params": p}, toks[:, :8], cache=cache)
            ld, cache = model.apply({"params": p}, toks[:, 8:9], cache=cache, decode=True)
            return lp, ld
        outs.append(prefill_decode(p))
    for a, b in zip(*outs):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Auxiliary losses under gradient accumulation.


@pytest.mark.slow      # 4 train-step compilations (~45 s quiet, 5 min under load)
def test_aux_losses_under_grad_accum(devices, tmp_path):
    """The z-loss is a mean over tokens: grad_accum=2 == the whole batch (loss, gradient norm).
    The load-balancing loss is a per-micro-batch statistic (Switch: f_e P_e of each routing
    group, and a micro-batch's groups hold half the tokens): grad_accum=2 gives exactly the
    token-weighted mean of the micro-batches' own losses, which differs from the whole batch's."""
    from tfm_jax import train as train_lib
    from tfm_jax.train import step as train_step_lib

    def run(extra, accum):
        setup = _setup(devices, tmp_path / f"{accum}{len(extra)}", "moe.dispatch=all_to_all",
                       "moe.capacity_factor=null", "train.lr=1e-3", "train.grad_clip=0",
                       f"train.grad_accum={accum}", *extra)
        state = setup.init_state()
        batch = _batch(setup, seed=3)
        params = jax.tree.map(lambda x: x.copy(), state.params)
        with setup.context():
            _, m = setup.train_step(state, batch)
        return setup, params, batch, jax.device_get(m)

    z_only = ["moe.aux_loss_coef=0", "moe.z_loss_coef=0.1"]
    (_, _, _, m1), (_, _, _, m2) = run(z_only, 1), run(z_only, 2)
    np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m2["grad_norm"], m1["grad_norm"], rtol=1e-5)

    aux_only = ["moe.aux_loss_coef=1.0", "moe.z_loss_coef=0"]
    _, _, _, m1 = run(aux_only, 1)
    setup, params, batch, m2 = run(aux_only, 2)
    # reference: each micro-batch (rows a, a+2, ...) on its own, token-weighted
    def micro_loss(p, mb):
        logits, _, sown = train_step_lib._forward(setup.model, p, {}, mb, train=True)
        ce = train_lib.masked_ce_sum(logits, mb["targets"], mb["mask"])
        return ce + telemetry.aux_loss(sown) * jnp.sum(mb["mask"])

    with setup.context():
        fn = jax.jit(jax.value_and_grad(micro_loss))
        tot, grads = 0.0, None
        for a in range(2):
            mb = jax.tree.map(lambda x: x[a::2], batch)
            v, g = fn(params, mb)
            tot += float(v)
            grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
    n = float(np.sum(np.asarray(batch["mask"])))
    gnorm = np.sqrt(sum(float(jnp.sum(jnp.square(x))) for x in jax.tree.leaves(grads))) / n
    np.testing.assert_allclose(m2["loss"], tot / n, rtol=1e-6)
    np.testing.assert_allclose(m2["grad_norm"], gnorm, rtol=1e-5)
    # ... and differs from the whole batch at once (the probe can tell them apart)
    assert abs(float(m2["loss"]) - float(m1["loss"])) > 1e-6


def test_batch_not_divisible_by_token_shards(devices):
    """Generation-sized batches (3 rows on 8 token shards): completed with unrouted padding
    rows. Dropless, each token's output depends on itself only, so it equals the one-group
    dense reference (all_to_all and implicit on data 2 x expert 4)."""
    mesh, rules = _mesh((2, 4))
    wr, ks = _weights(8, seed=13)
    x = jnp.asarray(np.random.default_rng(14).normal(size=(3, 5, D)), jnp.float32)
    spec = md.MoESpec(8, 2, None)
    ref, st_ref = md.moe_layer(x, jnp.asarray(wr), ks, spec, strategy="dense", groups=1)
    for strategy in ("all_to_all", "implicit"):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            y, st = jax.jit(lambda x: md.moe_layer(x, jnp.asarray(wr), ks, spec,
                                                   strategy=strategy))(x)
        assert y.shape == (3, 5, D)
        np.testing.assert_allclose(np.asarray(y), np.asarray(ref), atol=1e-5, rtol=1e-5)
        np.testing.assert_array_equal(np.asarray(st["counts"]), np.asarray(st_ref["counts"]))
        assert float(np.sum(st["counts"])) == 3 * 5 * 2           # padding rows not counted


def test_moe_routing_measurement(tmp_path):
    """The ablation runner's moe_routing measurement averages the sown per-layer telemetry of
    the last log windows (synthetic metrics.jsonl), per layer and over layers; dense: {}."""
    import json
    import pathlib

    from tfm_jax.ablate.measurements import MEASUREMENTS, RunContext

    rows = []
    for step in (10, 20, 30):
        r = {"step": step, "loss": 3.0}
        for ly in range(2):
            r[f"layers_{ly}/ffn/moe/drop_fraction"] = 0.1 * (ly + 1) + step / 1000
            r[f"layers_{ly}/ffn/moe/load_max"] = 1.5 + ly
            r[f"layers_{ly}/ffn/moe/router_entropy"] = 2.0
            r[f"layers_{ly}/ffn/load_balance_loss"] = 0.01
        rows.append(r)
    rows.append({"step": 30, "val_loss": 2.0})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, ["moe.n_experts=4"])
    ctx = RunContext(cfg, pathlib.Path(tmp_path), "v", 0, options={"last": 2})
    out = MEASUREMENTS["moe_routing"](ctx)
    assert out["moe_drop_fraction"] == pytest.approx(np.mean([0.12, 0.13, 0.22, 0.23]))
    assert out["moe_load_max"] == pytest.approx(2.0)
    assert out["moe_aux_loss"] == pytest.approx(0.02)
    assert [r["layer"] for r in out["moe_layers"].rows] == [0, 1]
    assert out["moe_layers"].rows[1]["drop_fraction"] == pytest.approx(0.225)
    assert [r["step"] for r in out["moe_steps"].rows] == [10, 20, 30]
    dense = RunContext(load_config(None, []), pathlib.Path(tmp_path), "d", 0)
    assert MEASUREMENTS["moe_routing"](dense) == {}


@pytest.mark.parametrize("mesh", [["mesh.data=2", "mesh.expert=4"],
                                  ["mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2",
                                   "mesh.expert=2", "model.n_kv_heads=2"]])
def test_ragged_dispatch_trains_like_dropless_all_to_all(devices, tmp_path, mesh):
    """moe.dispatch=ragged (dropless grouped GEMMs, no capacity) trains on CPU: four optimizer
    steps give the losses of the dropless all_to_all dispatch (same parameters, same data), on
    data x expert and on fsdp x tensor x expert meshes, and the loss goes down."""
    losses = {}
    for dispatch in ("all_to_all", "ragged"):
        setup = _setup(devices, tmp_path / dispatch, *mesh, f"moe.dispatch={dispatch}",
                       "moe.capacity_factor=null", "train.lr=1e-2")
        state = setup.init_state()
        out = []
        with setup.context():
            for step in range(4):
                state, m = setup.train_step(state, _batch(setup, seed=step % 2))
                out.append(float(m["loss"]))
        losses[dispatch] = out
    np.testing.assert_allclose(losses["ragged"], losses["all_to_all"], rtol=2e-5)
    assert losses["ragged"][2] < losses["ragged"][0]
