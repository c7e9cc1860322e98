"""TransformerLM: parameter accounting, logical axes, layout/remat equivalences, causality,
padding invariance, and the full forward against the PyTorch peer (benchmarks/torch_peer.py)."""

import functools
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from tfm_jax.config import DEFAULT_RULES, ConfigError, ModelConfig
from tfm_jax.tools.export import export_canonical
from tfm_jax.model import TransformerLM, count_params
from tfm_jax.parallel.mesh import check_rules_cover, used_logical_names

B, T = 2, 16
BASE = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)


def make_cfg(**kw):
    return ModelConfig(**{**BASE, **kw})


def tokens(seed=0, b=B, t=T, vocab=64):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (b, t)), jnp.int32)


def abstract_vars(cfg, b=B, t=T):
    """Boxed variables as ShapeDtypeStructs (traced, not compiled)."""
    model = TransformerLM(cfg)
    return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                          jnp.zeros((b, t), jnp.int32))


def random_params(shapes, seed=0, std=0.1):
    """Random values for an (unboxed) params tree: norm scales ~ 1 + 0.2 N, biases ~ 0.1 N,
    matrices ~ std N. Non-trivial norm scales make a mix-up of the two block norms visible."""
    r = np.random.default_rng(seed)

    def leaf(path, a):
        name = jax.tree_util.keystr(path)
        if name.endswith("['scale']"):
            v = 1.0 + 0.2 * r.normal(size=a.shape)
        elif name.endswith("['bias']"):
            v = 0.1 * r.normal(size=a.shape)
        else:
            v = std * r.normal(size=a.shape)
        return jnp.asarray(v, jnp.float32)

    return jax.tree_util.tree_map_with_path(leaf, nn.meta.unbox(shapes))


def model_params(cfg, seed=0):
    return random_params(abstract_vars(cfg)["params"], seed)


@functools.lru_cache(maxsize=None)
def _forward(cfg, train, mutable):
    return jax.jit(functools.partial(TransformerLM(cfg).apply, train=train,
                                     mutable=list(mutable) if mutable else False))


def forward(cfg, train=False, mutable=()):
    """Jitted ``TransformerLM(cfg).apply`` (cached per config, so tests share compilations)."""
    return _forward(cfg, train, tuple(mutable))


def stack_layers(params, n_layers):
    """Unscanned layout (layers_0, layers_1, ...) -> scanned layout (layers, leading axis)."""
    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs),
                                 *[params[f"layers_{i}"] for i in range(n_layers)])
    return out


def n_elements(tree):
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


# ------------------------------------------------------------------------------------------
# parameter accounting and logical axes


COUNT_CFGS = {
    "rms-swiglu-untied": dict(),
    "ln-gelu-tied": dict(norm="layernorm", ffn_type="gelu", tie_embeddings=True),
    "bn-relu-post": dict(norm="batchnorm", ffn_type="relu", norm_position="post"),
    "ln-swiglu-post-tied": dict(norm="layernorm", norm_position="post", tie_embeddings=True),
    "none-mqa-headdim": dict(norm="none", n_kv_heads=1, head_dim=16, ffn_hidden=40),
    "llama-rule-scanned": dict(ffn_dim_multiplier=1.3, multiple_of=16, scan_layers=True,
                               n_layers=3),
}


@pytest.mark.parametrize("kw", COUNT_CFGS.values(), ids=COUNT_CFGS.keys())
def test_param_count_matches_formula(kw):
    cfg = make_cfg(**kw)
    params = abstract_vars(cfg)["params"]
    assert n_elements(params) == count_params(cfg)["total"]
    if cfg.tie_embeddings:
        assert "lm_head" not in params
    if cfg.norm_position == "post":
        assert "final_norm" not in params


def test_param_count_hand_computed():
    # V=64 d=32 L=2 H=4 Hkv=2 Dh=8 F=int(2*128/3)=85 (rmsnorm, swiglu, untied)
    cfg = make_cfg()
    assert cfg.resolved_ffn_hidden == 85
    attn = 32 * (4 + 2 * 2) * 8 + 4 * 8 * 32
    per_layer = attn + 3 * 32 * 85 + 2 * 32
    assert count_params(cfg)["total"] == 64 * 32 + 2 * per_layer + 32 + 32 * 64


def _boxed_leaves(tree):
    return jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


@pytest.mark.parametrize("kw", [dict(), dict(scan_layers=True, norm="batchnorm"),
                                dict(norm="layernorm", tie_embeddings=True)],
                         ids=["unscanned", "scanned-bn", "ln-tied"])
