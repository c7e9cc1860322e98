"""The LM head's float32 logits and the chunked cross-entropy against the plain loss (optax) and
its autodiff gradient; bf16 operands keep bf16 GEMMs in the backward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tfm_jax.layers.cross_entropy import chunked_ce_sum, head_logits
from tfm_jax.tools.inspect import dot_dtypes


def _data(n=37, d=16, v=50, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, v)) * 0.3, jnp.float32)
    t = jnp.asarray(rng.integers(0, v, n), jnp.int32)
    m = jnp.asarray(rng.random(n) > 0.2, jnp.float32)
    return x, w, t, m


def _plain(x, w, t, m):
    logits = jnp.dot(x, w, precision="highest")
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, t) * m)


@pytest.mark.parametrize("chunk", [8, 64])     # 8: 37 tokens padded to 40; 64: one block
def test_chunked_ce_equals_plain_loss_and_gradient(chunk):
    x, w, t, m = _data()
    with jax.default_matmul_precision("highest"):
        ref, (gx, gw) = jax.value_and_grad(_plain, argnums=(0, 1))(x, w, t, m)
        got, (cx, cw) = jax.value_and_grad(chunked_ce_sum, argnums=(0, 1))(x, w, t, m, chunk)
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    np.testing.assert_allclose(cx, gx, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cw, gw, rtol=1e-5, atol=1e-6)


def test_chunked_ce_bf16_operands_f32_head_gradient():
    x, w, t, m = _data()
    xb = x.astype(jnp.bfloat16)
    loss, (dx, dw) = jax.value_and_grad(chunked_ce_sum, argnums=(0, 1))(xb, w, t, m, 8)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32 and loss.dtype == jnp.float32
    # reference: the same bf16-rounded operands in float32
    wb = w.astype(jnp.bfloat16).astype(jnp.float32)
    with jax.default_matmul_precision("highest"):
        ref, (rx, rw) = jax.value_and_grad(_plain, argnums=(0, 1))(
            xb.astype(jnp.float32), wb, t, m)
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    # dlogits rounded to bf16 before the GEMMs: ~3 significant digits
    np.testing.assert_allclose(dw, rw, rtol=2e-2, atol=2e-2 * float(jnp.abs(rw).max()))
    # every GEMM of forward and backward has bf16 operands
    text = jax.jit(jax.grad(lambda a, b: chunked_ce_sum(a, b, t, m, 8), argnums=(0, 1))).lower(
        xb, w).as_text()
    dots = dot_dtypes(text)
    assert dots and all(d[:2] == ("bf16", "bf16") for d in dots), dots


def test_head_logits_f32_out_and_bf16_backward():
    x, w, _, _ = _data(n=8)
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    y = head_logits(xb, wb)
    assert y.dtype == jnp.float32
    ref = np.asarray(xb, np.float64) @ np.asarray(wb, np.float64)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)   # not rounded to bf16
    assert np.abs(np.asarray(y) - ref).max() < np.abs(
        np.asarray(jnp.asarray(ref, jnp.bfloat16), np.float64) - ref).max()
    f = jax.jit(jax.grad(lambda a, b: jnp.sum(jnp.sin(head_logits(a, b))), argnums=(0, 1)))
    dx, dw = f(xb, wb)
    assert dx.dtype == dw.dtype == jnp.bfloat16
    assert all(d[:2] == ("bf16", "bf16") for d in dot_dtypes(f.lower(xb, wb).as_text()))
    g = np.cos(ref)
    np.testing.assert_allclose(np.asarray(dw, np.float64), np.asarray(xb, np.float64).T @ g,
                               rtol=3e-2, atol=3e-2)
