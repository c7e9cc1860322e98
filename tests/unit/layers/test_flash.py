"""Long-context attention cores (tfm_jax.layers.attention_ops.flash) and their ``backend.attention`` seam.

Every core is checked against the masked reference ``grouped_attention`` +
``make_attention_mask`` (values and gradients, fp32); the flash core also for what makes it a
long-context core: a compiled program that does not grow with T, O(T) residuals and memory, and
the same numbers sharded over the 8 fake CPU devices.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

from tfm_jax.platform import backends
from tfm_jax.config import ConfigError, ModelConfig, load_config
from tfm_jax.layers import ops as ops_lib
from tfm_jax.layers.attention_ops import paged
from tfm_jax.layers.attention_ops.block import causal_attention
from tfm_jax.layers.attention_ops.dense import (dense_causal_attention, grouped_attention,
                                                make_attention_mask)
from tfm_jax.platform.xla_cpu import cpu_xla_ops
from tfm_jax.layers.attention_ops.flash import (flash_attention, flash_blocks,
                                                sdpa_seq_lengths_attention, xla_sdpa_attention)
from tfm_jax.model import TransformerLM

TOL = 1e-5


def _inputs(b, t, h, hkv, d, seed=0, dtype=jnp.float32):
    r = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(r.normal(size=(b, t, n, d)), dtype) for n in (h, hkv, hkv))
    w = jnp.asarray(r.normal(size=(b, t, h, d)), jnp.float32)     # loss weights: dO
    return q, k, v, w


def _valid(b, t, kinds=("none", "right", "holes", "right")):
    """(B, T) bool key padding, one kind per row (cycled): no padding, right padding (rows of
    different lengths), holes inside a row. One batch covers every kind: one compilation."""
    valid = np.ones((b, t), bool)
    for row in range(b):
        kind = kinds[row % len(kinds)]
        if kind == "right":
            valid[row, max(1, t - 1 - 7 * row):] = False
        elif kind == "holes":
            valid[row, 1:max(2, t // 3)] = False
    return jnp.asarray(valid)


def _reference(q, k, v, k_valid):
    b, t = q.shape[:2]
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    return grouped_attention(q, k, v, make_attention_mask(pos, pos, k_valid))


@functools.partial(jax.jit, static_argnums=0)
def _value_and_grads(core, q, k, v, k_valid, w):
    """core(q, k, v, k_valid) and the gradients of sum(core * w) wrt q, k, v: one jit, with
    k_valid an argument (every padding pattern shares the compilation)."""
    def loss(q, k, v):
        out = core(q, k, v, k_valid)
        return jnp.sum(out.astype(jnp.float32) * w), out
    grads, out = jax.grad(loss, (0, 1, 2), has_aux=True)(q, k, v)
    return out, grads


def _assert_matches_reference(core, q, k, v, w, k_valid, tol=TOL):
    y, grads = _value_and_grads(core, q, k, v, k_valid, w)
    y_ref, g_ref = _value_and_grads(_reference, q, k, v, k_valid, w)
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=tol, atol=tol)
    for name, g, gr in zip("qkv", grads, g_ref):
        assert g.shape == gr.shape, name
        np.testing.assert_allclose(np.asarray(g), np.asarray(gr), rtol=tol, atol=tol,
                                   err_msg=f"d{name}")


# ------------------------------------------------------------------------------ flash numerics


@pytest.mark.parametrize("heads,t,block_q,block_k", [
    ((4, 4), 37, 8, 16),     # T not a multiple of either block, block_q < block_k
    ((4, 2), 37, 16, 8),     # block_q > block_k
    ((4, 1), 37, 8, 16),
    ((4, 2), 64, 16, 16),    # exact multiple
    ((4, 4), 5, 128, 256),   # T smaller than one block (the defaults)
    ((4, 2), 5, 128, 256),
    ((4, 1), 5, 128, 256),
], ids=["MHA-T37-q8k16", "GQA-T37-q16k8", "MQA-T37-q8k16", "GQA-T64-q16k16", "MHA-T5",
        "GQA-T5", "MQA-T5"])
def test_flash_equals_masked_reference(heads, t, block_q, block_k):
    """Rows: no padding, right padding, holes, and a second right-padded row (other length)."""
    q, k, v, w = _inputs(4, t, *heads, 8, seed=t + 10 * heads[1])
    core = functools.partial(flash_attention, block_q=block_q, block_k=block_k)
    _assert_matches_reference(core, q, k, v, w, _valid(4, t))


def test_flash_default_blocks_long_sequence():
    """Defaults on a sequence of several blocks, head_dim 32, right-padded rows."""
    q, k, v, w = _inputs(2, 600, 4, 2, 32, seed=3)
    _assert_matches_reference(flash_attention, q, k, v, w, _valid(2, 600, ("right",)))


def test_flash_bfloat16_and_fully_masked_rows():
    """bf16 inputs: float32 scores/statistics inside, bf16 output within bf16 rounding of the
    fp32 reference. A row whose keys are all padding gives zeros and finite gradients and
    leaves the other rows alone."""
    q, k, v, w = _inputs(2, 50, 4, 2, 16, seed=5)
    kv = jnp.asarray(np.arange(50)[None] < np.array([[40], [0]]))
    core = functools.partial(flash_attention, block_q=16, block_k=16)
    y, grads = _value_and_grads(core, *(x.astype(jnp.bfloat16) for x in (q, k, v)), kv, w)
    assert y.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    assert all(bool(jnp.isfinite(x.astype(jnp.float32)).all()) for x in (y, *grads))
    np.testing.assert_allclose(np.asarray(y[0], np.float32),
                               np.asarray(_reference(q, k, v, kv)[0]), atol=3e-2)
    assert not np.asarray(y[1], np.float32).any()


def _keyless_cores():
    cores = {"dense": dense_causal_attention, "xla_sdpa": xla_sdpa_attention,
             "block": functools.partial(causal_attention, block_q=8),
             "flash": functools.partial(flash_attention, block_q=8, block_k=8)}
    from tfm_jax.platform.kernels import cpu as native
    ok, _ = native.available()
    if ok:
        cores["native"] = functools.partial(native.causal_attention, block_q=8)
    return cores


@pytest.mark.parametrize("name", ["dense", "xla_sdpa", "block", "flash", "native"])
def test_rows_without_a_valid_key_are_zero_in_every_core(name):
    """Left padding: the leading queries of a row see no valid key. Every core returns 0 there
    and takes no gradient from those rows: values and gradients equal the masked reference with
    those rows' output (and so their loss weight) set to 0 -- the rows found by numpy."""
    cores = _keyless_cores()
    if name not in cores:
        pytest.skip("native kernels unavailable here")
    t = 21
    q, k, v, w = _inputs(3, t, 4, 2, 8, seed=23)
    lead = np.array([5, 0, 20])                         # left padding per row (row 2: all but 1)
    valid_np = np.arange(t)[None] >= lead[:, None]
    valid_np[1, :] = False                              # row 1: no valid key at all
    kv = jnp.asarray(valid_np)
    has_key = np.cumsum(valid_np, axis=1) > 0           # numpy: a valid key at or before t

    def reference(q, k, v, k_valid):
        return jnp.where(jnp.asarray(has_key)[:, :, None, None], _reference(q, k, v, k_valid),
                         0.0)

    y, grads = _value_and_grads(cores[name], q, k, v, kv, w)
    y_ref, g_ref = _value_and_grads(reference, q, k, v, kv, w)
    assert not np.asarray(y)[~has_key].any() and (~has_key).sum() == 5 + 21 + 20
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=TOL, atol=TOL)
    for n, g, gr in zip("qkv", grads, g_ref):
        np.testing.assert_allclose(np.asarray(g), np.asarray(gr), rtol=TOL, atol=TOL,
                                   err_msg=f"d{n}")