def test_every_variable_has_logical_axes(kw):
    cfg = make_cfg(**kw)
    boxed = abstract_vars(cfg)
    rule_names = {name for name, _ in DEFAULT_RULES}
    leaves = _boxed_leaves(boxed)
    assert len(leaves) == len(jax.tree.leaves(nn.meta.unbox(boxed)))
    for leaf in leaves:
        assert isinstance(leaf, nn.LogicallyPartitioned), leaf
        names = leaf.names
        assert len(names) == len(leaf.value.shape)
        assert all(isinstance(n, str) and n in rule_names for n in names), names
    specs = nn.get_partition_spec(boxed)
    flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    flat_vals = jax.tree.leaves(nn.meta.unbox(boxed))
    assert len(flat_specs) == len(flat_vals)
    for spec, val in zip(flat_specs, flat_vals):
        assert len(spec) == val.ndim and all(e is not None for e in spec)
    if cfg.scan_layers:
        lay = nn.get_partition_spec(boxed["params"]["layers"])
        assert all(s[0] == "layers" for s in jax.tree.leaves(
            lay, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))


def test_check_rules_cover_requires_every_used_name():
    specs = nn.get_partition_spec(abstract_vars(make_cfg(scan_layers=True, norm="batchnorm")))
    used = used_logical_names(specs)
    assert used == {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "norm",
                    "layers"}
    check_rules_cover(specs, DEFAULT_RULES)            # does not raise
    for name in sorted(used):
        rules = [r for r in DEFAULT_RULES if r[0] != name]
        with pytest.raises(ConfigError, match=name):
            check_rules_cover(specs, rules)


# ------------------------------------------------------------------------------------------
# scan / remat equivalences


@pytest.mark.parametrize("norm", ["rmsnorm", "batchnorm"])
def test_scan_layers_matches_unscanned(norm):
    cfg = make_cfg(norm=norm)
    cfg_scan = cfg.model_copy(update={"scan_layers": True})
    params = model_params(cfg)
    stacked = stack_layers(params, cfg.n_layers)
    scan_shapes = nn.meta.unbox(abstract_vars(cfg_scan))
    assert (jax.tree.structure(stacked) == jax.tree.structure(scan_shapes["params"]))
    assert all(a.shape == b.shape for a, b in zip(jax.tree.leaves(stacked),
                                                   jax.tree.leaves(scan_shapes["params"])))
    tok = tokens(1)
    if norm == "batchnorm":                           # train mode: batch statistics + updates
        r = np.random.default_rng(5)
        stats = {f"layers_{i}": {n: {"mean": jnp.asarray(r.normal(size=32), jnp.float32),
                                     "var": jnp.asarray(0.5 + r.random(32), jnp.float32)}
                                 for n in ("attn_norm", "ffn_norm")}
                 for i in range(cfg.n_layers)}
        stats["final_norm"] = {"mean": jnp.zeros(32), "var": jnp.ones(32)}
        out, new = forward(cfg, train=True, mutable=["batch_stats"])(
            {"params": params, "batch_stats": stats}, tok)
        out_s, new_s = forward(cfg_scan, train=True, mutable=["batch_stats"])(
            {"params": stacked, "batch_stats": stack_layers(stats, cfg.n_layers)}, tok)
        want = stack_layers(new["batch_stats"], cfg.n_layers)
        for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(new_s["batch_stats"])):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
    else:
        out = forward(cfg)({"params": params}, tok)
        out_s = forward(cfg_scan)({"params": stacked}, tok)
    assert out.shape == (B, T, 64) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out_s), np.asarray(out), rtol=1e-5, atol=1e-5)


REMAT_TOK, REMAT_TGT = tokens(3), tokens(4)


def _loss_and_grads(cfg):
    model = TransformerLM(cfg)

    def loss(p):
        logits = model.apply({"params": p}, REMAT_TOK)
        logp = jax.nn.log_softmax(logits, -1)
        return -jnp.take_along_axis(logp, REMAT_TGT[..., None], -1).mean(), logits

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


@functools.lru_cache(maxsize=None)
def _reference_loss_and_grads():
    cfg = make_cfg()
    params = model_params(cfg, seed=2)
    return params, _loss_and_grads(cfg)(params)


