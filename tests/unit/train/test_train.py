"""The train step and its set-up: masked loss vs numpy, sharded == single-device, gradient
accumulation, AdamW vs a numpy reference, weight decay by role, non-finite flags and skip,
restore into another sharding, the evaluated span. (Loop-level runs: tests/integration.)"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tfm_jax import data as data_lib
from tfm_jax.train.checkpoint import Checkpointer
from train_support import params_np, poison, small_cfg
from tfm_jax.train import build, input_mask, masked_ce_sum, train

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return data_lib.load_corpus(None, 0.05, str(tmp_path_factory.mktemp("cache")))


def test_input_mask_and_masked_ce_vs_numpy():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 5, 7)).astype(np.float32)
    targets = rng.integers(0, 7, (2, 5))
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.float32)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ref = -(np.take_along_axis(logp, targets[..., None], -1)[..., 0] * mask).sum()
    got = masked_ce_sum(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    np.testing.assert_allclose(float(got), ref, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(input_mask(jnp.asarray(mask))),
                                  [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])


def _batch(cfg, corpus, step=0):
    return data_lib.train_batch(corpus.train, corpus.train_doc_starts, step=step, seed=0,
                                batch_size=cfg.train.batch_size, seq_len=cfg.data.seq_len)


@pytest.mark.slow     # runs in tests/integration/test_heavy_unit_cases.py
def test_sharded_equals_single_device(tmp_path, corpus, devices):
    """data 2 x fsdp 2 x tensor 2 on 8 fake devices vs one device: same forward and steps."""
    base = ["train.steps=3"]
    single = build(small_cfg(tmp_path, *base, "mesh.data=1"), devices=devices[:1])
    sharded = build(small_cfg(tmp_path, *base, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"),
                    devices=devices)
    s1, s8 = single.init_state(), sharded.init_state()
    chex.assert_trees_all_equal(params_np(s1), params_np(s8))
    q = s8.params["layers_0"]["attn"]["q_proj"]["kernel"]
    assert len({d for d in q.sharding.device_set}) == 8 and tuple(q.sharding.spec) == ("fsdp", "tensor", None)
    for step in range(3):
        batch = _batch(single.cfg, corpus, step)
        with single.context():
            s1, m1 = single.train_step(s1, single.shard_batch(batch))
        with sharded.context():
            s8, m8 = sharded.train_step(s8, sharded.shard_batch(batch))
        np.testing.assert_allclose(float(m1["loss"]), float(m8["loss"]), rtol=1e-5)
    chex.assert_trees_all_close(params_np(s1), params_np(s8), rtol=1e-4, atol=1e-6)
    with single.context():
        l1 = single.model.apply({"params": s1.params}, jnp.asarray(batch["inputs"]))
    with sharded.context():
        l8 = jax.jit(lambda p, x: sharded.model.apply({"params": p}, x))(
            s8.params, sharded.shard_batch(batch)["inputs"])
    np.testing.assert_allclose(np.asarray(l1), np.asarray(l8), rtol=1e-4, atol=1e-5)


def test_grad_accumulation_matches_full_batch(tmp_path, corpus, devices):
    one = build(small_cfg(tmp_path, "mesh.data=1"), devices=devices[:1])
    four = build(small_cfg(tmp_path, "mesh.data=1", "train.grad_accum=4"), devices=devices[:1])
    sa, sb = one.init_state(), four.init_state()
    batch = one.shard_batch(_batch(one.cfg, corpus))
    with one.context():
        sa, ma = one.train_step(sa, batch)
    with four.context():
        sb, mb = four.train_step(sb, batch)
    np.testing.assert_allclose(float(ma["loss"]), float(mb["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(ma["grad_norm"]), float(mb["grad_norm"]), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 params_np(sa), params_np(sb))


def test_optimizer_matches_numpy_adamw_reference(tmp_path, corpus, devices):
    """Four steps of the framework (warmup 2: lr 0, lr/2, lr, then cosine; clipping active;
    weight decay) against AdamW written from its formulas in float64 numpy: global-norm clip
    ``g * min(1, c/|g|)``, ``m = b1 m + (1-b1) g``, ``v = b2 v + (1-b2) g^2``, bias
    corrections, ``p -= lr (m_hat / (sqrt(v_hat) + eps) + wd p)`` with the decay applied to
    projection kernels and the embedding only (decided here by name, not by the framework)."""
    import math

    clip, wd, n_steps = 0.05, 0.5, 4
    setup = build(small_cfg(tmp_path, "mesh.data=1", f"train.grad_clip={clip}",
                            f"train.weight_decay={wd}", f"train.steps={n_steps}",
                            "train.warmup_steps=2", "train.min_lr_ratio=0.1"),
                  devices=devices[:1])
    t = setup.cfg.train
    state = setup.init_state()
    p0 = jax.device_get(state.params)            # (the step donates the state's buffers)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(p0)
    names = [jax.tree_util.keystr(path, simple=True, separator="/") for path, _ in leaves]
    decay = [n.endswith("/kernel") or n.endswith("/embedding") for n in names]
    assert sum(decay) and not all(decay)         # both kinds present: the mask is exercised
    p = [np.asarray(x, np.float64) for _, x in leaves]
    m = [np.zeros_like(x) for x in p]
    v = [np.zeros_like(x) for x in p]

    def lr_at(step):                             # linear warmup, then cosine to lr*min_lr_ratio
        if step < t.warmup_steps:
            return t.lr * step / t.warmup_steps
        frac = (step - t.warmup_steps) / (t.steps - t.warmup_steps)
        end = t.lr * t.min_lr_ratio
        return end + (t.lr - end) * 0.5 * (1 + math.cos(math.pi * frac))

    def loss(params, batch):
        logits = setup.model.apply({"params": params}, batch["inputs"])
        return masked_ce_sum(logits, batch["targets"], batch["mask"]) / batch["mask"].sum()

    grad_fn = jax.jit(jax.grad(loss))
    clipped_steps = 0
    for step in range(n_steps):
        batch = setup.shard_batch(_batch(setup.cfg, corpus, step))
        ref_params = jax.tree_util.tree_unflatten(treedef, [x.astype(np.float32) for x in p])
        g = [np.asarray(x, np.float64) for x in jax.tree.leaves(grad_fn(ref_params, batch))]
        norm = math.sqrt(sum(float(np.sum(x * x)) for x in g))
        clipped_steps += norm > clip
        g = [x * min(1.0, clip / norm) for x in g]
        lr, k = lr_at(step), step + 1
        for i in range(len(p)):
            m[i] = t.b1 * m[i] + (1 - t.b1) * g[i]
            v[i] = t.b2 * v[i] + (1 - t.b2) * g[i] ** 2
            u = (m[i] / (1 - t.b1 ** k)) / (np.sqrt(v[i] / (1 - t.b2 ** k)) + t.eps)
            p[i] = p[i] - lr * (u + (wd * p[i] if decay[i] else 0.0))
        with setup.context():
            state, metrics = setup.train_step(state, batch)
        assert float(metrics["lr"]) == pytest.approx(lr, rel=1e-6, abs=1e-12)
        assert float(metrics["grad_norm"]) == pytest.approx(norm, rel=1e-4)
    assert clipped_steps == n_steps              # the clip was active in every step
    got = [np.asarray(x) for x in jax.tree.leaves(params_np(state))]
    for name, a, b, x0 in zip(names, got, p, jax.tree.leaves(p0)):
        assert not np.allclose(a, x0), name      # lr > 0 steps moved every parameter
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6, err_msg=name)


def _decayed_by_optimizer(cfg, devices) -> dict[str, bool]:
    """Which parameters the framework's optimizer actually decays, found by running it: all
    parameters set to 1, zero gradients, lr > 0 from step 0. Adam's part of the update is then
    0, so a parameter moves iff weight decay applies to it. Keys: paths with the layer index /
    the scanned `layers` level removed, so scanned and unscanned models compare directly."""
    import re

    setup = build(cfg, devices=devices[:1])
    params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), setup.abstract_state().params)
    updates, _ = setup.tx.update(jax.tree.map(jnp.zeros_like, params), setup.tx.init(params),
                                 params)
    out = {}
    for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
        key = re.sub(r"^layers(_\d+)?/", "layers/",
                     jax.tree_util.keystr(path, simple=True, separator="/"))
        moved = bool(np.any(np.asarray(u) != 0))
        assert out.setdefault(key, moved) == moved, key   # every layer alike
        out[key] = moved
    return out


@pytest.mark.parametrize("variant", [pytest.param([], marks=pytest.mark.slow),   # integration
                                     ["model.norm=layernorm", "model.tie_embeddings=true"]])
def test_weight_decay_same_parameters_with_scan_layers(tmp_path, devices, variant):
    """model.scan_layers stacks a layer's (d,) norm scale into (L, d): decay must not follow."""
    common = ["mesh.data=1", "train.warmup_steps=0", "train.weight_decay=0.1"] + variant
    plain = _decayed_by_optimizer(small_cfg(tmp_path, *common), devices)
    scanned = _decayed_by_optimizer(small_cfg(tmp_path, *common, "model.scan_layers=true"),
                                    devices)
    assert plain == scanned
    assert plain["layers/attn/q_proj/kernel"] and plain["layers/ffn/wo/kernel"]
    assert plain["embed/embedding"]                       # embeddings: decayed (documented)
    norms = [k for k in plain if "norm/" in k]
    assert norms and not any(plain[k] for k in norms), plain
    if "model.norm=layernorm" in variant:
        assert "layers/attn_norm/bias" in plain and "lm_head/kernel" not in plain


