"""FP8 weight storage (tfm_jax.quant.storage): stochastic rounding vs an ml_dtypes table, the
EMA scale, re-quantization in the train step, checkpoint bytes, grad accumulation, sharding and
resume with stored kernels."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from tfm_jax import data as data_lib
from tfm_jax.core import roles as param_roles
from tfm_jax.config import ConfigError, load_config
from tfm_jax.quant import storage
from tfm_jax.train import build

from fp8_support import batch_at, storage_cfg_of as cfg_of

E4M3 = ml_dtypes.float8_e4m3fn
E4M3_MAX = float(ml_dtypes.finfo(E4M3).max)
# every finite non-negative e4m3fn value, ascending (from the bit patterns, not from tfm_jax)
GRID = np.unique(np.abs(np.arange(256, dtype=np.uint8).view(E4M3).astype(np.float64)))
GRID = GRID[np.isfinite(GRID)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return data_lib.load_corpus(None, 0.05, str(tmp_path_factory.mktemp("cache")))


def neighbours(x):
    """(lo, hi): the e4m3fn values around |x| (equal when |x| is on the grid), signed like x."""
    a = np.minimum(np.abs(x), E4M3_MAX)
    i = np.searchsorted(GRID, a, side="right") - 1
    lo = GRID[i]
    hi = np.where(lo == a, lo, GRID[np.minimum(i + 1, len(GRID) - 1)])
    return np.sign(x) * lo, np.sign(x) * hi


# ------------------------------------------------------------------------------------------
# Pure numerics


def test_stochastic_round_lands_on_neighbours_and_keeps_grid_values():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, 400), rng.normal(0, 3e-3, 200),      # subnormals
                        rng.uniform(300, 600, 50) * rng.choice([-1, 1], 50),  # beyond max
                        GRID[::7], -GRID[1::11], [0.0]]).astype(np.float32)
    out = np.asarray(storage.stochastic_round(jnp.asarray(x), "float8_e4m3fn",
                                              jax.random.key(1))).astype(np.float64)
    lo, hi = neighbours(x.astype(np.float64))
    assert np.all((out == lo) | (out == hi)), x[(out != lo) & (out != hi)][:5]
    on_grid = lo == hi
    np.testing.assert_array_equal(out[on_grid], lo[on_grid])
    assert np.all(np.abs(out) <= E4M3_MAX) and not np.any(np.isnan(out))


def test_stochastic_round_is_unbiased():
    """The mean of n SR casts equals the value within 5 standard errors, with the standard
    error of a two-point (lo, hi) distribution: (hi - lo) * sqrt(p (1 - p) / n)."""
    x = np.array([1.01, 1.0625 + 0.01, -0.3, 2.7e-3, 200.0, 447.0, 0.0151], np.float32)
    n = 20000
    keys = jax.random.split(jax.random.key(7), n)
    casts = jax.vmap(lambda k: storage.stochastic_round(jnp.asarray(x), "float8_e4m3fn", k)
                     .astype(jnp.float32))(keys)
    mean = np.asarray(casts, np.float64).mean(axis=0)
    lo, hi = neighbours(x.astype(np.float64))
    p = (x - lo) / np.where(hi != lo, hi - lo, 1)
    se = np.abs(hi - lo) * np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(mean - x) <= 5 * se + 1e-7), (mean, x, se)
    # and round-to-nearest-even is biased on the same values (it always picks one side)
    rne = np.clip(x, -E4M3_MAX, E4M3_MAX).astype(E4M3).astype(np.float64)
    assert np.sum(np.abs(rne - x) > 5 * se + 1e-7) >= 5


def test_rne_loses_small_updates_sr_keeps_them():
    """w = 1 in e4m3 (step 0.125 above 1), 100 updates of +0.01: nearest-even rounds every one
    away (w stays 1.0); stochastic rounding ends at 2.0 on average."""
    spec_rne = storage.StorageSpec(margin=0)
    spec_sr = spec_rne._replace(stochastic_rounding=True)
    one = jnp.ones((), jnp.float32)
    q = storage.quantize_weight(one, one, spec_rne)
    for _ in range(100):
        q = storage.quantize_weight(storage.dequantize_weight(q, one) + 0.01, one, spec_rne)
    assert float(q.astype(jnp.float32)) == 1.0

    def run(key):
        def body(q, k):
            return storage.quantize_weight(storage.dequantize_weight(q, one) + 0.01, one,
                                           spec_sr, k), None
        q, _ = jax.lax.scan(body, storage.quantize_weight(one, one, spec_rne),
                            jax.random.split(key, 100))
        return q.astype(jnp.float32)
    finals = np.asarray(jax.vmap(run)(jax.random.split(jax.random.key(0), 2000)))
    assert abs(finals.mean() - 2.0) < 0.02, finals.mean()   # se ~ 0.125 * 0.5 / sqrt(2000)*~10


def test_quantize_dequantize_and_ema_scale_vs_numpy():
    rng = np.random.default_rng(3)
    w = rng.normal(0, 0.05, (3, 8, 6)).astype(np.float32)     # (L, in, out): scanned kernel
    spec = storage.StorageSpec()                               # margin 1, beta 0.999
    # per tensor, stacked: scale (L,)
    s = np.array([100.0, 200.0, 50.0], np.float32)
    q = np.asarray(storage.quantize_weight(jnp.asarray(w), jnp.asarray(s), spec))
    ref = np.clip(w * s[:, None, None], -E4M3_MAX, E4M3_MAX).astype(E4M3)
    np.testing.assert_array_equal(q.view(np.uint8), ref.view(np.uint8))
    np.testing.assert_array_equal(np.asarray(storage.dequantize_weight(jnp.asarray(q),
                                                                       jnp.asarray(s))),
                                  ref.astype(np.float32) * (np.float32(1) / s)[:, None, None])
    new = np.asarray(storage.update_scale(jnp.asarray(s), jnp.asarray(w), spec))
    amax = np.abs(w).reshape(3, -1).max(axis=1)
    expect = np.float32(0.999) * s + np.float32(0.001) * (np.float32(448.0) / amax / 2)
    np.testing.assert_allclose(new, expect, rtol=1e-6)
    # per channel (one unscanned (in, out) kernel): scale (1, out)
    w2 = w[0]
    s2 = np.asarray(storage.initial_scale(jnp.asarray(w2), spec._replace(
        granularity="per_channel"), n_in=1))
    assert s2.shape == (1, 6)
    np.testing.assert_allclose(s2[0], 448.0 / np.abs(w2).max(axis=0) / 2, rtol=1e-6)
    # a zero kernel keeps its scale
    kept = storage.update_scale(jnp.float32(5.0), jnp.zeros((4, 4)), spec)
    assert float(kept) == 5.0


# ------------------------------------------------------------------------------------------
# Through the model and the train step


def test_params_and_checkpoint_hold_fp8_bytes_and_a_scale(tmp_path, devices):
    import orbax.checkpoint as ocp

    from tfm_jax.train.checkpoint import Checkpointer

    setup = build(cfg_of(tmp_path, "mesh.data=1"), devices=devices[:1])
    state = setup.init_state()
    p = jax.device_get(state.params)
    ckpt = Checkpointer(tmp_path / "ckpt", async_save=False)
    ckpt.save(0, state)
    ckpt.wait()
    ckpt.close()
    meta = ocp.StandardCheckpointHandler().metadata(tmp_path / "ckpt" / "0" / "default")
    saved = {"/".join(param_roles.path_names(path)): np.dtype(x.dtype) for path, x in
             jax.tree_util.tree_flatten_with_path(getattr(meta, "tree", meta))[0]
             if hasattr(x, "dtype")}
    assert saved["params/layers_0/attn/q_proj/kernel"] == E4M3       # the bytes on disk
    assert saved["params/layers_0/attn/q_proj/storage_scale"] == np.float32
    q = p["layers_0"]["attn"]["q_proj"]
    assert q["kernel"].dtype == E4M3 and q["storage_scale"].dtype == np.float32
    assert q["storage_scale"].shape == ()
    # init: the dynamic scale of the float draw with margin 1 -> amax of the bytes ~ 224
    assert 200 < np.abs(q["kernel"].astype(np.float32)).max() <= 224
    # the LM head and the embedding stay float32
    assert p["lm_head"]["kernel"].dtype == np.float32
    roles = {param_roles.param_role(path) for path, _ in
             jax.tree_util.tree_flatten_with_path(p)[0]}
    assert "storage" in roles


@pytest.mark.slow
def test_step_requantizes_the_updated_dequantized_weight(tmp_path, corpus, devices):
    """One step by hand: gradients of the dequantized view, the setup's AdamW on that view,
    then the numpy EMA scale and ml_dtypes cast -- equal to the step's kernel bytes."""
    import optax

    from tfm_jax.train import input_mask, masked_ce_sum

    setup = build(cfg_of(tmp_path, "mesh.data=1", "train.grad_clip=0"), devices=devices[:1])
    state = setup.init_state()
    batch = setup.shard_batch(batch_at(setup.cfg, corpus, 0))
    view = storage.dequantized_view(state.params)
    s_old = float(state.params["layers_1"]["ffn"]["wo"]["storage_scale"])   # (state is donated)

    def loss(p):
        logits = setup.model.apply({"params": p}, batch["inputs"],
                                   token_mask=input_mask(batch["mask"]), train=True)
        return masked_ce_sum(logits, batch["targets"], batch["mask"]) / batch["mask"].sum()

    with setup.context():
        g = jax.jit(jax.grad(loss))(view)
        over = param_roles.overwrite_mask(view)
        g = jax.tree.map(lambda x, o: jnp.zeros_like(x) if o else x, g, over)
        upd, _ = setup.tx.update(g, state.opt_state, view)
        w_new = np.asarray(optax.apply_updates(view, upd)["layers_1"]["ffn"]["wo"]["kernel"])
        new, m = setup.train_step(state, batch)
    s_new = np.float32(0.999) * np.float32(s_old) + np.float32(0.001) * (
        np.float32(448.0) / np.abs(w_new).max() / 2)
    got = jax.device_get(new.params["layers_1"]["ffn"]["wo"])
    assert float(got["storage_scale"]) == pytest.approx(float(s_new), rel=1e-6)
    ref = np.clip(w_new * got["storage_scale"], -E4M3_MAX, E4M3_MAX).astype(E4M3)
    diff = got["kernel"].view(np.uint8) != ref.view(np.uint8)
    assert diff.mean() < 1e-3, diff.mean()       # only float-order ties may differ
    assert got["kernel"].dtype == E4M3 and bool(m["finite"])


