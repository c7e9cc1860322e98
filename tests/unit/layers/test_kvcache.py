"""KV-cache inference: cached prefill/decode equals one full forward (MHA / GQA / MQA, scanned and
unscanned, padded rows of different lengths, every ops set), the decode op against the masked
reference (quantized too), int8 / e4m3 quantization against a numpy + ml_dtypes reference
(saturation, zero rows), the cache's bytes against the KV-memory formula, one compilation per
decode step, per-row stopping, teacher-forced evaluation through the cache, and the decode step
sharded over 8 fake devices against one device."""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding

from tfm_jax.config import DEFAULT_RULES, ConfigError, MeshConfig, ModelConfig, load_config
from tfm_jax.generate import (bytes_of_cache, eval_through_cache, generate, make_decoder)
from tfm_jax.layers import kv_cache as kv
from tfm_jax.platform.kernels import cpu as cpu_kernels
from tfm_jax.layers import ops as ops_lib
from tfm_jax.layers.attention_ops.dense import cached_attention, grouped_attention, make_attention_mask
from tfm_jax.platform.xla_cpu import cpu_xla_ops
from tfm_jax.model import TransformerLM
from tfm_jax.parallel import mesh as mesh_lib

V = 64
BASE = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, attn_block_q=8)
HEADS = {"mha": 4, "gqa": 2, "mqa": 1}
LENGTHS = np.array([5, 9, 3])      # right-padded prompts of different lengths, P = 9
N_DECODE = 6


def cfg_of(kv_heads=2, **kw):
    return ModelConfig(**{**BASE, "n_kv_heads": kv_heads, **kw})


@functools.lru_cache(maxsize=None)
def model_and_vars(cfg, ops=None, seed=0):
    """A model with random weights (std 0.1, so logits vary; norm scales 1 + 0.1 N), built from
    the abstract init (no eager init: fast) -- BatchNorm statistics random too."""
    model = TransformerLM(cfg, ops=ops)
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0),
                                          jnp.zeros((1, 8), jnp.int32)))
    r = np.random.default_rng(seed)

    def leaf(path, a):
        name = jax.tree_util.keystr(path)
        if name.endswith("['var']"):
            v = 0.5 + r.random(a.shape)
        elif name.endswith("['scale']"):
            v = 1.0 + 0.1 * r.normal(size=a.shape)
        else:
            v = 0.1 * r.normal(size=a.shape)
        return jnp.asarray(v, a.dtype)

    return model, jax.tree_util.tree_map_with_path(leaf, shapes)


def seq_tokens(b=3, t=int(LENGTHS.max()) + N_DECODE, seed=1):
    return np.random.default_rng(seed).integers(0, V, (b, t)).astype(np.int32)


def padded_prompts(toks, lengths):
    out = np.zeros((len(lengths), int(lengths.max())), np.int32)
    for i, n in enumerate(lengths):
        out[i, :n] = toks[i, :n]
    return out


def close(a, b, tol):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                               rtol=tol, atol=tol)


@functools.lru_cache(maxsize=None)
def decoder_for(model, batch=3, max_len=24):
    """One Decoder per (model, shape), shared by the tests: compilation is most of their time."""
    return make_decoder(model, batch=batch, max_len=max_len)


def decode_all(model, variables, toks, lengths, decoder=None):
    """Prefill the padded prompts, then feed each row's true next tokens: the logits of every
    step (prefill's last-token logits first), (N_DECODE + 1, B, V)."""
    dec = decoder or decoder_for(model, len(lengths))
    cache = dec.init_cache()
    logits, cache = dec.prefill(variables, cache, padded_prompts(toks, lengths), lengths)
    outs = [logits]
    for s in range(N_DECODE):
        logits, cache = dec.step(variables, cache, toks[np.arange(len(lengths)), lengths + s])
        outs.append(logits)
    return np.stack([np.asarray(o) for o in outs]), cache


@functools.lru_cache(maxsize=None)
def jitted_apply(model):
    return jax.jit(model.apply)