@pytest.mark.parametrize("variant", [[], ["model.scan_layers=true"], ["model.norm=batchnorm"],
                                     ["model.norm=layernorm", "model.ffn_type=gelu",
                                      "model.tie_embeddings=true"]])
def test_every_parameter_has_a_known_role(tmp_path, devices, variant):
    from tfm_jax.core.roles import param_role
    setup = build(small_cfg(tmp_path, "mesh.data=1", *variant), devices=devices[:1])
    roles = {jax.tree_util.keystr(p, simple=True, separator="/"): param_role(p)
             for p, _ in jax.tree_util.tree_flatten_with_path(setup.abstract_state().params)[0]}
    assert "other" not in roles.values(), roles
    # the jax-free count (config show) and the model's count match the real tree
    from tfm_jax.config import param_counts
    from tfm_jax.model import count_params
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(setup.abstract_state().params))
    assert param_counts(setup.cfg.model) == count_params(setup.cfg.model)
    assert param_counts(setup.cfg.model)["total"] == n
    assert {r for k, r in roles.items() if k.endswith("/kernel")} == {"weight"}
    assert {r for k, r in roles.items() if "norm/" in k} == {"norm"}


def test_nonfinite_skip_keeps_state(tmp_path, corpus, devices):
    setup = build(small_cfg(tmp_path, "mesh.data=1", "train.on_nonfinite=skip"),
                  devices=devices[:1])
    state = poison(setup, setup.init_state())
    before = params_np(state)
    with setup.context():
        state, m = setup.train_step(state, setup.shard_batch(_batch(setup.cfg, corpus)))
    assert not bool(m["finite"]) and int(state.step) == 1
    after = params_np(state)
    jax.tree.map(np.testing.assert_array_equal, before, after)
    from tfm_jax.train import nonfinite_flags
    flags = jax.device_get(nonfinite_flags(state.params))
    assert any(jax.tree.leaves(jax.device_get(m["grad_nonfinite"])))
    assert bool(flags["layers_1"]["ffn"]["wo"]["kernel"])
    assert not bool(flags["layers_0"]["ffn"]["wo"]["kernel"])


