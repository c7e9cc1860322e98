"""Weight-only integer PTQ (tfm_jax.quant.ptq, tfm_jax.tools.quantize, ``tfm-jax quantize``): int4
packing and asymmetric int8 against independent numpy references, per-output-channel axes of
every projection, and a trained tiny run quantized, evaluated, generated from and refused for
training."""


import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from tfm_jax.config import compose_config
from tfm_jax.quant import ptq


# --------------------------------------------------------------------------------------------
# independent numpy references


def ref_pack(q):
    """Loop reference: byte j of a row = (q[2j] & 15) | (q[2j+1] & 15) << 4, zero pad."""
    q = np.asarray(q, np.int64)
    rows = q.reshape(-1, q.shape[-1])
    nbytes = (q.shape[-1] + 1) // 2
    out = np.zeros((rows.shape[0], nbytes), np.uint8)
    for r, row in enumerate(rows):
        for j in range(nbytes):
            lo = int(row[2 * j]) % 16
            hi = int(row[2 * j + 1]) % 16 if 2 * j + 1 < len(row) else 0
            out[r, j] = lo + 16 * hi
    return out.reshape(*q.shape[:-1], nbytes)


def ref_asym(x, keep):
    x = np.asarray(x, np.float32)
    red = tuple(a for a in range(x.ndim) if a not in keep)
    lo = np.minimum(x.min(axis=red, keepdims=True), np.float32(0))
    hi = np.maximum(x.max(axis=red, keepdims=True), np.float32(0))
    rng_ = (hi - lo).astype(np.float32)
    with np.errstate(divide="ignore"):
        s = np.where(rng_ > 0, np.float32(255) / rng_, np.float32(1)).astype(np.float32)
    zp = np.clip(np.rint(-lo * s), 0, 255)
    q = np.clip(np.rint(x * s) + zp, 0, 255)
    return q.astype(np.uint8), s, zp.astype(np.uint8)


def ref_sym(x, keep, qmax):
    x = np.asarray(x, np.float32)
    red = tuple(a for a in range(x.ndim) if a not in keep)
    amax = np.abs(x).max(axis=red, keepdims=True)
    with np.errstate(divide="ignore"):
        s = np.where(amax > 0, np.float32(qmax) / amax, np.float32(1)).astype(np.float32)
    return np.clip(np.rint(x * s), -qmax, qmax).astype(np.int8), s


# --------------------------------------------------------------------------------------------
# pure functions


@pytest.mark.parametrize("n", [1, 7, 8, 33])
def test_int4_pack_unpack_against_numpy(n):
    q = np.random.default_rng(n).integers(-8, 8, size=(3, 2, n)).astype(np.int8)
    packed = ptq.pack_int4(q)
    assert packed.dtype == jnp.uint8 and packed.shape == (3, 2, (n + 1) // 2)
    np.testing.assert_array_equal(np.asarray(packed), ref_pack(q))
    np.testing.assert_array_equal(np.asarray(ptq.unpack_int4(packed, n)), q)
    # ml_dtypes int4 input (what quantize(..., "int4") returns) packs the same
    np.testing.assert_array_equal(np.asarray(ptq.pack_int4(jnp.asarray(q.astype(
        ml_dtypes.int4)))), ref_pack(q))
    with pytest.raises(ValueError, match="cannot hold"):
        ptq.unpack_int4(packed, n + 2)


def test_int4_unpack_every_byte():
    every = np.arange(256, dtype=np.uint8)
    got = np.asarray(ptq.unpack_int4(every, 512))
    lo, hi = every % 16, every // 16
    want = np.stack([np.where(lo > 7, lo.astype(int) - 16, lo),
                     np.where(hi > 7, hi.astype(int) - 16, hi)], -1).reshape(-1)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.asarray(ptq.pack_int4(got)), every)


@pytest.mark.parametrize("keep", [(1,), (0, 2), (2,)])
def test_asymmetric_int8_bit_exact(keep):
    x = np.random.default_rng(1).normal(0.3, 1.0, size=(16, 4, 8)).astype(np.float32)
    x[:, 0, :] = np.abs(x[:, 0, :])                 # a channel with no negative values
    x[:, 1, :] = 0.0                                 # an all-zero channel
    qw = ptq.quantize_weight(x, "int8_weight_asym", keep)
    q, s, zp = ref_asym(x, set(keep))
    assert qw["q"].dtype == jnp.uint8 and qw["zero_point"].dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(qw["q"]), q)
    np.testing.assert_array_equal(np.asarray(qw["scale"]).view(np.uint32), s.view(np.uint32))
    np.testing.assert_array_equal(np.asarray(qw["zero_point"]), zp)
    deq = np.asarray(ptq.dequantize_weight(qw, "int8_weight_asym"))
    want = (q.astype(np.float32) - zp.astype(np.float32)) * (np.float32(1) / s)
    np.testing.assert_array_equal(deq.view(np.uint32), want.view(np.uint32))
    assert not deq[:, 1, :].any() if 1 in keep else True          # zero stays exactly zero
    step = 1.0 / s                                   # error <= half a step per channel
    assert np.all(np.abs(deq - x) <= 0.5 * np.broadcast_to(step, x.shape) * (1 + 1e-6))