def full_forward_at(model, variables, toks, lengths):
    """Reference: one full forward over each row's prompt + true continuation; the logits at
    the positions the cached run produced, (N_DECODE + 1, B, V)."""
    full = np.asarray(jitted_apply(model)(variables, jnp.asarray(toks)))
    return np.stack([full[np.arange(len(lengths)), lengths - 1 + s] for s in range(N_DECODE + 1)])


# --------------------------------------------------------------------------------------------
# cached decoding == full forward


@pytest.mark.parametrize("scan", [False, True], ids=["unscanned", "scanned"])
@pytest.mark.parametrize("heads", HEADS, ids=HEADS)
def test_cached_decoding_equals_full_forward(heads, scan):
    cfg = cfg_of(HEADS[heads], scan_layers=scan)
    model, variables = model_and_vars(cfg)
    toks = seq_tokens()
    got, cache = decode_all(model, variables, toks, LENGTHS)
    want = full_forward_at(model, variables, toks, LENGTHS)
    assert np.abs(want).max() > 1.0                  # logits far from 0: a tight check matters
    close(got, want, 1e-5)
    np.testing.assert_array_equal(np.asarray(cache.lengths), LENGTHS + N_DECODE)
    if scan:
        assert cache.layers.k.shape == (2, 3, 24, HEADS[heads], 8)   # stacked: leading layers
    else:
        assert len(cache.layers) == 2 and cache.layers[0].k.shape == (3, 24, HEADS[heads], 8)


@pytest.mark.slow          # the same attention code as the grid above; ~4 s of compiles each
@pytest.mark.parametrize("kw", [dict(norm="batchnorm", norm_position="post",
                                     tie_embeddings=True),
                                dict(norm="layernorm", attn_block_q=0, ffn_type="gelu"),
                                dict(remat="full")],
                         ids=["bn-post-tied", "ln-masked-path", "remat"])
def test_cached_decoding_other_model_variants(kw):
    """Post-norm with BatchNorm (eval statistics), tied embeddings, the general masked prefill
    path (attn_block_q=0), remat-wrapped blocks."""
    model, variables = model_and_vars(cfg_of(2, scan_layers=True, **kw))   # scanned: BN stats
    toks = seq_tokens()                                                     # stacked as well
    got, _ = decode_all(model, variables, toks, LENGTHS)
    close(got, full_forward_at(model, variables, toks, LENGTHS), 1e-5)


def test_decode_several_tokens_per_call():
    """decode with T=3 new tokens per row at once == the full forward at those positions."""
    model, variables = model_and_vars(cfg_of(2, scan_layers=True))
    toks = seq_tokens()
    full = np.asarray(jitted_apply(model)(variables, jnp.asarray(toks)))
    cache = model.init_cache(3, 24)
    assert cache.layers.k.shape[0] == 2
    mask = jnp.arange(9)[None, :] < jnp.asarray(LENGTHS)[:, None]
    apply = jax.jit(model.apply, static_argnames="decode")
    logits, cache = apply(variables, jnp.asarray(padded_prompts(toks, LENGTHS)),
                          token_mask=mask, cache=cache)
    for b, n in enumerate(LENGTHS):                    # prefill: every prompt position
        close(logits[b, :n], full[b, :n], 1e-5)
    new = np.stack([toks[b, n:n + 3] for b, n in enumerate(LENGTHS)])
    logits, cache = apply(variables, jnp.asarray(new), cache=cache, decode=True)
    for b, n in enumerate(LENGTHS):
        close(logits[b], full[b, n:n + 3], 1e-5)
    np.testing.assert_array_equal(np.asarray(cache.lengths), LENGTHS + 3)


def _op_sets():
    sets = [ops_lib.xla_ops(), cpu_xla_ops()]
    try:
        sets.append(cpu_kernels.native_ops())
    except RuntimeError:
        pass                       # tests/unit/platform/test_kernels.py fails loudly where they should build
    return sets


