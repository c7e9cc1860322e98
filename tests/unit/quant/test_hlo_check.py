"""The FP8 GEMM pattern checker (tfm_jax.quant.hlo_check): Flax's FP8 ops as the positive control,
hand-written negative controls (one rule each), and tfm-jax's own train step lowered with the op set
a GPU run gets. The configuration sweep is tests/integration/test_fp8_gemm_form.py."""

import warnings

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn

from tfm_jax.quant import hlo_check

from fp8_support import step_hlo

E4, E5 = jnp.float8_e4m3fn, jnp.float8_e5m2
DN = (((1,), (0,)), ((), ()))


def _hlo(f, *args):
    return jax.jit(f).lower(*args).as_text(dialect="hlo")


def _x(dtype=jnp.bfloat16, shape=(16, 32)):
    return jnp.ones(shape, dtype)


@pytest.mark.parametrize("op", ["Fp8DotGeneralOp", "Fp8DirectDotGeneralOp"])
def test_flax_fp8_ops_pass_three_of_three(op):
    """Positive control: a Flax dense layer with Flax's FP8 op, its forward and both backward
    dots, bf16 -- the form XLA's rewriter is written for."""
    from flax.linen import fp8_ops

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        layer = nn.Dense(24, dtype=jnp.bfloat16, dot_general_cls=getattr(fp8_ops, op))
        x = _x()
        variables = layer.init(jax.random.key(0), x)

    def loss(v, x):
        return jnp.sum(jnp.square(layer.apply(v, x).astype(jnp.float32)))

    rep = hlo_check.check_hlo(_hlo(jax.grad(loss, argnums=(0, 1)), variables, x))
    assert rep.total == 3 and rep.accepted == 3, rep.summary()


def _dequant(q, s, dtype):
    return q.astype(dtype) * s.astype(dtype)


NEGATIVE = {
    # the form tfm-jax's FP8 dot had in bf16: the multiply in f32, the convert after it
    "convert after the multiply": (
        lambda q, k, s: jax.lax.dot_general(
            (q.astype(jnp.float32) * s).astype(jnp.bfloat16), _dequant(k, s, jnp.bfloat16), DN),
        "convert between the dequantize and the dot"),
    "add after the dequantize": (
        lambda q, k, s: jax.lax.dot_general(_dequant(q, s, jnp.bfloat16) + 1,
                                            _dequant(k, s, jnp.bfloat16), DN),
        "no FP8 value reachable"),     # an add has two operands: the search stops there
    "per-channel scale": (
        lambda q, k, s: jax.lax.dot_general(_dequant(q, s, jnp.bfloat16),
                                            k.astype(jnp.bfloat16)
                                            * (s * jnp.arange(1, 25)).astype(jnp.bfloat16), DN),
        "non-scalar scale"),
    "e5m2 x e5m2": (
        lambda q, k, s: jax.lax.dot_general(q.astype(E5), k.astype(E5), DN,
                                            preferred_element_type=jnp.bfloat16),
        "e5m2 x e5m2"),
    "two contracting dimensions": (
        lambda q, k, s: jax.lax.dot_general(q.reshape(16, 4, 8), k.reshape(4, 8, 24),
                                            (((1, 2), (0, 1)), ((), ())),
                                            preferred_element_type=jnp.bfloat16),
        "2 x 2 contracting dimensions"),
}


@pytest.mark.parametrize("case", sorted(NEGATIVE))
def test_negative_controls_are_refused_with_their_reason(case):
    f, reason = NEGATIVE[case]
    q, k = _x(E4), _x(E4, (32, 24))
    rep = hlo_check.check_hlo(_hlo(f, q, k, jnp.float32(0.5)))
    assert rep.total == 1 and rep.accepted == 0, rep.summary()
    assert reason in rep.dots[0].reason, rep.dots[0].reason


POSITIVE = {
    "f8 operands": lambda q, k, s: jax.lax.dot_general(q, k, DN,
                                                       preferred_element_type=jnp.bfloat16),
    "e5m2 x e4m3": lambda q, k, s: jax.lax.dot_general(q.astype(E5), k, DN,
                                                       preferred_element_type=jnp.float32),
    "multiply, then reshape and transpose": lambda q, k, s: jax.lax.dot_general(
        _dequant(q, s, jnp.bfloat16).reshape(16, 32).T.T, _dequant(k, s, jnp.bfloat16), DN),
    "divide by the scale": lambda q, k, s: jax.lax.dot_general(
        q.astype(jnp.float32) / s, k.astype(jnp.float32), DN),
    "select against zero": lambda q, k, s: jax.lax.dot_general(
        jnp.where(jnp.arange(32) < 8, _dequant(q, s, jnp.bfloat16), 0.0).astype(jnp.bfloat16),
        _dequant(k, s, jnp.bfloat16), DN),
}


@pytest.mark.parametrize("case", sorted(POSITIVE))
def test_forms_the_rewriter_accepts(case):
    q, k = _x(E4), _x(E4, (32, 24))
    rep = hlo_check.check_hlo(_hlo(POSITIVE[case], q, k, jnp.float32(0.5)))
    assert rep.total == 1 and rep.all_accepted, rep.summary()


def test_dots_not_fed_by_fp8_are_not_counted():
    rep = hlo_check.check_hlo(_hlo(lambda a, b: a @ b, _x(), _x(shape=(32, 8))))
    assert rep.total == 0 and not rep.all_accepted


def test_train_step_dots_take_the_fp8_gemm_form(tmp_path, devices):
    """tfm-jax's step (fp8_delayed, the GPU op set, bf16, scanned layers, remat of dots,
    gradient accumulation): every dot fed by FP8 values -- forward, input gradient and kernel
    gradient of the 7 projections -- passes the rewriter's rules. (Every other configuration:
    tests/integration/test_fp8_gemm_form.py.)"""
    text = step_hlo(tmp_path, devices, "model.dtype=bfloat16", "model.scan_layers=true",
                    "model.remat=dots", "train.grad_accum=2")
    rep = hlo_check.check_hlo(text)
    assert rep.total == 3 * 7 and rep.all_accepted, rep.summary()


@pytest.mark.gpu
@pytest.mark.parametrize("scan", [False, True])
def test_compiled_step_runs_three_fp8_gemms_per_projection(tmp_path, devices, scan):
    """On a GPU with FP8 GEMMs (H100/H200): the compiled bf16 fp8_delayed step runs at least 3
    FP8 GEMMs (cuBLASLt FP8 calls or FP8 Triton fusions) on every quantized projection and no
    plain GEMM on any of them (benchmarks/fp8_gpu.py reports the same count)."""

    from tfm_jax.quant import fp8
    from tfm_jax.train import build

    from fp8_support import cfg_of

    cfg = cfg_of(tmp_path, "mesh.data=1", "model.dtype=bfloat16", "model.d_model=128",
                 "model.multiple_of=64", "data.seq_len=64",
                 f"model.scan_layers={str(scan).lower()}")
    setup = build(cfg, devices=devices[:1])
    with setup.context():
        text = setup.train_step.lower(setup.abstract_state(),
                                      setup.abstract_batch()).compile().as_text()
    counts = hlo_check.gemm_counts(text)
    ok, bad = hlo_check.fp8_gemm_verdict(counts)
    assert len([p for p in counts if p != "other"]) == 7 * (1 if scan else 2), counts
    assert ok, (bad, counts)
    assert fp8.fp8_dot_mode(text) == "native"
