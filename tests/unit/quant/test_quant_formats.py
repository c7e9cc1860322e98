"""tfm_jax.quant formats, scale math and quantize/dequantize against independent numpy + ml_dtypes
references, bit for bit. The references below never call tfm_jax.quant: they cast with
``np.asarray(..., dtype=ml_dtypes.X)`` / ``.astype`` and compute scales with numpy float32."""

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.experimental import checkify

from tfm_jax import quant as Q

FLOAT8 = {"float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2,
          "float8_e4m3fnuz": ml_dtypes.float8_e4m3fnuz,
          "float8_e5m2fnuz": ml_dtypes.float8_e5m2fnuz}
INTS = {"int8": np.int8, "int4": ml_dtypes.int4}
ALL = {**FLOAT8, **INTS}


# --------------------------------------------------------------------------------------------
# the independent reference


def ref_max(dt):
    return np.float32(ml_dtypes.finfo(dt).max if dt in FLOAT8.values()
                      else ml_dtypes.iinfo(dt).max)


def ref_cast(y, dt):
    """Saturating cast in numpy: clip to +-max, then ml_dtypes' cast (ints: rint first)."""
    m = ref_max(dt)
    y = np.asarray(y, np.float32)
    if dt in FLOAT8.values():
        return np.asarray(np.clip(y, -m, m), dtype=dt)
    return np.asarray(np.clip(np.rint(y), -m, m).astype(np.int8), dtype=dt)


