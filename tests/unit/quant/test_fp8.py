"""FP8 dot (tfm_jax.quant.fp8) and the role-aware train step: numerics vs numpy + ml_dtypes,
delayed-scaling state rules, gradient accumulation, sharding, resume, optimizer routing,
telemetry, calibration, HLO check."""

import functools
import json

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import linen as nn

from tfm_jax import data as data_lib
from tfm_jax.core import roles as param_roles
from tfm_jax.config import ConfigError
from tfm_jax.train.metrics import read_metrics
from tfm_jax.quant import fp8
from tfm_jax.train import build, train

from fp8_support import batch_at, cfg_of, quant_leaves

E4M3, E5M2 = ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2
E4M3_MAX = float(ml_dtypes.finfo(E4M3).max)    # 448
E5M2_MAX = float(ml_dtypes.finfo(E5M2).max)    # 57344

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return data_lib.load_corpus(None, 0.05, str(tmp_path_factory.mktemp("cache")))


# ------------------------------------------------------------------------------------------
# Numpy + ml_dtypes reference (written from the formulas, not calling tfm_jax.quant).

def ref_qdq(x, scale, dtype, fmax):
    """cast(clip(x * scale)) to the fp8 dtype (ml_dtypes, round to nearest even), back / scale,
    in float64. ``x * scale`` is rounded to float32 first, as the op computes it."""
    xs = (np.asarray(x, np.float32) * np.float32(scale)).astype(np.float32)
    q = np.clip(xs, -fmax, fmax).astype(dtype)
    return q.astype(np.float64) / np.float64(scale)


def dyn_scale(x, fmax):
    return np.float32(fmax) / np.float32(np.max(np.abs(np.asarray(x, np.float32))))


class Proj(nn.Module):
    """A bare (N, K) @ (K, M) projection through the FP8 dot, kernel as a param."""
    dot: functools.partial

    @nn.compact
    def __call__(self, x):
        k = self.param("kernel", nn.initializers.normal(0.5), (x.shape[1], 24))
        return self.dot()(x, k, (((1,), (0,)), ((), ())))


def _setup(recipe, hist=4, **dot_kw):
    dot = functools.partial(fp8.Fp8DotGeneral, recipe=recipe, amax_history=hist,
                            **{"telemetry": False, **dot_kw}, name="fp8")
    model = Proj(dot)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((16, 32)) * 3).astype(np.float32)
    g = (rng.standard_normal((16, 24)) * 1e-3).astype(np.float32)
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.asarray(x))["params"])
    return model, params, x, g


def _vjp(model, params, x, g):
    """(y, d params, dx) with the output cotangent g."""
    y, pull = jax.vjp(lambda p, xx: model.apply({"params": p}, xx), params, jnp.asarray(x))
    dp, dx = pull(jnp.asarray(g))
    return np.asarray(y), jax.device_get(dp), np.asarray(dx)