def test_flash_blocks_and_bad_input():
    assert flash_blocks(5, 128, 256) == (5, 5, 5)               # one block, no padding
    assert flash_blocks(100, 128, 64) == (128, 64, 128)
    assert flash_blocks(100, 64, 256) == (64, 128, 128)
    assert flash_blocks(1000, 128, 256) == (128, 256, 1024)
    with pytest.raises(ValueError, match="one must divide the other"):
        flash_blocks(100, 48, 64)
    with pytest.raises(ValueError, match="must be >= 1"):
        flash_blocks(100, 0, 64)
    q, k, v, _ = _inputs(1, 8, 4, 2, 8)
    with pytest.raises(ValueError, match="k_valid .* must be \\(B, T\\)"):
        flash_attention(q, k, v, jnp.ones((1, 7), bool))
    with pytest.raises(ValueError, match="not a multiple of 3 kv heads"):
        flash_attention(q, jnp.ones((1, 8, 3, 8)), jnp.ones((1, 8, 3, 8)))
    with pytest.raises(ValueError, match="must both be \\(B, T, Hkv, D\\)"):
        flash_attention(q, k, v[:, :4])


# ------------------------------------------------------------- long-context properties (flash)


def _grad_fn(core):
    return jax.grad(lambda q, k, v: jnp.sum(core(q, k, v) ** 2), (0, 1, 2))