def ref_quantize(x, dt, axis=None, block=None):
    """-> (q, compact scale, scale broadcast against x), numpy float32 + ml_dtypes only."""
    x = np.asarray(x, np.float32)
    a = np.abs(x)
    if block is not None:
        amax = a.reshape(*x.shape[:-1], x.shape[-1] // block, block).max(-1)
    elif axis is None:
        amax = a.max()
    else:
        keep = {k % x.ndim for k in ((axis,) if isinstance(axis, int) else axis)}
        amax = a.max(axis=tuple(i for i in range(x.ndim) if i not in keep), keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        s = ref_max(dt) / np.asarray(amax, np.float32)
        s = np.where((amax > 0) & np.isfinite(amax) & np.isfinite(s), s, np.float32(1))
    s = np.asarray(s, np.float32)
    sb = np.repeat(s, block, axis=-1) if block is not None else s
    return ref_cast(x * sb, dt), s, sb


def bits(a):
    """Bit pattern of an array (8-bit formats as uint8, int4 as int8 values, f32 as uint32)."""
    a = np.asarray(a)
    if a.dtype == np.dtype(ml_dtypes.int4):
        return a.astype(np.int8)
    if a.dtype == np.float32:
        return a.view(np.uint32)
    return a.view(np.uint8)


def assert_bits(actual, desired):
    actual, desired = np.asarray(actual), np.asarray(desired)
    assert actual.dtype == desired.dtype, (actual.dtype, desired.dtype)
    assert actual.shape == desired.shape, (actual.shape, desired.shape)
    np.testing.assert_array_equal(bits(actual), bits(desired))


def data(shape=(8, 256), seed=0):
    """Normal values with outliers, exact zeros and a few subnormal-range values."""
    r = np.random.default_rng(seed)
    x = r.normal(size=shape).astype(np.float32)
    x.flat[::37] *= 50.0
    x.flat[::53] = 0.0
    x.flat[::71] *= 1e-5
    return x


# --------------------------------------------------------------------------------------------
# formats


def test_format_limits_come_from_ml_dtypes():
    for name, dt in ALL.items():
        assert Q.fmt_dtype(name) == np.dtype(dt)
        assert Q.fmt_max(name) == float(ref_max(dt))
        assert Q.format_name(dt) == name and Q.format_name(jnp.dtype(dt)) == name
    # the values the docs quote (typed here only to check the table)
    assert [Q.fmt_max(n) for n in ALL] == [448.0, 57344.0, 240.0, 57344.0, 127.0, 7.0]
    assert Q.fmt_tiny("float8_e4m3fn") == 2.0 ** -6
    assert Q.fmt_tiny("float8_e4m3fn", subnormal=True) == 2.0 ** -9
    assert Q.fmt_tiny("int8") == 1.0
    assert [Q.is_float(n) for n in ALL] == [True] * 4 + [False] * 2
    assert Q.fmt_bits("int4") == 4 and Q.fmt_bits("float8_e5m2") == 8


def test_bad_format_names_the_valid_ones():
    with pytest.raises(ValueError, match="float8_e4m3fn, float8_e5m2.*int4"):
        Q.fmt_max("e3m4")
    with pytest.raises(ValueError, match="unsupported quantization dtype"):
        Q.quantize(jnp.ones(3), jnp.float16)


@pytest.mark.parametrize("name", list(ALL))
def test_saturating_cast_bit_exact(name):
    dt = ALL[name]
    m = float(ref_max(dt))
    x = np.concatenate([data((4096,)).ravel() * m / 8,
                        np.float32([m, -m, m * 1.01, -m * 1.5, m * 1e3, 3e38, -3e38, 0.0, -0.0]),
                        np.float32(np.linspace(-2 * m, 2 * m, 1001))]).astype(np.float32)
    ref = ref_cast(x, dt)
    assert_bits(Q.saturating_cast(x, name), ref)
    assert_bits(jax.jit(Q.saturating_cast, static_argnums=1)(x, name), ref)
    out = np.asarray(Q.saturating_cast(x, name)).astype(np.float32)
    assert np.isfinite(out).all() and out.max() == m and out.min() == -m


def test_plain_cast_overflows_saturating_cast_does_not():
    over = jnp.float32([500.0, -1e4])
    assert np.isnan(np.asarray(over.astype(jnp.float8_e4m3fn)).astype(np.float32)).all()
    assert np.isinf(np.asarray(jnp.float32([7e4]).astype(jnp.float8_e5m2)).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(Q.saturating_cast(over, "float8_e4m3fn"),
                                             np.float32), [448.0, -448.0])
    np.testing.assert_array_equal(np.asarray(Q.saturating_cast(jnp.float32([300.0, -129.6]),
                                                               "int8"), np.int8), [127, -127])


# --------------------------------------------------------------------------------------------
# quantize / dequantize


GRANULARITIES = [dict(), dict(axis=0), dict(axis=1), dict(axis=(0, 2)), dict(axis=-1),
                 dict(block=32), dict(block=128)]


@pytest.mark.parametrize("name", list(ALL))
def test_quantize_dequantize_bit_exact(name):
    dt = ALL[name]
    x = data((4, 6, 256), seed=1)
    qz = jax.jit(Q.quantize, static_argnames=("fmt", "axis", "block"))
    dq = jax.jit(Q.dequantize)
    for kw in GRANULARITIES:
        q_ref, s_ref, sb_ref = ref_quantize(x, dt, **kw)
        x_ref = q_ref.astype(np.float32) * (np.float32(1) / sb_ref)
        for q, s in (Q.quantize(x, name, **kw), qz(x, fmt=name, **kw)):
            assert_bits(q, q_ref)
            assert_bits(s, s_ref)
            assert_bits(Q.dequantize(q, s), x_ref)
            assert_bits(dq(q, s), x_ref)
        assert np.isfinite(x_ref).all()


def test_per_channel_axes_and_block_shapes():
    x = data((16, 64), seed=2)
    _, s0 = Q.quantize(x, "int8", axis=0)            # one scale per row
    _, s1 = Q.quantize(x, "int8", axis=1)            # one scale per column
    _, sb = Q.quantize(x, "int8", block=32)
    assert s0.shape == (16, 1) and s1.shape == (1, 64) and sb.shape == (16, 2)
    np.testing.assert_array_equal(np.asarray(Q.compute_amax(x, axis=0))[:, 0],
                                  np.abs(x).max(axis=1))
    np.testing.assert_array_equal(np.asarray(Q.compute_amax(x, axis=1))[0], np.abs(x).max(axis=0))
    np.testing.assert_array_equal(np.asarray(Q.compute_amax(x, block=32)),
                                  np.abs(x).reshape(16, 2, 32).max(-1))


def test_bad_granularity_errors():
    with pytest.raises(ValueError, match="block=32 does not divide the last axis \\(length 48\\)"):
        Q.quantize(jnp.ones((2, 48)), "int8", block=32)
    with pytest.raises(ValueError, match="axis 2 is out of range for an array of rank 2"):
        Q.compute_amax(jnp.ones((2, 4)), axis=2)
    with pytest.raises(ValueError, match="not both"):
        Q.compute_amax(jnp.ones((2, 32)), axis=0, block=32)


@pytest.mark.parametrize("name", ["float8_e4m3fn", "float8_e5m2", "int8", "int4"])
def test_saturation_at_and_beyond_amax(name):
    m = Q.fmt_max(name)
    x = jnp.float32([[-3.0, -1.0, 0.0, 0.5, 3.0]])
    q, s = Q.quantize(x, name)
    qf = np.asarray(q).astype(np.float32)
    assert qf[0, 0] == -m and qf[0, -1] == m         # exactly +-amax -> exactly +-fmt_max
    # a static scale calibrated on amax 1: 3.0 lies beyond it and saturates, never NaN/inf
    q2, _ = Q.quantize(x, name, scale=Q.compute_scale(jnp.float32(1.0), name))
    q2f = np.asarray(q2).astype(np.float32)
    assert np.isfinite(q2f).all() and q2f[0, 0] == -m and q2f[0, -1] == m


def test_reversed_scale_formula_overflows():
    """The seed's warning: ``amax / FP8_MAX`` used as the multiplier is the wrong direction."""
    x = jnp.float32([1000.0, -700.0, 3.0, 0.001])    # an activation with outliers, amax 1000
    fp8_max = Q.fmt_max("float8_e4m3fn")
    amax = jnp.max(jnp.abs(x))
    reversed_ = amax / fp8_max                       # 2.23: *expands* the range
    plain = np.asarray((x * reversed_).astype(jnp.float8_e4m3fn)).astype(np.float32)
    assert np.isnan(plain[:2]).all()                 # 2232 and -1562 are past 448: NaN
    sat, _ = Q.quantize(x, "float8_e4m3fn", scale=reversed_)
    back = np.asarray(Q.dequantize(sat, reversed_))
    assert abs(back[0] - 1000.0) > 750               # saturated: 448 / 2.23 = 201, not 1000
    # and for a small tensor the reversed multiplier flushes everything to zero
    small = jnp.float32([0.01, -0.02])
    q_small, _ = Q.quantize(small, "float8_e4m3fn", scale=jnp.max(jnp.abs(small)) / fp8_max)
    assert not np.asarray(q_small).astype(np.float32).any()
    # the right direction keeps every value finite and within 1/16 relative error
    q, s = Q.quantize(x, "float8_e4m3fn")
    # (0.001 * 0.448 is below e4m3's smallest subnormal 2**-9: it flushes to zero, as it must)
    np.testing.assert_allclose(np.asarray(Q.dequantize(q, s))[:3], np.asarray(x)[:3], rtol=1 / 16)
    assert float(s) == pytest.approx(448.0 / 1000.0)


# --------------------------------------------------------------------------------------------
# scales: bad amax, margin, inverse convention


def test_bad_amax_keeps_previous_scale():
    prev = jnp.float32([0.5, 0.5, 0.5, 0.5, 0.5])
    amax = jnp.float32([0.0, np.nan, np.inf, 1e-45, 2.0])  # 1e-45: 448 / amax overflows
    s = Q.compute_scale(amax, "float8_e4m3fn", prev_scale=prev)
    np.testing.assert_array_equal(np.asarray(s), [0.5, 0.5, 0.5, 0.5, 224.0])
    s = jax.jit(Q.compute_scale, static_argnums=1)(amax, "float8_e4m3fn")   # no prev: 1.0
    np.testing.assert_array_equal(np.asarray(s), [1.0, 1.0, 1.0, 1.0, 224.0])
    q, s = Q.quantize(jnp.zeros((3, 4)), "float8_e4m3fn")          # all-zero tensor
    assert float(s) == 1.0 and not np.asarray(Q.dequantize(q, s)).any()
    assert np.isfinite(np.asarray(Q.ema_scale(0.3, np.nan, "int8"))) and \
        float(Q.ema_scale(0.3, 0.0, "int8")) == pytest.approx(0.3)


def test_bad_amax_raise_names_the_tensor():
    with pytest.raises(ValueError, match="amax of layers_0/q_proj/kernel is zero or non-finite"):
        Q.compute_scale(jnp.float32(0.0), "int8", on_bad_amax="raise",
                        name="layers_0/q_proj/kernel")
    assert float(Q.compute_scale(jnp.float32(1.0), "int8", on_bad_amax="raise")) == 127.0

    def f(a):
        return Q.compute_scale(a, "float8_e4m3fn", on_bad_amax="raise", name="act_x")

    with pytest.raises(ValueError, match="checkify"):     # a plain jit cannot raise on a value
        jax.jit(f)(jnp.float32(0.0))
    checked = jax.jit(checkify.checkify(f))
    err, s = checked(jnp.float32(2.0))
    err.throw()
    assert float(s) == 224.0
    err, _ = checked(jnp.float32(np.inf))
    with pytest.raises(Exception, match="amax of act_x"):
        err.throw()
    with pytest.raises(ValueError, match="keep, raise"):
        Q.compute_scale(jnp.float32(1.0), "int8", on_bad_amax="ignore")


def test_margin_and_inverse_convention():
    amax = jnp.float32([3.0, 0.25])
    s = Q.compute_scale(amax, "float8_e5m2", margin=2)
    ref = (np.float32(57344.0) / np.float32([3.0, 0.25])) / np.float32(4.0)
    assert_bits(s, ref.astype(np.float32))
    inv = Q.scale_inv_from_scale(Q.compute_scale(amax, "float8_e4m3fn"))
    np.testing.assert_allclose(np.asarray(inv), np.float32([3.0, 0.25]) / 448.0, rtol=1e-7)
    np.testing.assert_allclose(np.asarray(Q.scale_from_scale_inv(inv)), 448.0 / np.float32(
        [3.0, 0.25]), rtol=1e-6)
    p2 = jnp.float32([0.25, 8.0])                     # exact both ways for powers of two
    assert_bits(Q.scale_from_scale_inv(Q.scale_inv_from_scale(p2)), np.float32([0.25, 8.0]))


# --------------------------------------------------------------------------------------------
# delayed scaling and EMA


def test_amax_history_matches_a_python_list_reference():
    """Reference: a python list, newest first, truncated to the window; plus Flax's raw layout
    (roll by -1, write index 0) spelled out by hand."""
    length = 4
    amaxes = [3.0, 1.0, 7.0, 2.0, 0.5, 4.0, 0.25]
    h = Q.init_amax_history(length)
    upd = jax.jit(Q.update_amax_history)
    newest_first: list[float] = []
    raw = [0.0] * length
    for a in amaxes:
        h = upd(h, jnp.float32(a))
        newest_first = ([a] + newest_first)[:length]
        raw = raw[1:] + raw[:1]                      # jnp.roll(shift=-1)
        raw[0] = a
        np.testing.assert_array_equal(np.asarray(h), raw)
        window = newest_first + [0.0] * (length - len(newest_first))
        np.testing.assert_array_equal(np.asarray(Q.history_newest_first(h)), window)
        assert float(Q.amax_from_history(h, "max")) == max(window)
        assert float(jax.jit(Q.amax_from_history, static_argnums=1)(h, "most_recent")) == a
    # after 7 updates the window holds the last 4 amaxes
    assert sorted(np.asarray(h).tolist()) == sorted(amaxes[-4:])
    with pytest.raises(ValueError, match="max, most_recent"):
        Q.amax_from_history(h, "mean")


def test_amax_history_per_channel_and_default_length():
    h = Q.init_amax_history(shape=(3,))
    assert h.shape == (Q.DEFAULT_AMAX_HISTORY, 3) == (1024, 3)
    h = Q.update_amax_history(h, jnp.float32([1.0, 2.0, 3.0]))
    h = Q.update_amax_history(h, jnp.float32([0.5, 5.0, 0.0]))
    np.testing.assert_array_equal(np.asarray(Q.amax_from_history(h)), [1.0, 5.0, 3.0])
    np.testing.assert_array_equal(np.asarray(Q.amax_from_history(h, "most_recent")),
                                  [0.5, 5.0, 0.0])


def test_ema_scale_formula():
    beta = 0.999
    prev = np.float32([0.5, 2.0, 100.0])
    amax = np.float32([1.0, 300.0, 0.01])
    want = np.float32(beta) * prev + np.float32(1 - beta) * (np.float32(448.0) / amax)
    got = jax.jit(Q.ema_scale, static_argnums=(2, 3))(prev, amax, "float8_e4m3fn", beta)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6)
    # the seed's recursion over steps, against float64 python
    s, s_ref = jnp.float32(1.0), 1.0
    for a in [2.0, 2.5, 40.0, 1.0]:
        s = Q.ema_scale(s, a, "float8_e4m3fn", beta=0.9)
        s_ref = 0.9 * s_ref + 0.1 * 448.0 / a
    assert float(s) == pytest.approx(s_ref, rel=1e-6)


# --------------------------------------------------------------------------------------------
# rounding


def test_round_scale_pow2_rounds_down():
    s = np.float32([448.0 / 3.7, 1.0, 0.75, 3.0e-5, 2.0 ** -20, 2.0 ** 20 * 1.5, 5.0])
    want = np.float32([2.0 ** math.floor(math.log2(float(v))) for v in s])
    assert_bits(jax.jit(Q.round_scale_pow2)(s), want)
    special = np.asarray(Q.round_scale_pow2(jnp.float32([0.0, np.inf])))
    np.testing.assert_array_equal(special, [0.0, np.inf])
    # nothing that fit overflows: |x| * pow2(scale) <= |x| * scale <= fmt_max
    x = data((2048,), seed=3)
    s = Q.compute_scale(Q.compute_amax(x), "float8_e4m3fn")
    assert float(jnp.max(jnp.abs(x * Q.round_scale_pow2(s)))) <= 448.0


def test_round_scale_to_gaudi2_set():
    assert Q.GAUDI2_E4M3_SCALES == tuple(1.0 / v for v in reversed(Q.GAUDI2_E4M3_SCALE_INVS))
    s = jnp.float32([0.01, 0.0625, 0.5, 1.0, 15.9, 16.0, 255.0, 300.0, 1e9])
    got = jax.jit(Q.round_scale_to_set, static_argnums=1)(s, Q.GAUDI2_E4M3_SCALES)
    np.testing.assert_array_equal(np.asarray(got), [2.0 ** -4, 2.0 ** -4, 2.0 ** -4, 1.0, 1.0,
                                                    16.0, 16.0, 256.0, 256.0])
    with pytest.raises(ValueError, match="positive finite"):
        Q.round_scale_to_set(s, [])


def test_every_function_jits():
    x = jnp.asarray(data((4, 64), seed=4))
    h = Q.init_amax_history(8)
    for fn, args in [(lambda a: Q.compute_amax(a, axis=1), (x,)),
                     (lambda a: Q.compute_amax(a, block=32), (x,)),
                     (lambda a: Q.compute_scale(Q.compute_amax(a), "int8", margin=1), (x,)),
                     (Q.scale_inv_from_scale, (jnp.float32(3.0),)),
                     (Q.scale_from_scale_inv, (jnp.float32(3.0),)),
                     (Q.update_amax_history, (h, jnp.float32(2.0))),
                     (Q.history_newest_first, (h,)),
                     (lambda hh: Q.amax_from_history(hh, "max"), (h,)),
                     (lambda p, a: Q.ema_scale(p, a, "float8_e5m2"), (jnp.float32(1.0),
                                                                      jnp.float32(3.0))),
                     (Q.round_scale_pow2, (jnp.float32(3.0),)),
                     (lambda s: Q.round_scale_to_set(s, (0.5, 1.0, 4.0)), (jnp.float32(3.0),)),
                     (lambda a: Q.saturating_cast(a, "float8_e4m3fnuz"), (x,)),
                     (lambda a: Q.quantize(a, "int4", axis=0), (x,)),
                     (lambda q, s: Q.dequantize(q, s), Q.quantize(x, "int8", block=32))]:
        eager, jitted = fn(*args), jax.jit(fn)(*args)
        for e, j in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
            assert_bits(j, np.asarray(e))