@pytest.mark.parametrize("recipe", ["fp8_dynamic", "fp8_delayed"])
def test_fp8_dot_forward_backward_vs_numpy(recipe):
    model, params, x, g = _setup(recipe)
    k = np.asarray(params["kernel"])
    if recipe == "fp8_delayed":   # a state with history: the scales come from it
        st = params["fp8"]
        st["input_amax_history"] = jnp.asarray([2.0, 9.0, 1.0, 0.0], jnp.float32)
        st["kernel_amax_history"] = jnp.asarray([1.5, 0.0, 0.0, 1.0], jnp.float32)
        st["output_grad_amax_history"] = jnp.asarray([1e-3, 2e-3, 0.0, 0.0], jnp.float32)
        sx, sk, sg = (np.float32(E4M3_MAX) / np.float32(9.0),
                      np.float32(E4M3_MAX) / np.float32(1.5),
                      np.float32(E5M2_MAX) / np.float32(2e-3))
    else:
        sx, sk, sg = dyn_scale(x, E4M3_MAX), dyn_scale(k, E4M3_MAX), dyn_scale(g, E5M2_MAX)
    y, dp, dx = _vjp(model, params, x, g)
    xq, kq = ref_qdq(x, sx, E4M3, E4M3_MAX), ref_qdq(k, sk, E4M3, E4M3_MAX)
    gq = ref_qdq(g, sg, E5M2, E5M2_MAX)
    np.testing.assert_allclose(y, xq @ kq, rtol=2e-5, atol=1e-5)
    np.testing.assert_allclose(dx, gq @ kq.T, rtol=2e-5, atol=1e-9)
    np.testing.assert_allclose(dp["kernel"], xq.T @ gq, rtol=2e-5, atol=1e-9)
    # the quantization really happened: the plain fp32 product differs
    assert np.max(np.abs(y - x.astype(np.float64) @ k)) > 1e-3
    if recipe == "fp8_delayed":   # cotangent of the state = its new value
        new = dp["fp8"]
        np.testing.assert_array_equal(new["input_scale"], sx)
        np.testing.assert_array_equal(new["kernel_scale"], sk)
        np.testing.assert_array_equal(new["output_grad_scale"], sg)
        amx = np.float32(np.max(np.abs(x)))
        # Flax/TE layout: roll by -1, newest at 0 (9.0, at index 1, was the oldest: dropped)
        np.testing.assert_array_equal(new["input_amax_history"], [amx, 1.0, 0.0, 2.0])
        np.testing.assert_array_equal(new["output_grad_amax_history"][0],
                                      np.float32(np.max(np.abs(g))))
    else:
        assert "fp8" not in dp


def _xla_dot(a, b, dimension_numbers, precision=None, preferred_element_type=None):
    return jax.lax.dot_general(a, b, dimension_numbers)


def test_cpu_gemm_path_is_quantize_dequantize_bit_for_bit():
    """With a set's GEMM (a CPU set: float operands) the direct form dequantizes the saved FP8
    bytes and multiplies them: y, dx and d kernel equal, bit for bit, the same GEMM on the
    numpy + ml_dtypes quantize -> dequantize of x, kernel and output gradient."""
    model, params, x, g = _setup("fp8_dynamic", matmul=_xla_dot)
    k = np.asarray(params["kernel"])
    y, dp, dx = _vjp(model, params, x, g)

    def deq(t, fmax, dtype):
        s = np.float32(fmax) / np.float32(np.max(np.abs(t)))
        q = np.clip((t * s).astype(np.float32), -fmax, fmax).astype(dtype)
        return q.astype(np.float32) * np.float32(np.float32(1.0) / s)

    xd, kd, gd = deq(x, E4M3_MAX, E4M3), deq(k, E4M3_MAX, E4M3), deq(g, E5M2_MAX, E5M2)
    np.testing.assert_array_equal(y, np.asarray(_xla_dot(xd, kd, (((1,), (0,)), ((), ())))))
    _, pull = jax.vjp(lambda a, b: _xla_dot(a, b, (((1,), (0,)), ((), ()))), xd, kd)
    rdx, rdk = pull(jnp.asarray(gd))
    np.testing.assert_array_equal(dx, np.asarray(rdx))
    np.testing.assert_array_equal(dp["kernel"], np.asarray(rdk))


@pytest.mark.parametrize("operands", [("input",), ("kernel",), ("output_grad",),
                                      ("input", "kernel")])
def test_fp8_operands_quantize_only_the_named_tensors(operands):
    """quant.fp8_operands: the named tensors go through FP8 (numpy + ml_dtypes reference), the
    others stay exact float32; a tensor left out keeps no state."""
    model, params, x, g = _setup("fp8_dynamic", operands=operands, telemetry=True)
    assert ("output_grad_stats" in params.get("fp8", {})) == ("output_grad" in operands)
    y, dp, dx = _vjp(model, params, x, g)
    k = np.asarray(params["kernel"], np.float64)
    xq = ref_qdq(x, dyn_scale(x, E4M3_MAX), E4M3, E4M3_MAX) if "input" in operands else x
    kq = ref_qdq(k, dyn_scale(k, E4M3_MAX), E4M3, E4M3_MAX) if "kernel" in operands else k
    gq = (ref_qdq(g, dyn_scale(g, E5M2_MAX), E5M2, E5M2_MAX) if "output_grad" in operands
          else g.astype(np.float64))
    np.testing.assert_allclose(y, xq @ kq, rtol=2e-5, atol=1e-5)
    np.testing.assert_allclose(dx, gq @ kq.T, rtol=2e-5, atol=1e-9)
    np.testing.assert_allclose(dp["kernel"], xq.T @ gq, rtol=2e-5, atol=1e-9)
    # each path differs from float32 exactly where it was quantized
    assert (np.max(np.abs(y - x.astype(np.float64) @ k)) > 1e-3) == (
        "input" in operands or "kernel" in operands)
    assert (np.max(np.abs(dx - g.astype(np.float64) @ k.T)) > 1e-7) == (
        "output_grad" in operands or "kernel" in operands)
    # delayed: state only for the named tensors
    pd = _setup("fp8_delayed", operands=operands)[1]
    assert {n.split("_amax_history")[0] for n in pd["fp8"] if n.endswith("_amax_history")} \
        == set(operands)