def _stored(params):
    return {jax.tree_util.keystr(p, simple=True, separator="/"): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]
            if param_roles.param_role(p) == "storage" or x.dtype == E4M3}


def _close_fp8(a, b, frac=0.05, lr=1e-2):
    """Stored kernels agree except for bytes (<= ``frac``) pushed across a rounding threshold
    by float-summation order; those differ by at most one e4m3 step (2**-3 of the larger
    magnitude, 2**-9 below the normals) plus, in bytes, 5% of one learning-rate step
    (``0.05 * lr * scale``: what a flipped low-precision moment can move an Adam update).
    A weight flips when it lies within the float noise of a threshold: near zero (subnormal
    steps of 2**-9 in scaled units) that is up to ~2% of a small kernel's values; rounding
    noise that differed per device (a wrong SR key) would flip ~1/3 of them."""
    for k in a:
        if a[k].dtype == E4M3:
            x, y = a[k].astype(np.float64), b[k].astype(np.float64)
            bad = x != y
            assert bad.mean() <= frac, (k, bad.mean())
            scale = np.asarray(a[k.replace("kernel", "storage_scale")], np.float64)
            scale = np.broadcast_to(scale.reshape(scale.shape + (1,) * (x.ndim - scale.ndim)),
                                    x.shape)[bad]
            gap = np.abs(x[bad] - y[bad])
            allowed = np.maximum(np.abs(x[bad]), np.abs(y[bad])) / 8 + 2.0 ** -9 + 0.05 * lr * scale
            assert np.all(gap <= allowed), (k, gap, allowed)
        else:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, err_msg=k)


