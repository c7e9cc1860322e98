"""Layer numerics of tfm_jax.layers against independent numpy references (float64)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from tfm_jax.config import ffn_hidden_size
from tfm_jax.layers.attention import Attention
from tfm_jax.layers.attention_ops.block import causal_attention
from tfm_jax.layers.attention_ops.dense import grouped_attention, make_attention_mask
from tfm_jax.layers.rope import rope
from tfm_jax.layers.embed import Embed
from tfm_jax.layers.ffn import FeedForward
from tfm_jax.layers.linear import Linear
from tfm_jax.layers.norms import BatchNorm, LayerNorm, RMSNorm
from tfm_jax.platform.xla_cpu import cpu_xla_ops
from tfm_jax.layers.norms import layer_norm as _layer_norm
from tfm_jax.layers.norms import rms_norm as _rms_norm

# jitted (static eps / theta): one compile per shape instead of eager per-op dispatch
layer_norm = jax.jit(_layer_norm, static_argnums=3)
rms_norm = jax.jit(_rms_norm, static_argnums=2)
rope = jax.jit(rope, static_argnums=2)

RTOL, ATOL = 1e-5, 1e-5
EPS = 1e-6


def rng(seed=0):
    return np.random.default_rng(seed)


def f32(a):
    return np.asarray(a, dtype=np.float32)


def close(actual, desired, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(actual, np.float64), desired, rtol=rtol, atol=atol)


def init_shapes(mod, *args, **kw):
    """Variables of ``mod`` as ShapeDtypeStructs (traced, not compiled: keeps the tests fast)."""
    return nn.meta.unbox(jax.eval_shape(functools.partial(mod.init, **kw), jax.random.key(0),
                                        *args))


def japply(mod, **kw):
    """``mod.apply`` jitted (one compile instead of many eager op dispatches)."""
    return jax.jit(functools.partial(mod.apply, **kw))


def randomize(params, seed, std=0.3):
    """Same tree structure, fresh N(0, std) values (so softmaxes etc. are far from uniform)."""
    leaves, treedef = jax.tree.flatten(nn.meta.unbox(params))
    r = rng(seed)
    return jax.tree.unflatten(treedef, [f32(r.normal(0, std, l.shape)) for l in leaves])


# ------------------------------------------------------------------------------------------
# numpy references


def np_layer_norm(x, scale, bias, eps=EPS):
    x = x.astype(np.float64)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * scale + bias


def np_rms_norm(x, scale, eps=EPS):
    x = x.astype(np.float64)
    return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * scale


def np_bn(x, mean, var, scale, bias, eps=EPS):
    return (x.astype(np.float64) - mean) / np.sqrt(var + eps) * scale + bias


_erf = np.vectorize(math.erf)


def np_gelu(z):
    return 0.5 * z * (1.0 + _erf(z / math.sqrt(2.0)))


def np_silu(z):
    return z / (1.0 + np.exp(-z))


def np_rope(x, positions, theta):
    """x (B, T, H, D), positions (B, T); rotate-half with inv_freq[i] = theta^(-2i/D)."""
    x = x.astype(np.float64)
    d = x.shape[-1]
    half = d // 2
    inv = np.array([theta ** (-2.0 * i / d) for i in range(half)])
    ang = positions.astype(np.float64)[..., None] * inv                 # (B, T, D/2)
    cos, sin = np.cos(ang)[:, :, None, :], np.sin(ang)[:, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def np_softmax_attention(q, k, v, mask):
    """One head: q (T, D), k/v (S, D), mask bool (T, S)."""
    s = q @ k.T / np.sqrt(q.shape[-1])
    s = np.where(mask, s, -np.inf)
    row_any = mask.any(-1, keepdims=True)
    s = np.where(row_any, s, 0.0)                  # fully-masked row: uniform
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s)
    p = p / p.sum(-1, keepdims=True)
    return p @ v


def np_grouped_attention(q, k, v, mask):
    """Explicit K/V head repetition: query head h reads kv head h // G."""
    q, k, v = (a.astype(np.float64) for a in (q, k, v))
    b, t, h, _ = q.shape
    g = h // k.shape[2]
    k = np.repeat(k, g, axis=2)
    v = np.repeat(v, g, axis=2)
    out = np.zeros(q.shape)
    for bi in range(b):
        for hi in range(h):
            out[bi, :, hi] = np_softmax_attention(q[bi, :, hi], k[bi, :, hi], v[bi, :, hi],
                                                  mask[bi])
    return out