def test_every_ops_set_decodes_the_same():
    """The decode op is a member of every ops set (xla, cpu-xla: the XLA op; cpu-native: the
    native decode kernel); prefill runs each set's causal core. All give the logits of the
    (default ops) full forward."""
    cfg = cfg_of(2, scan_layers=True)
    toks = seq_tokens()
    want = full_forward_at(*model_and_vars(cfg), toks, LENGTHS)
    names = []
    for ops in _op_sets():
        # ops=None resolves to the cpu-xla set on CPU: that model shares the grid's compilations
        default = ops_lib.resolve(None) is ops
        model, variables = model_and_vars(cfg, None if default else ops)
        if ops.name == "cpu-native":
            from tfm_jax.platform.kernels import cpu
            assert ops.cached_attention is cpu.cached_attention
        else:
            assert ops.cached_attention is cached_attention
        got, _ = decode_all(model, variables, toks, LENGTHS)
        close(got, want, 1e-5)
        names.append(ops.name)
    assert names[:2] == ["xla", "cpu-xla"]


def test_decode_never_repeats_kv_per_query_head():
    """No value in the decode step has S cache slots x H query heads x Dh (K/V repeated to the
    query-head count); the probe finds such a value when K/V are repeated (it can fail)."""
    from test_layers import _all_shapes      # tests/unit/layers, beside this file

    b, s, h, hkv, d = 2, 11, 8, 2, 4
    q = jnp.ones((b, 1, h, d))
    k = v = jnp.ones((b, s, hkv, d))
    pos = jnp.full((b, 1), 5, jnp.int32)
    shapes = _all_shapes(jax.make_jaxpr(cached_attention)(q, k, v, pos).jaxpr)
    assert not [sh for sh in shapes if s in sh and h in sh and d in sh]
    rep = lambda q, k, v: cached_attention(q, jnp.repeat(k, 4, 2), jnp.repeat(v, 4, 2), pos)  # noqa: E731
    assert [sh for sh in _all_shapes(jax.make_jaxpr(rep)(q, k, v).jaxpr)
            if s in sh and h in sh and d in sh]


# --------------------------------------------------------------------------------------------
# the decode op


@pytest.mark.parametrize("fmt,per_head", [("none", True), ("int8", True), ("int8", False),
                                          ("fp8", True)])
def test_cached_attention_matches_masked_reference(fmt, per_head):
    """cached_attention (scales folded into scores / probabilities) == grouped_attention over
    the dequantized cache with the causal mask of each query's absolute position."""
    r = np.random.default_rng(3)
    b, t, s, h, hkv, d = 3, 2, 10, 4, 2, 8
    q = jnp.asarray(r.normal(size=(b, t, h, d)), jnp.float32)
    k = jnp.asarray(2 * r.normal(size=(b, s, hkv, d)), jnp.float32)
    v = jnp.asarray(r.normal(size=(b, s, hkv, d)), jnp.float32)
    qpos = jnp.asarray([[3, 4], [8, 9], [0, 1]], jnp.int32)
    if fmt == "none":
        got = cached_attention(q, k, v, qpos)
        kd, vd = k, v
    else:
        kq, ks = kv.quantize_kv(k, fmt, per_head)
        vq, vs = kv.quantize_kv(v, fmt, per_head)
        got = cached_attention(q, kq, vq, qpos, ks, vs)
        kd, vd = kv.dequantize_kv(kq, ks), kv.dequantize_kv(vq, vs)
        assert float(jnp.abs(kd - k).max()) > 1e-3              # quantization did something
    kpos = jnp.broadcast_to(jnp.arange(s), (b, s))
    want = grouped_attention(q, kd, vd, make_attention_mask(qpos, kpos))
    close(got, want, 1e-5)


# --------------------------------------------------------------------------------------------
# quantization against numpy + ml_dtypes


def np_scale(x, fmt, per_head):
    qmax = np.float32(127.0 if fmt == "int8" else float(ml_dtypes.finfo(
        ml_dtypes.float8_e4m3fn).max))
    amax = np.abs(x).max(-1) if per_head else np.abs(x).max((-2, -1))[..., None]
    with np.errstate(divide="ignore"):
        scale = (qmax / amax).astype(np.float32)          # multiplicative: q = x * scale
    return np.where(amax > 0, scale, np.float32(1)), qmax