def test_scanned_nonfinite_flags_are_per_layer(tmp_path, devices):
    from tfm_jax.train import nonfinite_flags
    tree = {"layers": {"w": jnp.ones((3, 2, 2)).at[1, 0, 0].set(jnp.nan)}, "head": jnp.ones(2)}
    flags = jax.device_get(nonfinite_flags(tree))
    np.testing.assert_array_equal(flags["layers"]["w"], [False, True, False])
    assert not flags["head"]


def test_restore_into_different_sharding(tmp_path, corpus, devices):
    cfg1 = small_cfg(tmp_path, "mesh.data=1", "train.steps=2", "train.checkpoint_every=2")
    res = train(cfg1, corpus=corpus, devices=devices[:1])
    cfg8 = small_cfg(tmp_path, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "train.steps=2")
    setup8 = build(cfg8, devices=devices)
    ck = Checkpointer(tmp_path / "checkpoints")
    restored = ck.restore(setup8.abstract_state())
    ck.close()
    jax.tree.map(np.testing.assert_array_equal, params_np(res.state), params_np(restored))
    assert tuple(restored.params["lm_head"]["kernel"].sharding.spec) == ("fsdp", "tensor")


def test_eval_span_is_exactly_the_scored_tokens(tmp_path, corpus):
    """The unigram baseline is scored on the tokens the evaluation scores (its targets)."""
    from tfm_jax.train import eval_span
    cfg = small_cfg(tmp_path, "train.eval_batches=3")
    span = eval_span(cfg, corpus.val)
    targets = np.concatenate([b["targets"].ravel() for b in data_lib.eval_batches(
        corpus.val, batch_size=8, seq_len=32, max_batches=3)])
    np.testing.assert_array_equal(span, targets)


def test_quick_run_of_a_long_config_clamps_the_warmup():
    """train.steps below train.warmup_steps (a quick run of a shipped config) is accepted: the
    warmup spans the run's steps (linear from 0, the peak at the last step) instead of a
    config error."""
    from tfm_jax.config import load_config
    from tfm_jax.train.state import lr_schedule

    cfg = load_config(None, ["train.steps=10", "train.warmup_steps=50", "train.lr=1e-3"])
    sched = lr_schedule(cfg)
    got = np.array([float(sched(i)) for i in range(11)])
    np.testing.assert_allclose(got, 1e-3 * np.arange(11) / 10, rtol=1e-6, atol=1e-12)


def test_every_shipped_config_accepts_a_quick_run():
    """`tfm-jax train --config C train.steps=10` passes validation for every shipped config
    (it used to stop on the warmup being longer than the run)."""
    import pathlib

    from tfm_jax.config import load_config

    shipped = sorted((pathlib.Path(__file__).resolve().parents[3] / "configs").glob("*.yaml"))
    assert len(shipped) >= 4
    for path in shipped:
        assert load_config(str(path), ["train.steps=10"]).train.steps == 10, path.name