def test_fp8_operands_config_checks(tmp_path):
    cfg = cfg_of(tmp_path, "quant.fp8_operands=[output_grad]")
    assert cfg.quant.fp8_operands == ["output_grad"]
    assert cfg_of(tmp_path).quant.fp8_operands == ["input", "kernel", "output_grad"]
    with pytest.raises(ConfigError, match="names a tensor twice"):
        cfg_of(tmp_path, "quant.fp8_operands=[input,input]")
    with pytest.raises(ConfigError, match="fp8_operands"):
        cfg_of(tmp_path, "quant.fp8_operands=[weights]")


def ref_stats(x, scale, dtype, fmax):
    """[saturated, flushed] fractions from the formulas (numpy + ml_dtypes)."""
    x = np.asarray(x, np.float32)
    xs = (x * np.float32(scale)).astype(np.float32)
    q = np.clip(xs, -fmax, fmax).astype(dtype).astype(np.float32)
    nz = x != 0
    return [np.mean(np.abs(xs) > fmax), np.sum((q == 0) & nz) / max(np.sum(nz), 1)]


@pytest.mark.parametrize("recipe", ["fp8_dynamic", "fp8_delayed"])
def test_output_grad_saturation_and_flush_recorded_by_backward(recipe):
    """Telemetry on: the backward writes the output gradient's [saturated, flushed] fractions
    into the overwritten leaf output_grad_stats; the next forward sows them."""
    dot = functools.partial(fp8.Fp8DotGeneral, recipe=recipe, amax_history=4, telemetry=True,
                            name="fp8")
    model = Proj(dot)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((16, 32)).astype(np.float32)
    g = (rng.standard_normal((16, 24)) * 1e-3).astype(np.float32)
    g[0, :6] = 1e-14          # flushed at both scales below
    g[1, 0] = 1.0             # the dynamic amax
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.asarray(x))["params"])
    assert params["fp8"]["output_grad_stats"].shape == (2,)
    if recipe == "fp8_delayed":   # a stale history: scale made for amax 1e-3, most saturate
        params["fp8"]["output_grad_amax_history"] = jnp.asarray([1e-3, 0, 0, 0], jnp.float32)
        sg = np.float32(E5M2_MAX) / np.float32(1e-3)
    else:
        sg = dyn_scale(g, E5M2_MAX)
    _, pull = jax.vjp(lambda p: model.apply({"params": p}, jnp.asarray(x)), params)
    (dp,) = pull(jnp.asarray(g))
    got = np.asarray(dp["fp8"]["output_grad_stats"])
    want = ref_stats(g, sg, E5M2, E5M2_MAX)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got[1] >= 6 / g.size                      # the planted tiny values flushed
    if recipe == "fp8_delayed":
        assert got[0] > 0.05                         # the stale scale saturates
    # the next forward sows what the backward recorded
    _, sown = model.apply({"params": {**params, "fp8": {**params["fp8"],
                                                         "output_grad_stats": got}}},
                          jnp.asarray(x), mutable=["telemetry_max"])
    tel = sown["telemetry_max"]["fp8"]
    assert float(tel["output_grad_saturated"]) == got[0]
    assert float(tel["output_grad_flushed"]) == got[1]