@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
def test_remat_full_same_logits_and_grads(scan):
    """remat="full" (with and without scan) vs the plain unscanned, un-rematerialised model."""
    params, ((l0, lg0), g0) = _reference_loss_and_grads()
    cfg = make_cfg(remat="full", scan_layers=scan)
    p = stack_layers(params, cfg.n_layers) if scan else params
    (l1, lg1), g1 = _loss_and_grads(cfg)(p)
    if scan:
        g0 = stack_layers(g0, cfg.n_layers)
    np.testing.assert_allclose(np.asarray(lg1), np.asarray(lg0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    assert jax.tree.structure(g0) == jax.tree.structure(g1)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        assert np.abs(np.asarray(a)).max() > 0
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------
# causality and padding


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_causality(norm):
    cfg = make_cfg(norm=norm)
    params = model_params(cfg, seed=6)
    fwd = forward(cfg)
    tok = np.asarray(tokens(7))
    base = np.asarray(fwd({"params": params}, jnp.asarray(tok)))
    r = np.random.default_rng(8)
    for t in (0, 5, T - 2):
        alt = tok.copy()
        alt[:, t + 1:] = (alt[:, t + 1:] + r.integers(1, 64, alt[:, t + 1:].shape)) % 64
        out = np.asarray(fwd({"params": params}, jnp.asarray(alt)))
        np.testing.assert_array_equal(out[:, :t + 1], base[:, :t + 1])
        assert np.abs(out[:, t + 1:] - base[:, t + 1:]).max() > 1e-3   # later ones do change


def _pad_case(left: bool):
    lengths = np.array([T, 9])
    ar = np.arange(T)[None, :]
    mask = (ar >= T - lengths[:, None]) if left else (ar < lengths[:, None])
    tok = np.asarray(tokens(9))
    alt = tok.copy()
    alt[~mask] = (alt[~mask] + 17) % 64
    return mask, tok, alt


@pytest.mark.parametrize("left", [False, True], ids=["right-pad", "left-pad"])
def test_padding_content_does_not_leak(left):
    cfg = make_cfg(norm="rmsnorm")
    params = model_params(cfg, seed=10)
    mask, tok, alt = _pad_case(left)
    fwd = forward(cfg)
    a = np.asarray(fwd({"params": params}, jnp.asarray(tok), token_mask=jnp.asarray(mask)))
    b = np.asarray(fwd({"params": params}, jnp.asarray(alt), token_mask=jnp.asarray(mask)))
    np.testing.assert_allclose(b[mask], a[mask], rtol=1e-6, atol=1e-6)
    assert np.abs(b[~mask] - a[~mask]).max() > 1e-3
    if left:   # without the key mask, real queries would see the changed pad keys
        c = np.asarray(fwd({"params": params}, jnp.asarray(tok)))
        d = np.asarray(fwd({"params": params}, jnp.asarray(alt)))
        assert np.abs(d[mask] - c[mask]).max() > 1e-3


def test_masked_batchnorm_model_ignores_padding_in_train_mode():
    cfg = make_cfg(norm="batchnorm", bn_masked=True)
    params = model_params(cfg, seed=11)
    stats = nn.meta.unbox(abstract_vars(cfg)["batch_stats"])
    stats = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), stats)
    mask, tok, alt = _pad_case(left=False)
    variables = {"params": params, "batch_stats": stats}
    fwd = forward(cfg, train=True, mutable=["batch_stats"])
    a, sa = fwd(variables, jnp.asarray(tok), token_mask=jnp.asarray(mask))
    b, sb = fwd(variables, jnp.asarray(alt), token_mask=jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(b)[mask], np.asarray(a)[mask], rtol=1e-6, atol=1e-6)
    for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-6, atol=1e-7)
    # unmasked BatchNorm statistics include the padding -> real outputs change
    cfg_u = cfg.model_copy(update={"bn_masked": False})
    fwd_u = forward(cfg_u, train=True, mutable=["batch_stats"])
    c, _ = fwd_u(variables, jnp.asarray(tok), token_mask=jnp.asarray(mask))
    d, _ = fwd_u(variables, jnp.asarray(alt), token_mask=jnp.asarray(mask))
    assert np.abs(np.asarray(d)[mask] - np.asarray(c)[mask]).max() > 1e-4


# ------------------------------------------------------------------------------------------
# export + PyTorch peer


PEER_CFG = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48,
                rope_theta=10000.0, norm_eps=1e-6)


def _torch_peer():
    pytest.importorskip("torch")
    root = str(pathlib.Path(__file__).resolve().parents[3])
    try:
        from benchmarks import torch_peer
    except ImportError:
        if root not in sys.path:
            sys.path.insert(0, root)
        from benchmarks import torch_peer
    return torch_peer