def np_mha_loop(q, k, v, mask):
    """Plain multi-head attention, one loop per head, no grouping anywhere."""
    q, k, v = (a.astype(np.float64) for a in (q, k, v))
    out = np.zeros(q.shape)
    for bi in range(q.shape[0]):
        for hi in range(q.shape[2]):
            out[bi, :, hi] = np_softmax_attention(q[bi, :, hi], k[bi, :, hi], v[bi, :, hi],
                                                  mask[bi])
    return out


def np_causal(b, t, valid=None):
    m = np.tril(np.ones((t, t), bool))[None].repeat(b, 0)
    if valid is not None:
        m = m & valid[:, None, :].astype(bool)
    return m


# ------------------------------------------------------------------------------------------
# LayerNorm / RMSNorm


def _norm_inputs(seed=0, shape=(2, 5, 16)):
    r = rng(seed)
    x = f32(3.0 + 2.0 * r.normal(size=shape))          # nonzero mean
    scale = f32(1.0 + 0.5 * r.normal(size=shape[-1]))
    bias = f32(r.normal(size=shape[-1]))
    return x, scale, bias


def test_layer_norm_matches_numpy():
    x, scale, bias = _norm_inputs()
    y = layer_norm(jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias), EPS)
    assert y.dtype == jnp.float32 and y.shape == x.shape
    close(y, np_layer_norm(x, scale, bias))


def test_rms_norm_matches_numpy():
    x, scale, _ = _norm_inputs(1)
    y = rms_norm(jnp.asarray(x), jnp.asarray(scale), EPS)
    close(y, np_rms_norm(x, scale))
    # RMSNorm does not centre: differs from LayerNorm on nonzero-mean inputs
    assert not np.allclose(np.asarray(y), np_layer_norm(x, scale, 0.0), atol=1e-2)


def test_norms_low_precision_input_stats_in_float32():
    x, scale, bias = _norm_inputs(2)
    xb = jnp.asarray(x, jnp.bfloat16)
    x_up = xb.astype(jnp.float32)                     # the bf16 values, exactly, in float32
    for fn, args, ref in (
            (layer_norm, (jnp.asarray(scale), jnp.asarray(bias), EPS),
             np_layer_norm(np.asarray(x_up), scale, bias)),
            (rms_norm, (jnp.asarray(scale), EPS), np_rms_norm(np.asarray(x_up), scale))):
        y = fn(xb, *args)
        assert y.dtype == jnp.bfloat16
        # same as normalizing the upcast input in float32 and rounding once at the end
        np.testing.assert_array_equal(np.asarray(y.astype(jnp.float32)),
                                      np.asarray(fn(x_up, *args).astype(jnp.bfloat16)
                                                 .astype(jnp.float32)))
        close(y.astype(jnp.float32), ref, rtol=2 ** -8, atol=1e-5)   # bf16 output rounding


@pytest.mark.parametrize("cls", [LayerNorm, RMSNorm])
def test_norm_modules_init_and_apply(cls):
    x, scale, bias = _norm_inputs(3)
    mod = cls(eps=EPS)
    params = nn.meta.unbox(mod.init(jax.random.key(0), jnp.asarray(x))["params"])
    np.testing.assert_array_equal(np.asarray(params["scale"]), np.ones(16, np.float32))
    if cls is LayerNorm:
        assert set(params) == {"scale", "bias"}
        np.testing.assert_array_equal(np.asarray(params["bias"]), np.zeros(16, np.float32))
        new = {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}
        expect = layer_norm(jnp.asarray(x), new["scale"], new["bias"], EPS)
        ref = np_layer_norm(x, scale, bias)
    else:
        assert set(params) == {"scale"}
        new = {"scale": jnp.asarray(scale)}
        expect = rms_norm(jnp.asarray(x), new["scale"], EPS)
        ref = np_rms_norm(x, scale)
    y = japply(mod)({"params": new}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y), np.asarray(expect), rtol=1e-6, atol=1e-6)
    close(y, ref)


# ------------------------------------------------------------------------------------------
# BatchNorm