@pytest.mark.parametrize("recipe,qmax", [("int8_weight", 127), ("int4_weight", 7)])
def test_symmetric_weight_against_numpy(recipe, qmax):
    x = np.random.default_rng(2).normal(size=(2, 12, 6)).astype(np.float32)   # (L, in, out)
    keep = (0, 2)
    qw = ptq.quantize_weight(x, recipe, keep)
    q, s = ref_sym(x, set(keep), qmax)
    np.testing.assert_array_equal(np.asarray(qw["scale"]).view(np.uint32), s.view(np.uint32))
    codes = (np.asarray(ptq.unpack_int4(qw["q"], 6)) if recipe == "int4_weight"
             else np.asarray(qw["q"]))
    assert qw["q"].dtype == (jnp.uint8 if recipe == "int4_weight" else jnp.int8)
    np.testing.assert_array_equal(codes, q)
    deq = np.asarray(ptq.dequantize_weight(qw, recipe, jnp.bfloat16))
    assert deq.dtype == jnp.bfloat16
    want = (q.astype(np.float32) * (np.float32(1) / s)).astype(jnp.bfloat16)
    np.testing.assert_array_equal(deq.view(np.uint16), want.view(np.uint16))


def test_quantize_params_selects_and_axes():
    rng = np.random.default_rng(3)
    f = lambda *s: rng.normal(size=s).astype(np.float32)   # noqa: E731
    params = {"embed": {"embedding": f(10, 8)}, "lm_head": {"kernel": f(8, 10)},
              "layers": {"attn": {"q_proj": {"kernel": f(3, 8, 2, 4)},      # scanned (L, d, H, Dh)
                                  "o_proj": {"kernel": f(3, 2, 4, 8)}},     # (L, H, Dh, d)
                         "attn_norm": {"scale": f(3, 8)}}}
    info = {("layers", "attn", "q_proj"): (1, 2), ("layers", "attn", "o_proj"): (2, 1),
            ("lm_head",): (1, 1)}
    q = ptq.quantize_params(params, "int8_weight", info)
    assert q["embed"]["embedding"] is params["embed"]["embedding"]
    assert q["lm_head"]["kernel"] is params["lm_head"]["kernel"]          # kept by default
    assert q["layers"]["attn_norm"]["scale"] is params["layers"]["attn_norm"]["scale"]
    assert q["layers"]["attn"]["q_proj"]["kernel"]["scale"].shape == (3, 1, 2, 4)
    assert q["layers"]["attn"]["o_proj"]["kernel"]["scale"].shape == (3, 1, 1, 8)
    back = ptq.dequantize_params(q, "int8_weight")
    for name in ("q_proj", "o_proj"):
        w = params["layers"]["attn"][name]["kernel"]
        got = np.asarray(back["layers"]["attn"][name]["kernel"])
        assert got.shape == w.shape and np.abs(got - w).max() <= np.abs(w).max() / 127
    with_head = ptq.quantize_params(params, "int8_weight", info, keep=())
    assert ptq.is_quantized_leaf(with_head["lm_head"]["kernel"])
    with pytest.raises(ValueError, match="no Linear was recorded at layers/attn/o_proj"):
        ptq.quantize_params(params, "int8_weight", {})
    with pytest.raises(ValueError, match="int8_weight, int8_weight_asym, int4_weight"):
        ptq.quantize_params(params, "int2_weight", info)


def test_linear_info_of_the_model():
    from tfm_jax.model import TransformerLM
    from tfm_jax.tools.quantize import linear_info

    for scan, prefix in ((False, "layers_0"), (True, "layers")):
        cfg = compose_config("tiny", [{"model": {"d_model": 32, "n_layers": 2, "n_heads": 4,
                                                 "n_kv_heads": 2, "scan_layers": scan}}])
        info = linear_info(TransformerLM(cfg.model))
        assert info[(prefix, "attn", "q_proj")] == (1, 2)
        assert info[(prefix, "attn", "o_proj")] == (2, 1)
        assert info[(prefix, "ffn", "wo")] == (1, 1) and info[("lm_head",)] == (1, 1)