def _shapes(t, h=8, hkv=2, d=32):
    return [jax.ShapeDtypeStruct((1, t, n, d), jnp.float32) for n in (h, hkv, hkv)]


def _n_ops(core, t):
    """Operations in the lowered (StableHLO) forward+backward program at sequence length t."""
    text = jax.jit(_grad_fn(core)).lower(*_shapes(t)).as_text()
    return sum(" = " in line for line in text.splitlines())


def test_flash_program_does_not_grow_with_t():
    """Same program at T=512 and T=2048 (loops, not unrolled blocks); the block-causal core,
    unrolled over query blocks, is the control: its program grows with T."""
    flash = functools.partial(flash_attention, block_q=128, block_k=256)
    small, big = _n_ops(flash, 512), _n_ops(flash, 2048)
    assert abs(big - small) <= 0.02 * small, (small, big)
    block = functools.partial(causal_attention, block_q=128)
    assert _n_ops(block, 2048) > 3 * _n_ops(block, 512)


def test_flash_residuals_are_linear_in_t():
    """What the forward keeps for the backward: q, k, v, the output and one log-sum-exp per
    row -- nothing of size T x T (the dense core keeps its probabilities: the control)."""
    t, h, d = 256, 8, 32
    q, k, v, _ = _inputs(1, t, h, 2, d)

    def residual_sizes(core):
        _, vjp_fn = jax.vjp(core, q, k, v)
        return sorted(x.size for x in jax.tree.leaves(vjp_fn) if hasattr(x, "size"))

    flash = residual_sizes(functools.partial(flash_attention, block_q=64, block_k=64))
    assert flash and max(flash) <= t * h * d, flash
    assert sum(flash) <= 6 * t * h * d, flash                    # q,k,v,o + lse + mask
    assert max(residual_sizes(dense_causal_attention)) >= t * t


def test_flash_memory_grows_linearly():
    """XLA's temp buffer of the compiled forward+backward: x4 the sequence -> <= ~x4 the
    memory (O(T), plus the fixed tiles); the dense core's grows ~x16."""
    def temp(core, t):
        return jax.jit(_grad_fn(core)).lower(*_shapes(t)).compile().memory_analysis() \
            .temp_size_in_bytes

    flash = functools.partial(flash_attention, block_q=128, block_k=256)
    assert temp(flash, 4096) <= 4.5 * temp(flash, 1024)
    assert temp(dense_causal_attention, 1024) >= 10 * temp(dense_causal_attention, 256)


def test_flash_sharded_equals_unsharded(devices):
    """Batch over `data`, heads over `tensor` (2 x 4 fake devices): same values and grads."""
    mesh = jax.sharding.Mesh(np.array(devices).reshape(2, 4), ("data", "tensor"),
                             axis_types=(jax.sharding.AxisType.Auto,) * 2)
    q, k, v, w = _inputs(2, 40, 8, 4, 8, seed=11)
    kv = _valid(2, 40, ("right",))
    core = functools.partial(flash_attention, block_q=16, block_k=16)

    def f(q, k, v, kv, w):
        def loss(q, k, v):
            return jnp.sum(core(q, k, v, kv) * w)
        return core(q, k, v, kv), jax.grad(loss, (0, 1, 2))(q, k, v)

    heads = NamedSharding(mesh, P("data", None, "tensor", None))
    rows = NamedSharding(mesh, P("data", None))
    args = [jax.device_put(x, s) for x, s in
            zip((q, k, v, kv, w), (heads, heads, heads, rows, heads))]
    y_s, g_s = jax.jit(f)(*args)
    assert len(y_s.sharding.device_set) == 8
    y, g = jax.jit(f)(q, k, v, kv, w)
    np.testing.assert_allclose(np.asarray(y_s), np.asarray(y), rtol=TOL, atol=TOL)
    for a, b in zip(g_s, g):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=TOL, atol=TOL)