def _bn_setup(seed=0, b=3, t=6, d=8):
    r = rng(seed)
    x = f32(2.0 + 1.5 * r.normal(size=(b, t, d)))
    lengths = np.array([6, 4, 2])[:b]
    mask = (np.arange(t)[None, :] < lengths[:, None])             # right padding
    scale = f32(1.0 + 0.3 * r.normal(size=d))
    bias = f32(0.5 * r.normal(size=d))
    old_mean = f32(r.normal(size=d))
    old_var = f32(0.5 + r.random(d))
    return x, mask, scale, bias, old_mean, old_var


def _bn_vars(scale, bias, mean, var):
    return {"params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)},
            "batch_stats": {"mean": jnp.asarray(mean), "var": jnp.asarray(var)}}


def test_batchnorm_init_state():
    x, mask, *_ = _bn_setup()
    v = nn.meta.unbox(BatchNorm(EPS, 0.9, True).init(jax.random.key(0), jnp.asarray(x),
                                                     jnp.asarray(mask), train=True))
    np.testing.assert_array_equal(np.asarray(v["batch_stats"]["mean"]), np.zeros(8))
    np.testing.assert_array_equal(np.asarray(v["batch_stats"]["var"]), np.ones(8))
    np.testing.assert_array_equal(np.asarray(v["params"]["scale"]), np.ones(8))
    np.testing.assert_array_equal(np.asarray(v["params"]["bias"]), np.zeros(8))


def test_batchnorm_train_unmasked_stats_over_all_positions():
    x, _, scale, bias, m0, v0 = _bn_setup()
    y, _ = japply(BatchNorm(EPS, 0.9, masked=False), train=True, mutable=["batch_stats"])(
        _bn_vars(scale, bias, m0, v0), jnp.asarray(x), None)
    flat = x.reshape(-1, x.shape[-1]).astype(np.float64)
    close(y, np_bn(x, flat.mean(0), flat.var(0), scale, bias))


def test_batchnorm_train_masked_stats_over_real_positions_only():
    x, mask, scale, bias, m0, v0 = _bn_setup()
    variables = _bn_vars(scale, bias, m0, v0)
    y, _ = japply(BatchNorm(EPS, 0.9, masked=True), train=True, mutable=["batch_stats"])(
        variables, jnp.asarray(x), jnp.asarray(mask))
    real = x[mask].astype(np.float64)                                 # (N_real, D)
    ref = np_bn(x, real.mean(0), real.var(0), scale, bias)
    close(y, ref)
    # the unmasked variant, given the same mask, uses all positions -> different output
    y_un, _ = japply(BatchNorm(EPS, 0.9, masked=False), train=True, mutable=["batch_stats"])(
        variables, jnp.asarray(x), jnp.asarray(mask))
    assert np.max(np.abs(np.asarray(y_un) - np.asarray(y))) > 1e-2


def test_batchnorm_masked_ignores_padding_values():
    x, mask, scale, bias, m0, v0 = _bn_setup()
    variables = _bn_vars(scale, bias, m0, v0)
    x2 = x.copy()
    x2[~mask] = f32(100.0 * rng(9).normal(size=x2[~mask].shape))
    bn = japply(BatchNorm(EPS, 0.9, masked=True), train=True, mutable=["batch_stats"])
    y1, s1 = bn(variables, jnp.asarray(x), jnp.asarray(mask))
    y2, s2 = bn(variables, jnp.asarray(x2), jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(y1)[mask], np.asarray(y2)[mask])
    for k in ("mean", "var"):
        np.testing.assert_array_equal(np.asarray(s1["batch_stats"][k]),
                                      np.asarray(s2["batch_stats"][k]))
    # ... whereas unmasked statistics do see the padding
    un = japply(BatchNorm(EPS, 0.9, masked=False), train=True, mutable=["batch_stats"])
    u1, _ = un(variables, jnp.asarray(x), jnp.asarray(mask))
    u2, _ = un(variables, jnp.asarray(x2), jnp.asarray(mask))
    assert not np.allclose(np.asarray(u1)[mask], np.asarray(u2)[mask])