@pytest.mark.parametrize("recipe", ["fp8_dynamic", "fp8_delayed"])
def test_per_channel_kernel_scales_vs_numpy(recipe):
    """kernel_granularity=per_channel: one scale per output column, 448 / max|column|."""
    dot = functools.partial(fp8.Fp8DotGeneral, recipe=recipe, amax_history=2,
                            kernel_granularity="per_channel", telemetry=False, name="fp8")
    model = Proj(dot)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((8, 32)).astype(np.float32)
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.asarray(x))["params"])
    k = np.asarray(params["kernel"]) * np.geomspace(1e-3, 10, 24).astype(np.float32)
    params["kernel"] = jnp.asarray(k)
    col_amax = np.max(np.abs(k), axis=0).astype(np.float32)
    if recipe == "fp8_delayed":
        assert params["fp8"]["kernel_amax_history"].shape == (2, 1, 24)
        params["fp8"]["kernel_amax_history"] = jnp.asarray(
            np.stack([col_amax, np.zeros_like(col_amax)])[:, None, :])
        params["fp8"]["input_amax_history"] = jnp.asarray([np.max(np.abs(x)), 0.0],
                                                          jnp.float32)
    sk = np.float32(E4M3_MAX) / col_amax
    y, dp, _ = _vjp(model, params, x, np.zeros((8, 24), np.float32))
    kq = np.stack([ref_qdq(k[:, j], sk[j], E4M3, E4M3_MAX) for j in range(24)], axis=1)
    xq = ref_qdq(x, dyn_scale(x, E4M3_MAX), E4M3, E4M3_MAX)
    np.testing.assert_allclose(y, xq @ kq, rtol=2e-5, atol=1e-7)
    # the smallest column (amax ~1e-3) still quantizes to non-zeros with its own scale
    assert np.all(np.abs(y[:, 0]) > 0)
    if recipe == "fp8_delayed":
        np.testing.assert_array_equal(dp["fp8"]["kernel_scale"][0], sk)


def test_saturation_and_no_nan_with_stale_scale():
    """A delayed scale made for amax 1 meets values up to 100: e4m3 saturates at 448 (a plain
    e4m3fn cast would give NaN), never NaN."""
    model, params, x, g = _setup("fp8_delayed")
    params["fp8"]["input_amax_history"] = jnp.asarray([1.0, 0, 0, 0], jnp.float32)
    x = x * 30.0
    y, _, _ = _vjp(model, params, x, g)
    assert np.all(np.isfinite(y))
    xq = ref_qdq(x, E4M3_MAX, E4M3, E4M3_MAX)
    assert np.max(np.abs(xq)) == 1.0                # clipped at amax the scale assumed
    assert np.isnan(np.float32(500.0).astype(E4M3))   # why the clip is needed


@pytest.mark.parametrize("method", ["max", "most_recent"])
def test_delayed_state_follows_the_history_rule_over_steps(method):
    """Six steps, overwriting the state with its cotangent each time (what the train step
    does): history and scales against a Python-list reference (newest first, length 3)."""
    dot = functools.partial(fp8.Fp8DotGeneral, recipe="fp8_delayed", amax_history=3,
                            amax_compute=method, margin=1, telemetry=False, name="fp8")
    model = Proj(dot)
    rng = np.random.default_rng(1)
    params = nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((4, 8)))["params"])
    hist, scale = [0.0, 0.0, 0.0], np.float32(1.0)
    for step, mag in enumerate([1.0, 5.0, 0.5, 0.2, 0.1, 3.0]):
        x = (rng.standard_normal((4, 8)) * mag).astype(np.float32)
        amax_ref = max(hist) if method == "max" else hist[0]
        if amax_ref > 0:   # fmt_max / amax / 2**margin; else the previous scale
            scale = np.float32(np.float32(E4M3_MAX) / np.float32(amax_ref) / np.float32(2.0))
        hist = [float(np.max(np.abs(x)))] + hist[:-1]
        _, dp, _ = _vjp(model, params, x, np.ones((4, 24), np.float32))
        new = dp["fp8"]
        from tfm_jax.quant.scaling import history_newest_first
        np.testing.assert_array_equal(np.asarray(history_newest_first(
            new["input_amax_history"])), np.asarray(hist, np.float32), err_msg=str(step))
        np.testing.assert_array_equal(new["input_scale"], scale, err_msg=str(step))
        params = {**params, "fp8": new}