@pytest.mark.slow
def test_grad_accum_4_matches_whole_batch(tmp_path, corpus, devices):
    one = build(cfg_of(tmp_path, "mesh.data=1", "train.eps=1e-4"), devices=devices[:1])
    four = build(cfg_of(tmp_path, "mesh.data=1", "train.eps=1e-4", "train.grad_accum=4"),
                 devices=devices[:1])
    sa, sb = one.init_state(), four.init_state()
    for step in range(2):
        batch = one.shard_batch(batch_at(one.cfg, corpus, step))
        with one.context():
            sa, ma = one.train_step(sa, batch)
        with four.context():
            sb, mb = four.train_step(sb, batch)
        np.testing.assert_allclose(float(ma["loss"]), float(mb["loss"]), rtol=1e-5)
    _close_fp8(_stored(sa.params), _stored(sb.params))


@pytest.mark.slow   # 23 s; sharded FP8 state equality stays in test_fp8.py
def test_sharded_with_stochastic_rounding_equals_single_device(tmp_path, corpus, devices):
    """8 fake devices (data-sharded batch) vs 1: same loss, same kernel bytes up to a few
    float-order ties (the rounding noise is keyed by (seed, step, kernel), not by device:
    noise that differed per device would change ~1/3 of the bytes), bf16 moments (the
    low-precision optimizer's sharding specs). (int8 moments: a value at an int8 rounding
    midpoint turns float-order noise into a whole int8 step, so bytes may differ more; their
    exactness is tested by the bitwise resume below.)"""
    # eps 1e-4: Adam's first steps move every weight by ~lr * sign(g), also where g is ~0 and
    # its sign is float-summation noise (as in fp32); a larger eps keeps those moves tiny, so
    # what is compared is the storage path, not Adam's sign of noise
    extra = ("quant.stochastic_rounding=true", "train.opt_moments=bf16", "train.eps=1e-4")
    single = build(cfg_of(tmp_path, "mesh.data=1", *extra), devices=devices[:1])
    sharded = build(cfg_of(tmp_path, "mesh.data=8", *extra), devices=devices)
    s1, s8 = single.init_state(), sharded.init_state()
    for step in range(2):
        batch = batch_at(single.cfg, corpus, step)
        with single.context():
            s1, m1 = single.train_step(s1, single.shard_batch(batch))
        with sharded.context():
            s8, m8 = sharded.train_step(s8, sharded.shard_batch(batch))
        np.testing.assert_allclose(float(m1["loss"]), float(m8["loss"]), rtol=1e-5)
    _close_fp8(_stored(s1.params), _stored(s8.params))