def np_quantize(x, fmt, per_head, scale=None):
    """Reference: float32 numpy, ml_dtypes casts (given ``scale``: quantize with it)."""
    x = np.asarray(x, np.float32)
    ref_scale, qmax = np_scale(x, fmt, per_head)
    scale = ref_scale if scale is None else np.asarray(scale, np.float32)
    y = np.clip(x * scale[..., None], -qmax, qmax)
    q = np.round(y).astype(np.int8) if fmt == "int8" else y.astype(ml_dtypes.float8_e4m3fn)
    return q, scale


def _test_values(seed=0):
    r = np.random.default_rng(seed)
    x = r.normal(size=(4, 6, 3, 16)) * np.exp(r.uniform(-6, 6, size=(4, 6, 3, 1)))
    x[0, 0] = 0.0                                     # a whole token is zero (per token: amax 0)
    x[1, 2, 1] = 0.0                                  # one (token, head) is zero
    return x.astype(np.float32)


@pytest.mark.parametrize("per_head", [True, False], ids=["per_token_head", "per_token"])
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_quantize_matches_numpy_ml_dtypes_reference(fmt, per_head):
    x = _test_values()
    q, s = kv.quantize_kv(jnp.asarray(x), fmt, per_head)
    assert q.dtype == {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}[fmt]
    assert s.shape == (4, 6, 3 if per_head else 1) and s.dtype == jnp.float32
    # scale = qmax / amax (the package's multiplicative convention) to the last bit; zero rows
    # exactly 1
    np.testing.assert_array_equal(np.asarray(s), np_scale(x, fmt, per_head)[0])
    # values: bit-exact against numpy + ml_dtypes given the same scale
    q_ref, _ = np_quantize(x, fmt, per_head, scale=s)
    np.testing.assert_array_equal(np.asarray(q).view(np.uint8), q_ref.view(np.uint8))
    # dequantization: error within half a step (int8) / half an e4m3 ulp (3 mantissa bits)
    deq = np.asarray(kv.dequantize_kv(q, s))
    step = 1 / np.asarray(s)[..., None]
    if fmt == "int8":
        assert np.all(np.abs(deq - x) <= 0.5 * np.asarray(step) * (1 + 1e-5) + 1e-30)
    else:
        normal = np.abs(x) >= float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).smallest_normal) \
            * np.asarray(step)
        assert np.all(np.abs(deq - x)[normal] <= 2.0 ** -4 * np.abs(x)[normal] * (1 + 1e-5))
    assert np.isfinite(deq).all()


@pytest.mark.parametrize("per_head", [True, False], ids=["per_token_head", "per_token"])
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_quantization_saturates_at_amax(fmt, per_head):
    """A value at exactly +amax / -amax maps to +qmax / -qmax (no int8 wrap to -128, no e4m3
    NaN), including amax values whose scaling rounds just above qmax in float32; zero rows
    give scale 1, zeros, no NaN."""
    qmax = kv.QMAX[fmt]
    r = np.random.default_rng(5)
    amax = np.exp(r.uniform(-20, 20, size=4000)).astype(np.float32)
    # the amax values where float32 amax * (qmax / amax) lands above qmax (clipping matters)
    over = amax[amax * (np.float32(qmax) / amax) > np.float32(qmax)]
    assert over.size > 0
    rows = np.concatenate([over[:8], amax[:8], [0.0]]).astype(np.float32)
    x = np.zeros((rows.size, 2, 4), np.float32)               # (token, head, D)
    x[:, 0, 0], x[:, 0, 1] = rows, -rows                      # +amax and -amax
    x[:, 1, 2] = rows * 0.5
    q, s = kv.quantize_kv(jnp.asarray(x), fmt, per_head)
    qf = np.asarray(q).astype(np.float32)
    np.testing.assert_array_equal(qf[:-1, 0, 0], qmax)
    np.testing.assert_array_equal(qf[:-1, 0, 1], -qmax)
    assert np.isfinite(qf).all() and np.abs(qf).max() <= qmax
    assert np.all(qf[-1] == 0) and np.all(np.asarray(s)[-1] == 1)
    deq = np.asarray(kv.dequantize_kv(q, s))
    assert np.isfinite(deq).all()
    np.testing.assert_allclose(deq[:, 0, 0], rows, rtol=1e-6)