# ------------------------------------------------------------------------------------------
# The role-aware train step.


@pytest.mark.slow     # runs in tests/integration/test_heavy_unit_cases.py
def test_state_is_overwritten_not_optimized(tmp_path, corpus, devices):
    """Strong weight decay, a tiny clip, a large lr: the state after a step equals the op's
    cotangent bit for bit; AdamW holds no moments for it; grad_norm leaves it out."""
    setup = build(cfg_of(tmp_path, "mesh.data=1", "train.grad_clip=0.001",
                         "train.weight_decay=0.5", "train.warmup_steps=0", "train.lr=0.1"),
                  devices=devices[:1])
    state = setup.init_state()
    p0 = jax.device_get(state.params)
    batch = setup.shard_batch(batch_at(setup.cfg, corpus, 0))

    def loss(p):   # the step's loss with the same model and batch, gradients by autodiff
        from tfm_jax.train import input_mask, masked_ce_sum
        logits = setup.model.apply({"params": p}, batch["inputs"],
                                   token_mask=input_mask(batch["mask"]), train=True)
        return masked_ce_sum(logits, batch["targets"], batch["mask"])

    with setup.context():
        grads = jax.jit(jax.grad(loss))(state.params)
        state, m = setup.train_step(state, batch)
    new, expect = quant_leaves(state.params), quant_leaves(grads)
    assert len(new) == 7 * 2 * 6            # 7 projections x 2 layers x 6 state leaves
    for k in new:
        np.testing.assert_array_equal(new[k], expect[k], err_msg=k)
    # trained leaves moved; the LM head and the embedding have no fp8 state
    assert not any(k.startswith(("lm_head", "embed")) for k in new)
    # multi_transform: the AdamW moments of the state are MaskedNode (none exist)
    inner = state.opt_state.inner_states
    adam = inner[param_roles.TRAINED].inner_state[0]
    mu = adam.mu["layers_0"]["attn"]["q_proj"]
    assert isinstance(mu["fp8"]["input_scale"], optax.MaskedNode) and mu["kernel"].shape
    # grad_norm = the norm of the trained leaves only
    trained = [np.asarray(v, np.float64) / float(jax.device_get(m["tokens"]))
               for p, v in jax.tree_util.tree_flatten_with_path(jax.device_get(grads))[0]
               if not param_roles.overwritten(p)]
    norm = np.sqrt(sum(np.sum(v * v) for v in trained))
    assert float(m["grad_norm"]) == pytest.approx(norm, rel=1e-4)
    assert not any(jax.tree.leaves(jax.device_get(m["grad_nonfinite"])))
    assert p0["layers_0"]["attn"]["q_proj"]["fp8"]["input_scale"] == 1.0


@pytest.mark.parametrize("mesh", [pytest.param(["mesh.data=8"], marks=pytest.mark.slow),
                                  pytest.param(["mesh.data=1", "mesh.fsdp=8"],
                                               marks=pytest.mark.slow)])
def test_sharded_state_equals_single_device(tmp_path, corpus, devices, mesh):
    """The amax inside the op is a global reduction: data- or fsdp-sharded batch (8 fake
    devices) -> the same fp8 state and loss as one device."""
    single = build(cfg_of(tmp_path, "mesh.data=1"), devices=devices[:1])
    sharded = build(cfg_of(tmp_path, *mesh), devices=devices)
    s1, s8 = single.init_state(), sharded.init_state()
    for step in range(2):
        batch = batch_at(single.cfg, corpus, step)
        with single.context():
            s1, m1 = single.train_step(s1, single.shard_batch(batch))
        with sharded.context():
            s8, m8 = sharded.train_step(s8, sharded.shard_batch(batch))
        np.testing.assert_allclose(float(m1["loss"]), float(m8["loss"]), rtol=1e-5)
    q1, q8 = quant_leaves(s1.params), quant_leaves(s8.params)
    for k in q1:   # replicated on every device
        np.testing.assert_allclose(q1[k], q8[k], rtol=1e-5, err_msg=k)
    leaf = s8.params["layers_0"]["attn"]["q_proj"]["fp8"]["input_amax_history"]
    assert leaf.sharding.is_fully_replicated