def test_stochastic_rounding_is_the_default_with_fp8_storage():
    """On exactly when the weights are stored in FP8 (nearest-even lost the late, small updates:
    studies/fp8_training_long); an explicit value wins; a saved config keeps its value."""
    q = lambda *o: load_config(None, list(o)).quant   # noqa: E731
    assert q().stochastic_rounding is False
    stored = q("quant.recipe=fp8_delayed", "quant.fp8_weight_storage=true")
    assert stored.stochastic_rounding is True
    assert q("quant.recipe=fp8_delayed", "quant.fp8_weight_storage=true",
             "quant.stochastic_rounding=false").stochastic_rounding is False
    saved = load_config(None, ["quant.recipe=fp8_delayed", "quant.fp8_weight_storage=true",
                               "quant.stochastic_rounding=false"]).to_dict()
    from tfm_jax.config import validate
    assert validate(saved).quant.stochastic_rounding is False
    # Config.replace: a rounding at its default follows the storage switch; an explicit one stays
    base = load_config(None, ["quant.recipe=fp8_delayed"])
    on = base.replace(**{"quant.fp8_weight_storage": True})
    assert on.quant.stochastic_rounding is True
    assert on.replace(**{"quant.fp8_weight_storage": False}).quant.stochastic_rounding is False
    rne = base.replace(**{"quant.fp8_weight_storage": True, "quant.stochastic_rounding": False})
    assert rne.quant.stochastic_rounding is False
    assert rne.replace(**{"train.lr": 1e-3}).quant.stochastic_rounding is False