@pytest.mark.parametrize("masked", [True, False])
def test_batchnorm_running_stats_momentum(masked):
    x, mask, scale, bias, m0, v0 = _bn_setup(4)
    mom = 0.8
    _, state = japply(BatchNorm(EPS, mom, masked=masked), train=True, mutable=["batch_stats"])(
        _bn_vars(scale, bias, m0, v0), jnp.asarray(x), jnp.asarray(mask))
    sel = x[mask] if masked else x.reshape(-1, x.shape[-1])
    sel = sel.astype(np.float64)
    close(state["batch_stats"]["mean"], mom * m0 + (1 - mom) * sel.mean(0))
    close(state["batch_stats"]["var"], mom * v0 + (1 - mom) * sel.var(0))   # biased variance


def test_batchnorm_eval_uses_running_stats():
    x, mask, scale, bias, m0, v0 = _bn_setup(5)
    bn = japply(BatchNorm(EPS, 0.9, masked=True), train=False)
    variables = _bn_vars(scale, bias, m0, v0)
    y = bn(variables, jnp.asarray(x), jnp.asarray(mask))
    close(y, np_bn(x, m0, v0, scale, bias))
    # per-sample: the first sequence alone gives the same normalized output
    y0 = bn(variables, jnp.asarray(x[:1]), jnp.asarray(mask[:1]))
    close(y0, np.asarray(y)[:1], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------
# Feed-forward


@pytest.mark.parametrize("kind", ["relu", "gelu", "swiglu"])
def test_ffn_matches_numpy(kind):
    d, f = 16, 24
    x = f32(rng(0).normal(size=(2, 5, d)))
    mod = FeedForward(hidden=f, kind=kind)
    params = init_shapes(mod, jnp.asarray(x))["params"]
    assert params["wo"]["kernel"].shape == (f, d)
    if kind == "swiglu":
        assert params["wi_0"]["kernel"].shape == params["wi_1"]["kernel"].shape == (d, f)
    else:
        assert params["wi"]["kernel"].shape == (d, f)
    params = randomize(params, 1, std=0.4)
    y = japply(mod)({"params": params}, jnp.asarray(x))
    k = lambda name: np.asarray(params[name]["kernel"], np.float64)  # noqa: E731
    wo = k("wo")
    xd = x.astype(np.float64)
    if kind == "relu":
        h = np.maximum(xd @ k("wi"), 0.0)
    elif kind == "gelu":
        h = np_gelu(xd @ k("wi"))
    else:
        h = np_silu(xd @ k("wi_0")) * (xd @ k("wi_1"))
    close(y, h @ wo)


def test_gelu_is_exact_not_tanh():
    z = jnp.linspace(-4, 4, 101)
    # the module's activation is the erf form; the tanh form differs by > 1e-4 somewhere
    from tfm_jax.layers.ffn import ACTIVATIONS
    close(ACTIVATIONS["gelu"](z), np_gelu(np.asarray(z, np.float64)))
    assert np.max(np.abs(np.asarray(jax.nn.gelu(z, approximate=True)) -
                         np_gelu(np.asarray(z, np.float64)))) > 1e-4


# ------------------------------------------------------------------------------------------
# RoPE


def test_rope_matches_numpy():
    r = rng(0)
    x = f32(r.normal(size=(2, 7, 3, 16)))
    pos = np.stack([np.arange(7), np.arange(7) * 5 + 3]).astype(np.int32)
    close(rope(jnp.asarray(x), jnp.asarray(pos), 10000.0), np_rope(x, pos, 10000.0))
    close(rope(jnp.asarray(x), jnp.asarray(pos), 500.0), np_rope(x, pos, 500.0))


def test_rope_position_zero_is_identity_and_norm_preserved():
    x = f32(rng(1).normal(size=(2, 5, 2, 8)))
    y0 = rope(jnp.asarray(x), jnp.zeros((2, 5), jnp.int32), 10000.0)
    np.testing.assert_array_equal(np.asarray(y0), x)
    y = rope(jnp.asarray(x), jnp.asarray(rng(2).integers(0, 50, (2, 5))), 10000.0)
    close(np.linalg.norm(np.asarray(y), axis=-1), np.linalg.norm(x.astype(np.float64), axis=-1))
    assert not np.allclose(np.asarray(y), x, atol=1e-3)


def test_rope_scores_depend_only_on_relative_position():
    r = rng(3)
    d, p = 16, 12
    q, k = f32(r.normal(size=d)), f32(r.normal(size=d))
    pos = jnp.arange(p, dtype=jnp.int32)[None]
    qr = np.asarray(rope(jnp.broadcast_to(jnp.asarray(q), (1, p, 1, d)), pos, 100.0))[0, :, 0]
    kr = np.asarray(rope(jnp.broadcast_to(jnp.asarray(k), (1, p, 1, d)), pos, 100.0))[0, :, 0]
    g = qr.astype(np.float64) @ kr.astype(np.float64).T   # g[m, n] = <rope(q, m), rope(k, n)>
    # Toeplitz: g[m + s, n + s] == g[m, n]
    close(g[1:, 1:], g[:-1, :-1])
    close(g[3:, 3:], g[:-3, :-3])
    # ... and it does depend on the offset
    assert abs(g[0, 1] - g[0, 2]) > 1e-3 and abs(g[0, 1] - g[1, 0]) > 1e-3


# ------------------------------------------------------------------------------------------
# Masks and attention


def test_make_attention_mask_matches_numpy():
    b, t = 3, 6
    qpos = np.stack([np.arange(t), np.arange(t) + 4, np.arange(t)]).astype(np.int32)
    kpos = qpos.copy()
    kpos[2] = np.arange(t)[::-1]                                  # non-monotone keys
    valid = np.ones((b, t), bool)
    valid[0, 4:] = False
    valid[1, :2] = False
    m = np.asarray(make_attention_mask(jnp.asarray(qpos), jnp.asarray(kpos),
                                       jnp.asarray(valid)))
    ref = np.zeros((b, t, t), bool)
    for bi in range(b):
        for ti in range(t):
            for si in range(t):
                ref[bi, ti, si] = kpos[bi, si] <= qpos[bi, ti] and valid[bi, si]
    assert m.dtype == bool
    np.testing.assert_array_equal(m, ref)
    m_nopad = np.asarray(make_attention_mask(jnp.asarray(qpos), jnp.asarray(qpos)))
    np.testing.assert_array_equal(m_nopad[0], np.tril(np.ones((t, t), bool)))


@pytest.mark.parametrize("h,hkv", [(4, 4), (8, 2), (4, 1)], ids=["MHA", "GQA", "MQA"])
def test_grouped_attention_matches_repeated_kv_reference(h, hkv):
    r = rng(h * 10 + hkv)
    b, t, d = 2, 7, 8
    q = f32(r.normal(size=(b, t, h, d)))
    k = f32(r.normal(size=(b, t, hkv, d)))
    v = f32(r.normal(size=(b, t, hkv, d)))
    valid = np.ones((b, t), bool)
    valid[1, :2] = False                         # key padding on the second sequence
    mask = np_causal(b, t, valid)                # row 0/1 of sequence 1 fully masked
    out = jax.jit(grouped_attention)(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                     jnp.asarray(mask))
    assert out.shape == (b, t, h, d)
    close(out, np_grouped_attention(q, k, v, mask))
    # fully-masked rows give a uniform average of v (finite, not NaN)
    close(np.asarray(out)[1, 0], np.repeat(v[1].mean(0), h // hkv, axis=0))


def test_gqa_with_all_kv_heads_equals_plain_mha():
    r = rng(7)
    b, t, h, d = 2, 6, 4, 8
    q, k, v = (f32(r.normal(size=(b, t, h, d))) for _ in range(3))
    mask = np_causal(b, t)
    out = jax.jit(grouped_attention)(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                     jnp.asarray(mask))
    close(out, np_mha_loop(q, k, v, mask))


def test_grouped_attention_rejects_bad_head_counts():
    q = jnp.zeros((1, 2, 6, 4))
    kv = jnp.zeros((1, 2, 4, 4))
    with pytest.raises(ValueError):
        grouped_attention(q, kv, kv, jnp.ones((1, 2, 2), bool))


@pytest.mark.parametrize("h,hkv", [(4, 4), (4, 2)])
def test_attention_module_matches_numpy(h, hkv):
    b, t, dm, dh, theta = 2, 6, 16, 8, 10000.0
    x = f32(rng(0).normal(size=(b, t, dm)))
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    valid = np.ones((b, t), bool)
    valid[1, 4:] = False
    mask = np_causal(b, t, valid)
    mod = Attention(n_heads=h, n_kv_heads=hkv, head_dim=dh, rope_theta=theta)
    params = init_shapes(mod, jnp.asarray(x), jnp.asarray(pos), jnp.asarray(mask))["params"]
    assert params["q_proj"]["kernel"].shape == (dm, h, dh)
    assert params["k_proj"]["kernel"].shape == (dm, hkv, dh)
    assert params["v_proj"]["kernel"].shape == (dm, hkv, dh)
    assert params["o_proj"]["kernel"].shape == (h, dh, dm)
    params = randomize(params, 1, std=0.3)
    y = japply(mod)({"params": params}, jnp.asarray(x), jnp.asarray(pos), jnp.asarray(mask))
    w = {n: np.asarray(params[n]["kernel"], np.float64) for n in params}
    xd = x.astype(np.float64)
    q = np_rope(np.einsum("btd,dhk->bthk", xd, w["q_proj"]), pos, theta)
    k = np_rope(np.einsum("btd,dhk->bthk", xd, w["k_proj"]), pos, theta)
    v = np.einsum("btd,dhk->bthk", xd, w["v_proj"])
    g = h // hkv
    k_full = np.stack([k[:, :, hi // g] for hi in range(h)], axis=2)
    v_full = np.stack([v[:, :, hi // g] for hi in range(h)], axis=2)
    o = np_mha_loop(q, k_full, v_full, mask)
    close(y, np.einsum("bthk,hkd->btd", o, w["o_proj"]))


# ------------------------------------------------------------------------------------------
# Linear / Embed


class DoublingDotGeneral(nn.Module):
    """A dot_general replacement that counts its calls and doubles the product."""

    @nn.compact
    def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        calls = self.variable("counters", "calls", lambda: jnp.zeros((), jnp.int32))
        calls.value = calls.value + 1
        return 2.0 * jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision)


def test_linear_matches_numpy_and_in_axes():
    x = f32(rng(0).normal(size=(2, 3, 4, 5)))
    lin = Linear((6, 7), ("heads", "head_dim", "embed", "mlp"), in_axes=2)
    params = randomize(init_shapes(lin, jnp.asarray(x))["params"], 1)
    assert params["kernel"].shape == (4, 5, 6, 7)
    y = japply(lin)({"params": params}, jnp.asarray(x))
    close(y, np.einsum("abij,ijkl->abkl", x.astype(np.float64),
                       np.asarray(params["kernel"], np.float64)))
    with pytest.raises(ValueError, match="kernel_axes"):
        init_shapes(Linear(3, ("embed",)), jnp.asarray(x))


def _zero_counters(shapes):
    return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes["counters"])


def test_linear_dot_general_injection():
    x = f32(rng(0).normal(size=(2, 3, 8)))
    plain = Linear(5, ("embed", "mlp"))
    inj = Linear(5, ("embed", "mlp"), dot_general_cls=DoublingDotGeneral)
    shapes = init_shapes(inj, jnp.asarray(x))
    assert "counters" in shapes and set(shapes["params"]) == {"kernel"}
    params = randomize(shapes["params"], 2)
    y_plain = japply(plain)({"params": params}, jnp.asarray(x))
    y_inj, state = japply(inj, mutable=["counters"])(
        {"params": params, "counters": _zero_counters(shapes)}, jnp.asarray(x))
    close(y_inj, 2.0 * np.asarray(y_plain, np.float64), rtol=1e-6, atol=0)
    calls = jax.tree.leaves(state["counters"])
    assert len(calls) == 1 and int(calls[0]) == 1


def test_dot_general_injection_reaches_every_projection():
    x = f32(rng(0).normal(size=(2, 4, 16)))
    pos = jnp.broadcast_to(jnp.arange(4), (2, 4))
    mask = jnp.asarray(np_causal(2, 4))
    dbl = cpu_xla_ops().with_dot_general(DoublingDotGeneral)   # carried by the ops seam
    attn = Attention(4, 2, 4, ops=dbl)
    shapes = init_shapes(attn, jnp.asarray(x), pos, mask)
    assert set(shapes["counters"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    ffn = FeedForward(8, "swiglu", ops=dbl)
    shapes = init_shapes(ffn, jnp.asarray(x))
    assert set(shapes["counters"]) == {"wi_0", "wi_1", "wo"}
    # the swiglu output with doubled matmuls: silu(2 g) * 2 u, then doubled again
    params = randomize(shapes["params"], 3)
    y, state = japply(ffn, mutable=["counters"])(
        {"params": params, "counters": _zero_counters(shapes)}, jnp.asarray(x))
    assert [int(c) for c in jax.tree.leaves(state["counters"])] == [1, 1, 1]
    wg, wu, wo = (np.asarray(params[n]["kernel"], np.float64) for n in ("wi_0", "wi_1", "wo"))
    xd = x.astype(np.float64)
    close(y, 2.0 * (np_silu(2.0 * xd @ wg) * (2.0 * xd @ wu)) @ wo)


def test_embed_lookup_and_attend():
    emb = Embed(10, 6)
    tok = jnp.asarray(rng(0).integers(0, 10, (2, 5)))
    params = randomize(init_shapes(emb, tok)["params"], 1)
    table = np.asarray(params["embedding"], np.float64)
    np.testing.assert_array_equal(np.asarray(japply(emb)({"params": params}, tok)),
                                  np.asarray(params["embedding"])[np.asarray(tok)])
    x = f32(rng(2).normal(size=(2, 5, 6)))
    close(japply(emb, method=Embed.attend)({"params": params}, jnp.asarray(x)), x @ table.T)


# ------------------------------------------------------------------------------------------
# FFN hidden size rule


def test_ffn_hidden_size_llama3_8b():
    assert ffn_hidden_size(4096, "swiglu", 4.0, 1.3, 1024) == 14336


def test_ffn_hidden_size_two_thirds_rule_alone():
    assert ffn_hidden_size(4096, "swiglu", 4.0, None, 1) == 10922
    assert ffn_hidden_size(4096, "swiglu") == 10922
    assert ffn_hidden_size(4096, "swiglu", 4.0, None, 256) == 11008       # Llama-2-7B


@pytest.mark.parametrize("kind", ["relu", "gelu"])
def test_ffn_hidden_size_two_matrix(kind):
    assert ffn_hidden_size(128, kind) == 512
    assert ffn_hidden_size(128, kind, ffn_mult=3.0) == 384
    assert ffn_hidden_size(100, kind, ffn_mult=4.0, multiple_of=64) == 448


def test_ffn_hidden_size_explicit_wins():
    assert ffn_hidden_size(4096, "swiglu", 4.0, 1.3, 1024, explicit=48) == 48


# ------------------------------------------------------------------------------------------
# Block-causal fast path (custom VJP) vs the numpy reference and vs the general masked path


@pytest.mark.parametrize("t,h,hkv,block", [(12, 4, 2, 4), (13, 4, 1, 5), (8, 2, 2, 64),
                                           (16, 8, 2, 3)])
def test_causal_attention_matches_numpy(t, h, hkv, block):
    r = rng(7)
    b, d = 2, 8
    q, k, v = (f32(r.normal(size=(b, t, n, d))) for n in (h, hkv, hkv))
    valid = np.ones((b, t), bool)
    valid[1, t - 3:] = False                                   # right padding on one row
    out = jax.jit(functools.partial(causal_attention, block_q=block))(q, k, v, valid)
    close(out, np_grouped_attention(q, k, v, np_causal(b, t, valid)))


@pytest.mark.parametrize("block", [3, 4, 16])
def test_causal_attention_grads_match_masked_autodiff(block):
    """The hand-written VJP equals autodiff through the general masked path."""
    r = rng(8)
    b, t, h, hkv, d = 2, 11, 4, 2, 8
    q, k, v = (jnp.asarray(f32(r.normal(size=(b, t, n, d)))) for n in (h, hkv, hkv))
    valid = jnp.asarray(np.arange(t)[None, :] < np.array([[t], [t - 4]]))
    w = jnp.asarray(f32(r.normal(size=(b, t, h, d))))
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = make_attention_mask(pos, pos, valid)

    def loss_fast(q, k, v):
        return jnp.sum(causal_attention(q, k, v, valid, block_q=block) * w)

    def loss_ref(q, k, v):
        return jnp.sum(grouped_attention(q, k, v, mask) * w)

    g_fast = jax.jit(jax.grad(loss_fast, argnums=(0, 1, 2)))(q, k, v)
    g_ref = jax.jit(jax.grad(loss_ref, argnums=(0, 1, 2)))(q, k, v)
    for a, b_ in zip(g_fast, g_ref):
        close(a, np.asarray(b_, np.float64), rtol=1e-4, atol=1e-5)


def test_swiglu_custom_vjp_matches_autodiff():
    from tfm_jax.layers.ffn import swiglu
    r = rng(9)
    g, u, w = (jnp.asarray(f32(r.normal(size=(3, 5, 7)) * 3)) for _ in range(3))
    plain = lambda g, u: jnp.sum(jax.nn.silu(g) * u * w)  # noqa: E731
    custom = lambda g, u: jnp.sum(swiglu(g, u) * w)  # noqa: E731
    close(swiglu(g, u), np_silu(np.asarray(g, np.float64)) * np.asarray(u, np.float64))
    for a, b in zip(jax.grad(custom, (0, 1))(g, u), jax.grad(plain, (0, 1))(g, u)):
        close(a, np.asarray(b, np.float64))


def test_rope_custom_vjp_matches_autodiff():
    from tfm_jax.layers.rope import _rotate, apply_rope, rope_tables
    r = rng(10)
    x = jnp.asarray(f32(r.normal(size=(2, 6, 3, 8))))
    w = jnp.asarray(f32(r.normal(size=(2, 6, 3, 8))))
    sc = rope_tables(jnp.asarray(r.integers(0, 50, (2, 6))), 8, 500.0)
    g_custom = jax.grad(lambda x: jnp.sum(apply_rope(x, sc) * w))(x)
    g_plain = jax.grad(lambda x: jnp.sum(_rotate(x, sc[0], sc[1]) * w))(x)
    close(g_custom, np.asarray(g_plain, np.float64))


def test_linear_matmul_custom_vjp_matches_autodiff():
    from tfm_jax.platform.xla_cpu import matmul
    r = rng(11)
    x, w, c = (jnp.asarray(f32(r.normal(size=s))) for s in ((6, 5), (5, 7), (6, 7)))
    g = jax.jit(jax.grad(lambda x, w: jnp.sum(matmul(x, w) * c), (0, 1)))(x, w)
    ref_x = np.asarray(c, np.float64) @ np.asarray(w, np.float64).T
    ref_w = np.asarray(x, np.float64).T @ np.asarray(c, np.float64)
    close(g[0], ref_x)
    close(g[1], ref_w)


def _all_shapes(jaxpr):
    """Shapes of every value produced anywhere in a (closed) jaxpr, sub-jaxprs included."""
    from jax.extend import core as jcore
    shapes = []
    for eqn in jaxpr.eqns:
        shapes += [tuple(v.aval.shape) for v in eqn.outvars]
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (list, tuple)) else [p]):
                if isinstance(sub, jcore.ClosedJaxpr):
                    shapes += _all_shapes(sub.jaxpr)
                elif isinstance(sub, jcore.Jaxpr):
                    shapes += _all_shapes(sub)
    return shapes


def test_gqa_never_materialises_repeated_kv():
    """No value of the attention (forward and backward) has S keys x H query heads x D: K/V are
    never repeated to the query-head count (S=7 keys, H=8 query heads, Hkv=2, D=4, T=5)."""
    b, t, s, h, hkv, d = 2, 5, 7, 8, 2, 4
    q = jnp.ones((b, t, h, d))
    k = v = jnp.ones((b, s, hkv, d))
    mask = jnp.ones((b, t, s), bool)
    loss = lambda q, k, v: jnp.sum(grouped_attention(q, k, v, mask))  # noqa: E731
    jaxpr = jax.make_jaxpr(jax.grad(loss, (0, 1, 2)))(q, k, v).jaxpr
    repeated = [sh for sh in _all_shapes(jaxpr) if s in sh and h in sh and d in sh]
    assert not repeated, repeated
    # the same probe sees a repeat when there is one (the test can fail)
    rep = lambda q, k, v: jnp.sum(grouped_attention(q, jnp.repeat(k, 4, 2), jnp.repeat(v, 4, 2),  # noqa: E731
                                                    mask))
    jaxpr = jax.make_jaxpr(jax.grad(rep, (0, 1, 2)))(q, k, v).jaxpr
    assert [sh for sh in _all_shapes(jaxpr) if s in sh and h in sh and d in sh]