def test_orbax_resume_equals_uninterrupted_with_state(tmp_path, corpus, devices):
    """Three steps straight vs one step, an orbax save/restore (of the whole state, fp8
    leaves and the multi_transform optimizer state included), two more steps: bitwise equal.
    (The train loop's --resume path is the generic one of tests/unit/train/test_train.py.)"""
    from tfm_jax.train.checkpoint import Checkpointer

    setup = build(cfg_of(tmp_path, "mesh.data=1"), devices=devices[:1])
    batches = [setup.shard_batch(batch_at(setup.cfg, corpus, i)) for i in range(3)]
    with setup.context():
        full = setup.init_state()
        for b in batches:
            full, _ = setup.train_step(full, b)
        cut, _ = setup.train_step(setup.init_state(), batches[0])
        ckpt = Checkpointer(tmp_path / "ckpt", async_save=False)
        ckpt.save(1, cut)
        ckpt.wait()
        resumed = ckpt.restore(setup.abstract_state())
        ckpt.close()
        for b in batches[1:]:
            resumed, _ = setup.train_step(resumed, b)
    chex.assert_trees_all_equal(jax.device_get(full.params), jax.device_get(resumed.params))
    chex.assert_trees_all_equal(jax.device_get(full.opt_state),
                                jax.device_get(resumed.opt_state))
    qa = quant_leaves(full.params)
    assert any(np.count_nonzero(v) == 3 for k, v in qa.items() if "history" in k)


def test_fp32_step_sows_nothing(tmp_path, corpus, devices):
    """recipe none: no fp8 state, no telemetry output, every leaf trained (traced, not run)."""
    setup = build(cfg_of(tmp_path, "mesh.data=1", recipe="none"), devices=devices[:1])
    state = setup.abstract_state()
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in
             batch_at(setup.cfg, corpus, 0).items()}
    with setup.context():
        _, m = jax.eval_shape(setup.train_step, state, batch)
    assert "telemetry" not in m
    assert not quant_leaves(state.params)
    labels = set(jax.tree.leaves(param_roles.optimizer_labels(state.params)))
    assert labels == {param_roles.TRAINED}


def test_optimizer_labels_come_from_roles_not_flags(tmp_path, devices):
    """fp8_dynamic + telemetry keeps an overwritten statistics leaf (output_grad_stats): it gets
    no AdamW moments, and the optimizer state has the same layout as recipe none's for the
    leaves both share."""
    dyn = build(cfg_of(tmp_path, "mesh.data=1", "quant.telemetry=true", recipe="fp8_dynamic"),
                devices=devices[:1])
    none = build(cfg_of(tmp_path, "mesh.data=1", recipe="none"), devices=devices[:1])
    sd, sn = dyn.abstract_state(), none.abstract_state()
    stats = [p for p, _ in jax.tree_util.tree_flatten_with_path(sd.params)[0]
             if param_roles.path_names(p)[-1] == "output_grad_stats"]
    assert stats, "fp8_dynamic with telemetry should keep output_grad_stats"
    inner = sd.opt_state.inner_states
    adam_leaves = jax.tree_util.tree_flatten_with_path(inner[param_roles.TRAINED].inner_state)[0]
    assert not [p for p, _ in adam_leaves if "output_grad_stats" in jax.tree_util.keystr(p)]
    assert type(sn.opt_state) is type(sd.opt_state)


@pytest.mark.slow     # runs in tests/integration/test_heavy_unit_cases.py
def test_fp8_dot_quantizing_nothing_trains_exactly_as_fp32(tmp_path, corpus, devices):
    """The control of quant.fp8_operands: the FP8 dot with no tensor quantized is the fp32
    model -- same losses and parameters, bit for bit -- so a study's differences come from
    the quantization alone."""
    out = {}
    for recipe in ("none", "fp8_dynamic"):
        cfg = cfg_of(tmp_path / recipe, "mesh.data=1", "train.steps=4", "train.eval_every=4",
                     "train.checkpoint_every=4", "quant.fp8_operands=[]", recipe=recipe)
        res = train(cfg, devices=devices[:1])
        out[recipe] = ([r["loss"] for r in read_metrics(cfg.run_dir) if "loss" in r],
                       jax.device_get(res.state.params))
    assert out["none"][0] == out["fp8_dynamic"][0] and len(out["none"][0]) == 4
    chex.assert_trees_all_equal(out["none"][1], out["fp8_dynamic"][1])