def test_cache_write_quantizes_rows_at_their_positions():
    """write() stores each row's new token at its own position, quantized like quantize_kv."""
    cache = kv.init_cache(n_layers=1, batch=2, max_len=6, n_kv_heads=2, head_dim=4,
                          kv_cache="int8").layers[0]
    r = np.random.default_rng(2)
    k, v = (jnp.asarray(r.normal(size=(2, 1, 2, 4)), jnp.float32) for _ in range(2))
    out = kv.write(cache, k, v, jnp.asarray([1, 4], jnp.int32))
    kq, ks = kv.quantize_kv(k, "int8")
    for b, pos in enumerate([1, 4]):
        np.testing.assert_array_equal(np.asarray(out.k[b, pos]), np.asarray(kq[b, 0]))
        np.testing.assert_array_equal(np.asarray(out.k_scale[b, pos]), np.asarray(ks[b, 0]))
        others = [p for p in range(6) if p != pos]
        assert not np.asarray(out.k[b, others]).any()


# --------------------------------------------------------------------------------------------
# bytes, compilation, generation


@pytest.mark.parametrize("fmt,scale,scan", [("none", "per_token_head", False),
                                            ("int8", "per_token_head", True),
                                            ("fp8", "per_token", False)])
def test_bytes_of_cache_equals_formula(fmt, scale, scan):
    """Real allocation == 2 * layers * B * max_len * Hkv * Dh * bytes (+ float32 scales:
    2 * layers * B * max_len * (Hkv or 1) * 4), the tiny config's shape."""
    cfg = load_config(None, [f"model.scan_layers={str(scan).lower()}"]).model   # configs/tiny
    layers, hkv, dh, b, s = cfg.n_layers, cfg.n_kv_heads, cfg.resolved_head_dim, 3, 50
    dec = make_decoder(TransformerLM(cfg), batch=b, max_len=s, kv_cache=fmt, kv_scale=scale)
    cache = dec.init_cache()
    nbytes = {"none": 4, "int8": 1, "fp8": 1}[fmt]
    want = 2 * layers * b * s * hkv * dh * nbytes
    if fmt != "none":
        want += 2 * layers * b * s * (hkv if scale == "per_token_head" else 1) * 4
    assert bytes_of_cache(cache) == want
    assert sum(x.nbytes for x in jax.tree.leaves(cache)) == want + 4 * b   # + lengths (B,)


# The generation tests share one decoder (the grid's GQA unscanned model, batch 3) and padded
# prompt width 7, so generate's prefill and loop compile once for all of them.
PROMPTS = [[3, 1, 4, 1, 5], [9, 2], [6, 5, 3, 5, 8, 9, 7]]


def test_one_compilation_per_decode_step():
    """Decoder.step runs compiled once for many steps; generate compiles its prefill and its
    decode loop once and reuses them for new prompts of the same padded shape (one row idle)."""
    model, variables = model_and_vars(cfg_of(2))
    dec = decoder_for(model)
    decode_all(model, variables, seq_tokens(), LENGTHS, decoder=dec)
    decode_all(model, variables, seq_tokens(seed=9), LENGTHS, decoder=dec)
    assert dec.traces["step"] == 1 and dec.traces["prefill"] == 1
    assert dec._step._cache_size() == 1
    for i in range(3):
        prompts = [[(t + i) % V for t in p] for p in PROMPTS[1:]]      # 2 prompts, 1 idle row
        g = generate(dec, variables, prompts, max_new_tokens=8, temperature=0.0)
        assert g.decode_steps == 7 and [len(t) for t in g.tokens] == [8, 8]
        assert g.decode_tokens == 2 * 7
    assert dec.traces["loop"] == 1 and dec.traces["start"] == 1
    assert dec._loop._cache_size() == 1


