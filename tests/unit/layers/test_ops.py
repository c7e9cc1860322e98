"""The ops seam (tfm_jax.layers.ops): every op set computes the same model, each backend gets the
set meant for it, and CPU-only tricks stay out of the GPU/TPU set."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from tfm_jax.platform import backends
from tfm_jax.config import ConfigError, ModelConfig, load_config
from tfm_jax.layers import ops as ops_lib
from tfm_jax.layers.attention_ops.block import causal_attention
from tfm_jax.layers.attention_ops.dense import (dense_causal_attention, grouped_attention,
                                                make_attention_mask)
from tfm_jax.platform.kernels import cpu as cpu_kernels
from tfm_jax.platform.xla_cpu import cpu_xla_ops
from tfm_jax.model import TransformerLM


def _native_ops():
    try:
        return cpu_kernels.native_ops()
    except RuntimeError:
        return None   # tests/unit/platform/test_kernels.py fails loudly where the kernels should build


def op_sets():
    sets = [ops_lib.xla_ops(), cpu_xla_ops()]
    native = _native_ops()
    return sets + ([native] if native is not None else [])


def _close(a, b, tol):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64),
                               rtol=tol, atol=tol)


# padded=False runs in the integration tier (tests/integration/test_heavy_unit_cases.py)
@pytest.mark.parametrize("padded", [pytest.param(False, marks=pytest.mark.slow), True])
def test_causal_cores_agree_values_and_grads(padded):
    """dense (xla set) == block-causal (cpu-xla set) == the general masked reference, GQA."""
    r = np.random.default_rng(0)
    b, t, h, hkv, d = 2, 37, 4, 2, 8
    q, k, v = (jnp.asarray(r.normal(size=(b, t, n, d)), jnp.float32) for n in (h, hkv, hkv))
    valid = np.ones((b, t), np.float32)
    if padded:
        valid[0, 25:] = 0
        valid[1, 3:9] = 0
    kv = jnp.asarray(valid)
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    w = jnp.asarray(r.normal(size=(b, t, h, d)), jnp.float32)

    def loss(f, q, k, v):
        return jnp.sum(f(q, k, v) * w)

    ref = functools.partial(lambda q, k, v: grouped_attention(
        q, k, v, make_attention_mask(pos, pos, kv)))
    cores = {"dense": lambda q, k, v: dense_causal_attention(q, k, v, kv),
             "block16": lambda q, k, v: causal_attention(q, k, v, kv, block_q=16)}
    y_ref = ref(q, k, v)
    g_ref = jax.grad(functools.partial(loss, ref), (0, 1, 2))(q, k, v)
    for name, f in cores.items():
        _close(f(q, k, v), y_ref, 2e-5)
        for g, gr in zip(jax.grad(functools.partial(loss, f), (0, 1, 2))(q, k, v), g_ref):
            _close(g, gr, 2e-4)


# Both cases run in the integration tier (tests/integration/test_heavy_unit_cases.py): the
# default suite's time budget; the other op-set tests stay here.
@pytest.mark.parametrize("scan", [pytest.param(False, marks=pytest.mark.slow),
                                  pytest.param(True, marks=pytest.mark.slow)])
def test_every_op_set_computes_the_same_model(scan):
    """Same parameters (tree, shapes, init values) and, to fp32 rounding, the same logits and
    gradients with padding, for every op set available here."""
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      attn_block_q=8, scan_layers=scan)
    r = np.random.default_rng(1)
    tokens = jnp.asarray(r.integers(0, 64, (2, 24)), jnp.int32)
    mask = jnp.asarray(np.r_[np.ones(24), np.r_[np.ones(17), np.zeros(7)]].reshape(2, 24),
                       jnp.float32)
    results = {}
    for ops in op_sets():
        model = TransformerLM(cfg, ops=ops)
        params = nn.meta.unbox(model.init(jax.random.key(0), tokens))["params"]

        def loss(p, model=model):
            logits = model.apply({"params": p}, tokens, token_mask=mask)
            return jnp.sum(jax.nn.log_softmax(logits)[..., 0] * mask), logits

        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        results[ops.name] = (params, logits, grads)
    names = list(results)
    p0, l0, g0 = results[names[0]]
    for name in names[1:]:
        p, logits, g = results[name]
        assert jax.tree.structure(p) == jax.tree.structure(p0)
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), p, p0)
        _close(logits, l0, 1e-4)
        jax.tree.map(lambda a, b: _close(a, b, 2e-4), g, g0)


def _has_primitive(jaxpr, name) -> bool:
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == name:
            return True
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (list, tuple)) else [p]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns") and _has_primitive(inner, name):
                    return True
    return False


def test_cpu_tricks_stay_out_of_the_xla_set():
    """The GPU/TPU set runs no optimization barrier (the CPU dW trick) and no unrolled
    block-causal loop; the CPU set does (a probe that can fail either way)."""
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2,
                      attn_block_q=8)
    tokens = jnp.zeros((1, 32), jnp.int32)

    def grad_jaxpr(ops):
        model = TransformerLM(cfg, ops=ops)
        params = nn.meta.unbox(model.init(jax.random.key(0), tokens))["params"]
        return jax.make_jaxpr(jax.grad(
            lambda p: jnp.sum(model.apply({"params": p}, tokens))))(params).jaxpr

    def n_exp(jaxpr):      # one softmax exp per attention block (4 blocks of 8 for T=32)
        count = 0
        for eqn in jaxpr.eqns:
            count += eqn.primitive.name == "exp"
            for p in eqn.params.values():
                inner = getattr(p, "jaxpr", p)
                if hasattr(inner, "eqns"):
                    count += n_exp(inner)
        return count

    xla, cpu = grad_jaxpr(ops_lib.xla_ops()), grad_jaxpr(cpu_xla_ops())
    assert not _has_primitive(xla, "optimization_barrier")
    assert _has_primitive(cpu, "optimization_barrier")
    assert n_exp(xla) < n_exp(cpu)


@dataclasses.dataclass
class _FakeDevice:
    platform: str


def test_resolve_ops_rules(devices):
    cfg = load_config()
    gpu = backends.resolve_ops(cfg, [_FakeDevice("gpu")])
    assert gpu.name == "xla" and "gpu" in gpu.describe()
    assert backends.resolve_ops(cfg, [_FakeDevice("tpu")] * 4).name == "xla"
    multi = backends.resolve_ops(cfg, devices)
    assert multi.name == "cpu-xla" and "8 devices" in multi.describe()
    xla = backends.resolve_ops(load_config(overrides=["backend.cpu_kernels=xla"]), devices[:1])
    assert xla.name == "cpu-xla" and "backend.cpu_kernels=xla" in xla.describe()
    bf = backends.resolve_ops(load_config(overrides=["model.dtype=bfloat16"]), devices[:1])
    assert bf.name == "cpu-xla" and "bfloat16" in bf.describe()
    with pytest.raises(ConfigError, match="cpu_kernels=native.*8 devices"):
        backends.resolve_ops(load_config(overrides=["backend.cpu_kernels=native"]), devices)
    one = backends.resolve_ops(cfg, devices[:1])
    assert one.name == ("cpu-native" if _native_ops() is not None else "cpu-xla")
    assert one.describe().startswith("native CPU kernels" if one.name == "cpu-native"
                                     else "XLA ops")


def test_a_layer_given_no_ops_uses_the_portable_xla_set():
    assert ops_lib.resolve(None) is ops_lib.xla_ops()      # the CPU sets come from the backend
    assert ops_lib.resolve(ops_lib.xla_ops()) is ops_lib.xla_ops()


def test_replaced_gemm_is_named_in_the_log_line():
    class Int8Dot(nn.Module):
        @nn.compact
        def __call__(self, x, w, dims, precision=None, preferred_element_type=None):
            return jax.lax.dot_general(x, w, dims)

    ops = cpu_xla_ops().with_dot_general(Int8Dot)
    assert "projections use Int8Dot" in ops.describe()
    assert "projections use" not in cpu_xla_ops().describe()
    # the replacement really runs: same numbers as the set's own GEMM here, but a module
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2)
    tokens = jnp.zeros((1, 8), jnp.int32)
    a = TransformerLM(cfg, ops=ops)
    b = TransformerLM(cfg, ops=cpu_xla_ops())
    params = nn.meta.unbox(b.init(jax.random.key(0), tokens))["params"]
    _close(a.apply({"params": params}, tokens), b.apply({"params": params}, tokens), 1e-5)


def test_a_blas_asked_for_by_name_is_never_a_silent_fallback(devices, monkeypatch):
    """backend.cpu_blas=mkl without MKL (or openblas without it) is a config error naming the
    fix, not a quiet cpu-xla run; auto may fall back (with the reason in the log line)."""
    from tfm_jax.platform.kernels import cpu
    installed = {kind for kind, paths in cpu.find_blas().items() if paths}
    monkeypatch.delenv("TFM_JAX_CPU_BLAS", raising=False)
    names = {"mkl": "MKL", "openblas": "OpenBLAS"}
    fix = {"mkl": "pip install", "openblas": "pip install"}
    prev = cpu.active_blas()
    try:
        for kind in ("mkl", "openblas"):
            cfg = load_config(overrides=[f"backend.cpu_blas={kind}"])
            if kind in installed:
                ops = backends.resolve_ops(cfg, devices[:1])
                assert ops.name == "cpu-native" and names[kind] in ops.describe()
            else:
                with pytest.raises(ConfigError, match=f"cpu_blas={kind}.*{fix[kind]}"):
                    backends.resolve_ops(cfg, devices[:1])
    finally:
        if prev is not None:
            cpu.use_blas(prev)                  # leave the default BLAS active