# ------------------------------------------------------------------------------------------
# Config, calibration, HLO check.


def test_int8_weight_training_refused(tmp_path, corpus):
    with pytest.raises(ConfigError, match="tfm-jax quantize --run-dir"):
        train(cfg_of(tmp_path, recipe="int8_weight"), corpus=corpus)


def test_static_needs_a_calibration_file(tmp_path, corpus, devices):
    with pytest.raises(ConfigError, match="quant.calibration"):
        cfg_of(tmp_path, recipe="fp8_static")
    with pytest.raises(FileNotFoundError, match="no such file"):
        build(cfg_of(tmp_path, "quant.calibration=/nonexistent.json", "mesh.data=1",
                     recipe="fp8_static"), devices=devices[:1])


@pytest.mark.slow     # runs in tests/integration/test_heavy_unit_cases.py
def test_static_scales_from_calibration_stay_fixed(tmp_path, corpus, devices):
    projs = [f"layers_{i}/{p}" for i in range(2) for p in
             ("attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj", "ffn/wi_0",
              "ffn/wi_1", "ffn/wo")]
    path = tmp_path / "calib.json"
    fp8.write_calibration(path, {p: {"input_scale": 100.0 + i, "kernel_scale": 5000.0}
                                 for i, p in enumerate(projs)})
    setup = build(cfg_of(tmp_path, f"quant.calibration={path}", "mesh.data=1",
                         recipe="fp8_static"), devices=devices[:1])
    state = setup.init_state()
    with setup.context():
        for step in range(2):
            state, _ = setup.train_step(state, setup.shard_batch(batch_at(setup.cfg, corpus,
                                                                          step)))
    q = quant_leaves(state.params)
    assert q["layers_0/attn/k_proj/fp8/input_scale"] == np.float32(101.0)
    assert q["layers_1/ffn/wo/fp8/kernel_scale"] == np.float32(5000.0)
    assert not any("history" in k for k in q)
    bad = tmp_path / "bad.json"
    fp8.write_calibration(bad, {projs[0]: {"input_scale": 1.0, "kernel_scale": 1.0}})
    with pytest.raises(ValueError, match="missing layers_0/attn/k_proj"):
        build(cfg_of(tmp_path, f"quant.calibration={bad}", "mesh.data=1",
                     recipe="fp8_static"), devices=devices[:1]).init_state()
    bad.write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a tfm-jax-fp8-calibration file"):
        fp8.load_calibration(bad)


def _gemm_line(i, target, proj, types=("f8e4m3fn", "f8e5m2")):
    name = f"layers_0/attn/{proj}/fp8/dot_general" if proj else "lm_head/dot_general"
    return (f'  %g{i} = (bf16[16,16]{{1,0}}, s8[0]{{0}}) custom-call({types[0]}[16,32]{{1,0}} %a, '
            f'{types[1]}[16,32]{{1,0}} %b), custom_call_target="{target}", '
            f'metadata={{op_name="jit(step)/transpose(jvp(TransformerLM))/{name}"}}')


def _module(lines):
    return ("HloModule m\n\nENTRY %main (a: f8e4m3fn[16,32], b: f8e5m2[16,32]) -> bf16[] {\n"
            "  %a = f8e4m3fn[16,32]{1,0} parameter(0)\n  %b = f8e5m2[16,32]{1,0} parameter(1)\n"
            + "\n".join(lines) + "\n  ROOT %r = bf16[] constant(0)\n}\n")