def test_greedy_generate_equals_full_forward_argmax():
    """Batched greedy generation (rows of different prompt lengths) == per row, repeatedly
    appending the argmax of one full forward over prompt + generated so far."""
    model, variables = model_and_vars(cfg_of(2))
    g = generate(decoder_for(model), variables, PROMPTS, max_new_tokens=8)
    fwd = jitted_apply(model)
    ids = [list(p) for p in PROMPTS]
    for _ in range(8):          # one compiled shape (3, 15): causal, so the zero tail is inert
        logits = np.asarray(fwd(variables, jnp.asarray([r + [0] * (15 - len(r)) for r in ids])))
        for r, row in zip(ids, logits):
            r.append(int(np.argmax(row[len(r) - 1])))
    assert [t.tolist() for t in g.tokens] == [r[len(p):] for r, p in zip(ids, PROMPTS)]
    assert g.decode_tokens == 3 * 7 and g.prefill_s > 0 and g.decode_tokens_per_s > 0


def test_per_row_stop_ids():
    """A row that samples a stop id ends there (the id is not returned) and its cache stops
    growing; the other rows go on to max_new_tokens."""
    model, variables = model_and_vars(cfg_of(2))
    prompts = PROMPTS
    dec = decoder_for(model)
    unused = [V + 5, V + 6]                          # ids never sampled (beyond the vocab)
    free = generate(dec, variables, prompts, max_new_tokens=8, stop_ids=unused)
    row0 = free.tokens[0].tolist()
    stop = row0[3]                                   # row 0 emits it as its 4th new token
    k = row0.index(stop)
    others = [i for i in (1, 2) if stop not in free.tokens[i].tolist()]
    assert others, "pick another stop id: every row emits this one"
    loops = dec.traces["loop"]
    g = generate(dec, variables, prompts, max_new_tokens=8, stop_ids=[stop, V + 5])
    assert dec.traces["loop"] == loops              # same shapes: the compiled loop is reused
    assert g.tokens[0].tolist() == row0[:k] and g.stopped[0]
    for i in others:
        assert g.tokens[i].tolist() == free.tokens[i].tolist() and not g.stopped[i]
    lengths = np.asarray(g.cache.lengths)
    assert lengths[0] == len(prompts[0]) + k         # prompt + the k tokens fed before stopping
    for i in others:
        assert lengths[i] == len(prompts[i]) + 7     # every new token but the last one fed


def test_generate_rejects_bad_input():
    model, variables = model_and_vars(cfg_of(2))
    dec = make_decoder(model, batch=2, max_len=8)
    with pytest.raises(ValueError, match="max_len"):
        generate(dec, variables, [[1, 2, 3]], max_new_tokens=7)
    with pytest.raises(ValueError, match="batch"):
        generate(dec, variables, [[1], [2], [3]], max_new_tokens=2)
    with pytest.raises(ValueError, match="empty"):
        generate(dec, variables, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p"):
        generate(dec, variables, [[1]], max_new_tokens=2, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="lengths"):
        dec.prefill(variables, dec.init_cache(), np.zeros((2, 4), np.int32), np.array([0, 2]))
    with pytest.raises(ValueError, match="kv_cache"):
        make_decoder(model, batch=1, max_len=4, kv_cache="int4")
    with pytest.raises(ConfigError, match="quant.kv_cache"):
        load_config(None, ["quant.kv_cache=int4"])


def test_step_past_a_full_cache_raises(capfd):
    """A step on a row whose cache is full raises (it would overwrite the last slot and return
    wrong logits) -- from the eager call and from inside the caller's jax.jit; steps that fit
    still run."""
    model, variables = model_and_vars(cfg_of(2))
    dec = make_decoder(model, batch=2, max_len=4)
    cache = dec.init_cache()
    _, cache = dec.prefill(variables, cache, np.ones((2, 3), np.int32), np.array([3, 2]))
    _, cache = dec.step(variables, cache, np.ones(2, np.int32))         # row 0 now holds 4
    np.testing.assert_array_equal(np.asarray(cache.lengths), [4, 3])
    with pytest.raises(ValueError, match="row 0 already holds 4 positions.*max_len=4"):
        dec.step(variables, cache, np.ones(2, np.int32))
    jitted = jax.jit(lambda c, t: dec.step(variables, c, t))
    with pytest.raises(Exception, match="row 0 already holds 4 positions.*max_len=4"):
        jax.block_until_ready(jitted(cache, jnp.ones(2, jnp.int32)))
    capfd.readouterr()


# --------------------------------------------------------------------------------------------
# teacher-forced evaluation through the cache


def test_eval_through_cache():
    """Unquantized: equal to the full forward's mean next-token loss. int8: close to it but not
    equal (the quantized cache is really read). (e4m3 reads: the op-level tests.)"""
    model, variables = model_and_vars(cfg_of(2, scan_layers=True))
    toks = jnp.asarray(seq_tokens(seed=3))        # the shape of the grid: shares its forward
    logits = jitted_apply(model)(variables, toks)
    ref = float(optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], toks[:, 1:])
                .mean())
    assert eval_through_cache(model, variables, toks) == pytest.approx(ref, rel=1e-5)
    d8 = abs(eval_through_cache(model, variables, toks, kv_cache="int8") - ref)
    assert 0 < d8 < 0.01 * ref