def test_config_refusals():
    with pytest.raises(ConfigError, match="stochastic_rounding.*fp8_weight_storage"):
        load_config(None, ["quant.stochastic_rounding=true"])
    with pytest.raises(ConfigError, match="post-training"):
        load_config(None, ["quant.fp8_weight_storage=true", "quant.recipe=int8_weight"])
    with pytest.raises(ConfigError, match="reload"):
        load_config(None, ["train.on_nonfinite=reload"])


# ------------------------------------------------------------------------------------------
# Stored bytes straight into the FP8 GEMM


@pytest.mark.parametrize("fmt", ["float8_e4m3fn", "float8_e5m2"])
def test_one_cast_of_the_view_gives_back_the_stored_bytes(fmt):
    """The train step hands the model the float view ``q * (1/s)`` of each stored kernel; the FP8
    dot casts ``view * s`` back. Every finite byte value, scales from 2^-12 to 2^12 (odd ones
    too), the view in float32 and rounded to bfloat16: the stored bytes, bit for bit."""
    from tfm_jax.quant import fp8

    dt = np.dtype(getattr(ml_dtypes, fmt))
    bits = np.arange(256, dtype=np.uint8)
    finite = bits[np.isfinite(bits.view(dt).astype(np.float32))]
    scales = np.array([2.0 ** -12, 0.37, 1.0, 3.3, 448 / 0.013, 12345.678, 2.0 ** 12],
                      np.float32)[:, None]
    q = jnp.asarray(np.tile(finite, (len(scales), 1)).view(dt))
    view = storage.dequantize_weight(q, jnp.asarray(scales))
    for v in (view, view.astype(jnp.bfloat16)):
        back = np.asarray(fp8.quantize(v, jnp.asarray(scales), fmt))
        np.testing.assert_array_equal(back.view(np.uint8), np.tile(finite, (len(scales), 1)))


def _stored_linear(tmp_path, recipe):
    import dataclasses

    from tfm_jax.layers.linear import Linear
    from tfm_jax.platform import backends

    @dataclasses.dataclass
    class Gpu:
        platform: str = "gpu"

    ops = backends.resolve_ops(cfg_of(tmp_path, "quant.telemetry=false", recipe=recipe),
                               [Gpu()])
    lin = Linear(24, ("embed", "mlp"), ops=ops)
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((16, 32)) * 3).astype(np.float32)
    params = jax.tree.map(np.asarray, nn_unbox(lin.init(jax.random.key(0), jnp.asarray(x))))
    # bytes whose amax (208) is not a power of two below e4m3's max: requantizing them with a
    # scale of their own would round a second time
    k = params["kernel"].astype(np.float32)
    params["kernel"] = np.clip(k * (208.0 / np.abs(k).max()), -448, 448).astype(E4M3)
    params["storage_scale"] = np.float32(3.7)
    return lin, params, x


def nn_unbox(variables):
    from flax import linen as nn
    return nn.meta.unbox(variables)["params"]