def test_fp8_dot_mode_counts_fp8_gemms_per_projection():
    """native = every quantized projection runs >= 3 FP8 GEMMs and no plain one (not: "an FP8
    dot exists somewhere")."""
    from tfm_jax.quant import hlo_check

    f8 = "__cublas$lt$matmul$f8"
    full = [_gemm_line(i, f8, p) for i, p in enumerate(["q_proj"] * 3 + ["k_proj"] * 3)]
    full.append(_gemm_line(9, "__cublas$gemm", None, ("bf16", "bf16")))    # the LM head
    counts = hlo_check.gemm_counts(_module(full))
    assert counts == {"layers_0/attn/q_proj": {"fp8": 3, "plain": 0},
                      "layers_0/attn/k_proj": {"fp8": 3, "plain": 0},
                      "other": {"fp8": 0, "plain": 1}}
    assert fp8.fp8_dot_mode(_module(full)) == "native" and fp8.fp8_native_in_hlo(_module(full))
    # one projection's input gradient on a bf16 GEMM: partial, and it is named
    part = full[:5] + [_gemm_line(5, "__cublas$gemm", "k_proj", ("bf16", "bf16"))]
    assert fp8.fp8_dot_mode(_module(part)) == "partial"
    assert hlo_check.fp8_gemm_verdict(hlo_check.gemm_counts(_module(part))) == (
        False, ["layers_0/attn/k_proj"])
    # a single FP8 GEMM is not enough
    assert fp8.fp8_dot_mode(_module(full[:1])) == "partial"
    cpu = ("%c = f8e4m3fn[4,8] convert(f32[4,8] %a)\n%u = f32[4,8] convert(f8e4m3fn[4,8] %c)\n"
           "%d = f32[4,4] dot(f32[4,8] %u, f32[8,4] %b)")
    assert fp8.fp8_dot_mode(cpu) == "emulated" and not fp8.fp8_native_in_hlo(cpu)
    assert fp8.fp8_dot_mode("%d = f32[4,4] dot(f32[4,8] %a, f32[8,4] %b)") == "none"


@pytest.mark.slow
def test_fp8_step_benchmark_smoke():
    from benchmarks import fp8_step
    res = fp8_step.main(["--d-model", "32", "--layers", "1", "--heads", "4", "--kv-heads", "2",
                         "--seq", "16", "--batch", "2", "--steps", "1", "--repeats", "1",
                         "--warmup", "1"])
    # no timing assertion: the figures must be the statistics of the recorded step times
    assert set(res["median_s"]) == set(res["steps"]) == {"fp32", "fp8_delayed"}
    for name, times in res["steps"].items():
        assert len(times) == 1 and all(t > 0 for t in times)
        assert res["median_s"][name] == float(np.median(times))
        assert res["best_s"][name] == min(times)
    assert res["ratio_median"] == res["median_s"]["fp8_delayed"] / res["median_s"]["fp32"]
    assert res["ratio_best"] == res["best_s"]["fp8_delayed"] / res["best_s"]["fp32"]


@pytest.mark.slow
def test_fp8_grad_error_probe(tmp_path, corpus, devices, capsys):
    """benchmarks/fp8_grad_error.py on a 2-step float32 run: the summation-order control is
    (almost) the fp32 gradient, every FP8 variant differs from it, and an FP8 run is refused."""
    from benchmarks import fp8_grad_error

    cfg = cfg_of(tmp_path / "run", "mesh.data=1", "train.steps=2", "train.eval_every=2",
                 "train.checkpoint_every=2", recipe="none")
    train(cfg, devices=devices[:1])
    out = tmp_path / "g.json"
    assert fp8_grad_error.main(["--run-dir", str(cfg.run_dir), "--batches", "2",
                                "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    rows = saved["variants"]
    assert set(rows) == set(fp8_grad_error.VARIANTS)
    assert set(saved["provenance"]["git"]) == {"commit", "dirty"}
    # another GEMM changes only the summation order
    assert rows["fp32, XLA's GEMMs (summation order)"]["rel_err"] < 1e-4
    for name in ("input e4m3", "kernel e4m3", "output gradient e5m2", "all three (e4m3, e4m3, "
                 "e5m2)"):
        assert 1e-4 < rows[name]["rel_err"] < 0.5 and rows[name]["cos"] < 1.0
    fp8_run = cfg_of(tmp_path / "fp8", "mesh.data=1", "train.steps=2", "train.eval_every=2",
                     "train.checkpoint_every=2")
    train(fp8_run, devices=devices[:1])
    assert fp8_grad_error.main(["--run-dir", str(fp8_run.run_dir)]) == 2
    assert "give a float32 run" in capsys.readouterr().err