# --------------------------------------------------------------------------------------------
# sharding


def test_cache_names_have_default_rules():
    names = {n for n, _ in DEFAULT_RULES}
    assert set(kv.CACHE_NAMES) <= names
    cache = kv.init_cache(n_layers=2, batch=8, max_len=4, n_kv_heads=2, head_dim=4,
                          kv_cache="int8", stacked=True)
    used = mesh_lib.used_logical_names(kv.logical_axes(cache))
    assert used == {"layers", "cache_batch", "cache_length", "kv_heads", "head_dim"}
    mesh_lib.check_rules_cover(kv.logical_axes(cache), DEFAULT_RULES)


def test_sharded_decode_equals_single_device(devices):
    """prefill + decode steps with the batch over 8 fake devices (mesh data=8) == one device;
    the cache is sharded over `data` by the rule table."""
    cfg = cfg_of(2, scan_layers=True)
    b = 8
    lengths = np.array([5, 9, 3, 7, 1, 9, 4, 2])
    toks = seq_tokens(b, 9 + N_DECODE, seed=4)
    model, variables = model_and_vars(cfg)
    want = full_forward_at(model, variables, toks, lengths)   # unsharded (one device)

    mesh = mesh_lib.make_mesh(MeshConfig(data=8), devices)
    rules = mesh_lib.rules_tuple(DEFAULT_RULES)
    specs = nn.get_partition_spec(jax.eval_shape(model.init, jax.random.key(0),
                                                 jnp.zeros((1, 8), jnp.int32)))
    sharded_vars = jax.device_put(variables, mesh_lib.logical_to_sharding(specs, mesh, rules))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        dec = make_decoder(model, batch=b, max_len=24)       # traced under the mesh
        got, cache = decode_all(model, sharded_vars, toks, lengths, decoder=dec)
    close(got, want, 1e-5)
    k = cache.layers.k
    assert isinstance(k.sharding, NamedSharding) and len(k.sharding.device_set) == 8
    assert tuple(k.sharding.spec)[:2] == (None, "data")          # (layers, cache_batch, ...)
    assert k.addressable_shards[0].data.shape == (2, 1, 24, 2, 8)


def test_rule_table_without_cache_names_gets_their_defaults(devices):
    """A run saved before the cache's logical names existed (its mesh.rules lack them): the
    decoder adds their default rules, so the cache is still sharded over the batch axes."""
    cfg = cfg_of(2)
    mesh = mesh_lib.make_mesh(MeshConfig(data=8), devices)
    old = mesh_lib.rules_tuple([r for r in DEFAULT_RULES if not r[0].startswith("cache_")])
    with jax.set_mesh(mesh), nn.logical_axis_rules(old):
        cache = make_decoder(TransformerLM(cfg), batch=8, max_len=4, kv_cache="int8",
                             kv_scale="per_token").init_cache()
    for x in (cache.layers[0].k, cache.layers[1].v_scale, cache.lengths):
        assert tuple(x.sharding.spec)[0] == "data", x.sharding