def test_export_rejects_unsupported_configs():
    params = model_params(make_cfg(**PEER_CFG))
    for kw in (dict(norm="layernorm"), dict(norm_position="post"), dict(ffn_type="gelu"),
               dict(tie_embeddings=True)):
        with pytest.raises(ValueError, match="export_canonical"):
            export_canonical(params, make_cfg(**{**PEER_CFG, **kw}))


def test_export_layouts_agree():
    cfg = make_cfg(**PEER_CFG)
    params = model_params(cfg, seed=12)
    w = export_canonical(params, cfg)
    w_scan = export_canonical(stack_layers(params, cfg.n_layers),
                              cfg.model_copy(update={"scan_layers": True}))
    w_wrapped = export_canonical({"params": params}, cfg)
    assert set(w) == set(w_scan) == set(w_wrapped)
    for k in w:
        assert w[k].dtype == np.float32
        np.testing.assert_array_equal(w_scan[k], w[k])
        np.testing.assert_array_equal(w_wrapped[k], w[k])
    d, h, hkv, dh, f = 32, 4, 2, 8, 48
    shapes = {"embed": (64, d), "final_norm": (d,), "lm_head": (d, 64),
              "layers.1.wq": (d, h * dh), "layers.1.wk": (d, hkv * dh),
              "layers.1.wv": (d, hkv * dh), "layers.1.wo": (h * dh, d),
              "layers.1.w_gate": (d, f), "layers.1.w_up": (d, f), "layers.1.w_down": (f, d)}
    for k, s in shapes.items():
        assert w[k].shape == s, k
    # head-major flattening: column h*Dh + j of wq is head h, dim j
    qk = np.asarray(params["layers_1"]["attn"]["q_proj"]["kernel"])
    np.testing.assert_array_equal(w["layers.1.wq"][:, 2 * dh + 3], qk[:, 2, 3])
    ffn = params["layers_0"]["ffn"]
    np.testing.assert_array_equal(w["layers.0.w_gate"], np.asarray(ffn["wi_0"]["kernel"]))
    np.testing.assert_array_equal(w["layers.0.w_up"], np.asarray(ffn["wi_1"]["kernel"]))


def test_forward_and_loss_match_torch_peer():
    torch_peer = _torch_peer()
    import torch

    cfg = make_cfg(**PEER_CFG)
    params = model_params(cfg, seed=13)
    tok, tgt = tokens(14), tokens(15)
    logits = np.asarray(forward(cfg)({"params": params}, tok))

    peer = torch_peer.TorchLM(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                              head_dim=cfg.resolved_head_dim, ffn_hidden=48,
                              rope_theta=cfg.rope_theta, norm_eps=cfg.norm_eps)
    torch_peer.load_numpy_weights(peer, export_canonical(params, cfg))   # strict: exact key set
    peer.eval()
    with torch.no_grad():
        t_logits, t_loss = peer(torch.from_numpy(np.asarray(tok, np.int64)),
                                torch.from_numpy(np.asarray(tgt, np.int64)))
    assert np.abs(logits).max() > 0.1                  # a non-trivial comparison
    np.testing.assert_allclose(logits, t_logits.numpy(), rtol=1e-5, atol=1e-4)

    logp = jax.nn.log_softmax(jnp.asarray(logits), -1)
    loss = -jnp.take_along_axis(logp, tgt[..., None], -1).mean()
    np.testing.assert_allclose(float(loss), t_loss.item(), rtol=1e-5, atol=1e-5)


@pytest.mark.slow     # runs in tests/integration/test_heavy_unit_cases.py
def test_block_causal_path_equals_masked_path():
    """attn_block_q > 0 (block-causal, custom VJP) vs 0 (full masked scores): same logits and
    gradients, with and without right padding."""
    fast_cfg = make_cfg(attn_block_q=4)
    slow_cfg = make_cfg(attn_block_q=0)
    fast, slow = TransformerLM(fast_cfg), TransformerLM(slow_cfg)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, fast_cfg.vocab_size, (2, 10)))
    params = fast.init(jax.random.key(0), tokens)["params"]
    valid = jnp.asarray(np.arange(10)[None] < np.array([[10], [7]]))

    def loss(model, p, mask):
        logits = model.apply({"params": p}, tokens, token_mask=mask)
        return jnp.sum(logits * (mask[..., None] if mask is not None else 1.0))

    for mask in (None, valid):
        lf, gf = jax.value_and_grad(lambda p: loss(fast, p, mask))(params)
        ls, gs = jax.value_and_grad(lambda p: loss(slow, p, mask))(params)
        np.testing.assert_allclose(float(lf), float(ls), rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), gf, gs)