# ---------------------------------------------------------------- jax.nn.dot_product_attention


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=["MHA", "GQA", "MQA"])
def test_xla_sdpa_equals_masked_reference(heads):
    """k_valid as jax.nn's boolean ``mask`` (B, 1, 1, T) + is_causal: exact for any padding."""
    q, k, v, w = _inputs(3, 29, *heads, 8, seed=13)
    _assert_matches_reference(xla_sdpa_attention, q, k, v, w, _valid(3, 29))


def test_sdpa_seq_lengths_mapping():
    """The cuDNN core's padding mapping (``key_value_seq_lengths`` = valid keys per row), run
    through implementation="xla": exact for right-padded rows, not for holes (why the cuDNN
    core documents right padding and the XLA one uses ``mask``)."""
    q, k, v, w = _inputs(2, 29, 4, 2, 8, seed=17)
    core = functools.partial(sdpa_seq_lengths_attention, implementation="xla")
    _assert_matches_reference(core, q, k, v, w, _valid(2, 29, ("none", "right")))
    holes = _valid(2, 29, ("holes",))
    assert not np.allclose(core(q, k, v, holes), _reference(q, k, v, holes), atol=1e-3)


@pytest.mark.gpu
def test_cudnn_equals_masked_reference_on_gpu():
    from tfm_jax.layers.attention_ops.flash import cudnn_attention
    q, k, v, w = _inputs(2, 64, 8, 2, 32, seed=19)
    kv = _valid(2, 64, ("right",))
    bf = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    y = cudnn_attention(*bf, kv)
    np.testing.assert_allclose(np.asarray(y, np.float32),
                               np.asarray(_reference(*bf, kv), np.float32), atol=2e-2)


# ------------------------------------------------------------------- the backend.attention seam


@dataclasses.dataclass
class _FakeDevice:
    platform: str


def test_auto_keeps_the_sets_core_on_cpu(devices):
    for overrides in ([], ["backend.cpu_kernels=xla"]):
        cfg = load_config(overrides=overrides)
        assert cfg.backend.attention == "auto"
        for devs in (devices, devices[:1]):
            ops = backends.resolve_ops(cfg, devs)
            assert ops.attention_name == "" and "attention:" not in ops.describe()
            assert ops.causal_attention in (causal_attention, dense_causal_attention) or \
                ops.name == "cpu-native"


def test_auto_on_gpu_is_cudnn_where_supported_else_says_why(devices, monkeypatch):
    """backend.attention=auto on a GPU: cuDNN fused attention when jax accepts it for the run's
    dtype and shapes; otherwise the dense XLA core and one line saying why (float32 compute;
    here on CPU also the failed cuDNN lowering, with jax's reason)."""
    gpu = [_FakeDevice("gpu")]
    ops = backends.resolve_ops(load_config(), gpu)                          # float32
    assert ops.causal_attention is dense_causal_attention
    assert "attention: dense XLA, not cuDNN (cuDNN fused attention takes bf16/fp16, " \
        "model.dtype=float32)" in ops.describe() and "\n" not in ops.describe()
    bf16 = load_config(overrides=["model.dtype=bfloat16"])
    why = backends.cudnn_attention_unsupported(bf16, devices[:1])           # no cuDNN on CPU
    assert why and "\n" not in why and len(why) < 200
    assert "no GPU device" in backends.cudnn_attention_unsupported(bf16, gpu)
    packed = load_config(overrides=["model.dtype=bfloat16", "data.packing=segments"])
    assert "segments" in backends.cudnn_attention_unsupported(packed, devices[:1])
    monkeypatch.setattr(backends, "cudnn_attention_unsupported", lambda cfg, devs: None)
    ops = backends.resolve_ops(bf16, gpu)
    from tfm_jax.layers.attention_ops.flash import cudnn_attention
    assert ops.causal_attention is cudnn_attention and "cudnn" in ops.attention_name