def test_stored_bytes_and_scale_are_the_fp8_gemms_kernel(tmp_path):
    """Linear with FP8 storage and an FP8 recipe (the GPU op set): the stored bytes and their
    scale are the GEMM's kernel operand -- the output equals numpy's ``(q_x @ q) / (s_x s)``
    (ml_dtypes casts), the same from the bytes (evaluation) and from the train step's float view,
    the dot reads the kernel parameter directly, and no kernel scaling state exists."""
    from tfm_jax.quant import hlo_check

    lin, params, x = _stored_linear(tmp_path, "fp8_dynamic")
    q, s = params["kernel"], params["storage_scale"]
    y_bytes = np.asarray(lin.apply({"params": params}, jnp.asarray(x)))
    y_view = np.asarray(lin.apply({"params": storage.dequantized_view(params)}, jnp.asarray(x)))
    np.testing.assert_array_equal(y_bytes, y_view)
    sx = np.float32(E4M3_MAX) / np.float32(np.abs(x).max())
    qx = np.clip((x * sx).astype(np.float32), -E4M3_MAX, E4M3_MAX).astype(E4M3)
    ref = (qx.astype(np.float64) @ q.astype(np.float64)) / (np.float64(sx) * np.float64(s))
    np.testing.assert_allclose(y_bytes, ref, rtol=1e-6, atol=1e-6)
    # what dequantize -> requantize with the kernel's own dynamic scale would give: different
    w = q.astype(np.float32) * np.float32(1 / s)
    sk = np.float32(E4M3_MAX) / np.float32(np.abs(w).max())
    kq = np.clip((w * sk).astype(np.float32), -E4M3_MAX, E4M3_MAX).astype(E4M3)
    old = (qx.astype(np.float64) @ kq.astype(np.float64)) / (np.float64(sx) * np.float64(sk))
    assert np.max(np.abs(old - ref)) > 1e-4
    # the dot's kernel operand is the parameter itself (no multiply, no cast)
    text = jax.jit(lambda p, x: lin.apply({"params": p}, x)).lower(
        params, jnp.asarray(x)).as_text(dialect="hlo")
    comps, entry = hlo_check.parse_hlo(text)
    dots = [(c, i) for c, ins in comps.items() for i in ins.values() if i.opcode == "dot"]
    assert len(dots) == 1
    c, dot = dots[0]
    rhs = comps[c][dot.operands[1]]
    assert rhs.opcode == "parameter" and rhs.element_type == "f8e4m3fn", rhs
    # fp8_delayed: input and gradient state only; the kernel's scale is the storage scale
    _, pd, _ = _stored_linear(tmp_path, "fp8_delayed")
    assert not [n for n in pd["fp8"] if n.startswith("kernel_")] and "input_scale" in pd["fp8"]


def test_stored_kernel_gradient_vs_numpy(tmp_path):
    """The train step differentiates the float view: d view = (q_x^T q_g) / (s_x s_g), the
    storage scale's cotangent is zero (the optimizer step updates it)."""
    lin, params, x = _stored_linear(tmp_path, "fp8_dynamic")
    view = storage.dequantized_view(params)
    g = (np.random.default_rng(6).standard_normal((16, 24)) * 1e-3).astype(np.float32)
    _, pull = jax.vjp(lambda p: lin.apply({"params": p}, jnp.asarray(x)), view)
    (dp,) = pull(jnp.asarray(g))
    sx = np.float32(E4M3_MAX) / np.float32(np.abs(x).max())
    sg = np.float32(57344.0) / np.float32(np.abs(g).max())
    qx = np.clip((x * sx).astype(np.float32), -E4M3_MAX, E4M3_MAX).astype(E4M3)
    qg = np.clip((g * sg).astype(np.float32), -57344, 57344).astype(ml_dtypes.float8_e5m2)
    ref = (qx.astype(np.float64).T @ qg.astype(np.float64)) / (np.float64(sx) * np.float64(sg))
    np.testing.assert_allclose(np.asarray(dp["kernel"]), ref, rtol=1e-6, atol=1e-12)
    assert float(dp["storage_scale"]) == 0.0