@pytest.mark.gpu
def test_auto_on_gpu_compiles_cudnn_attention_into_the_train_step():
    """On a real GPU with bf16 compute the default core is cuDNN's: the compiled train step
    calls the cuDNN fused-attention kernels (forward and backward)."""
    from tfm_jax import train as train_lib

    cfg = load_config(overrides=["model.dtype=bfloat16", "data.seq_len=128",
                                 "train.batch_size=2"])
    setup = train_lib.build(cfg, jax.devices()[:1])
    assert "cudnn" in setup.ops.describe(), setup.ops.describe()
    state = setup.abstract_state()
    batch = {k: jax.ShapeDtypeStruct((2, 128), jnp.float32 if k == "mask" else jnp.int32,
                                     sharding=setup.batch_sharding)
             for k in ("inputs", "targets", "mask")}
    with setup.context():
        text = setup.train_step.lower(state, batch).compile().as_text()
    assert text.count("__cudnn$fmha") >= 2, "no cuDNN fused attention in the compiled step"


@pytest.mark.parametrize("choice,fn,word", [
    ("flash", flash_attention, "flash"), ("block", causal_attention, "block-causal"),
    ("dense", dense_causal_attention, "dense"), ("xla_sdpa", xla_sdpa_attention, "xla")])
def test_choice_replaces_the_core_and_is_named(devices, choice, fn, word):
    cfg = load_config(overrides=[f"backend.attention={choice}"])
    for devs in (devices, devices[:1], [_FakeDevice("gpu")]):
        ops = backends.resolve_ops(cfg, devs)
        assert ops.causal_attention is fn
        assert word in ops.attention_name
        assert f"; attention: {ops.attention_name}" in ops.describe()
        kernel = devs[0].platform == "gpu" and paged.unavailable() is None
        assert (ops.paged_attention is not None) == kernel


def test_cudnn_only_on_gpu(devices):
    from tfm_jax.layers.attention_ops.flash import cudnn_attention
    ok = ["backend.attention=cudnn", "model.dtype=bfloat16"]
    with pytest.raises(ConfigError, match="attention=cudnn needs a GPU.*cpu.*flash"):
        backends.resolve_ops(load_config(overrides=ok), devices[:1])
    with pytest.raises(ConfigError, match="attention=cudnn needs a GPU.*platform=cpu"):
        load_config(overrides=ok + ["backend.platform=cpu"])
    with pytest.raises(ConfigError, match="cudnn needs model.dtype bfloat16 or float16"):
        load_config(overrides=["backend.attention=cudnn"])
    with pytest.raises(ConfigError, match="multiple of 8.*got 12"):
        load_config(overrides=ok + ["model.head_dim=12"])
    gpu = backends.resolve_ops(load_config(overrides=ok), [_FakeDevice("gpu")])
    assert gpu.causal_attention is cudnn_attention and "cudnn" in gpu.describe()


def test_choice_needs_the_causal_path():
    with pytest.raises(ConfigError, match="attention=flash never runs with model.attn_block_q=0"):
        load_config(overrides=["backend.attention=flash", "model.attn_block_q=0"])


def _random_params(model, tokens):
    """Parameters of the model's shapes from numpy (no compiled init: RNG kernels are slow to
    compile on XLA:CPU): N(0, 0.1), norm scales around 1."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
    r = np.random.default_rng(0)
    return jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.asarray(r.normal(size=s.shape) * 0.1
                                    + ("norm" in jax.tree_util.keystr(path)), s.dtype),
        nn.meta.unbox(shapes))


@pytest.mark.parametrize("scan", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_lm_with_flash_equals_default(scan):
    """The LM through the seam (backend.attention=flash): same loss and gradients as the
    default ops, with right-padded rows."""
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      attn_block_q=8, scan_layers=scan)
    r = np.random.default_rng(1)
    tokens = jnp.asarray(r.integers(0, 64, (2, 40)), jnp.int32)
    mask = jnp.asarray(np.arange(40)[None] < np.array([[40], [29]]), jnp.float32)
    flash_ops = cpu_xla_ops().with_attention(*ops_lib.attention_core("flash"))
    assert flash_ops.causal_attention is flash_attention
    params = _random_params(TransformerLM(cfg), tokens)     # the same for every op set
    results = []
    for ops in (cpu_xla_ops(), flash_ops):
        model = TransformerLM(cfg, ops=ops)

        def loss(p, model=model):
            logits = model.apply({"params": p}, tokens, token_mask=mask)
            return -jnp.sum(jax.nn.log_softmax(logits)[..., 0] * mask) / mask.sum()

        results.append(jax.jit(jax.value_and_grad(loss))(params))
    (l0, g0), (l1, g1) = results
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g1, g0)
