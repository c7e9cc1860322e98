"""MHA -> GQA/MQA conversion (tfm_jax.tools.convert, ``tfm-jax convert``): mean-pooling against a
numpy loop, identity at N = n_heads, a real converted checkpoint (scanned layers: leading layers
axis) that evaluates and resumes training."""


import numpy as np
import pytest

from tfm_jax.tools.convert import convert_params, mean_pool_kv_heads


def _pool_loop(kernel, n):
    """Reference: new head j = mean of old heads j*r .. j*r + r - 1 (head axis -2)."""
    h = kernel.shape[-2]
    r = h // n
    out = np.zeros(kernel.shape[:-2] + (n, kernel.shape[-1]))
    for j in range(n):
        for i in range(j * r, (j + 1) * r):
            out[..., j, :] += kernel[..., i, :].astype(np.float64)
        out[..., j, :] /= r
    return out


@pytest.mark.parametrize("shape", [(6, 8, 5), (3, 6, 8, 5)])   # (d, H, Dh), scanned (L, d, H, Dh)
@pytest.mark.parametrize("n", [8, 4, 2, 1])
def test_mean_pool_against_loop(shape, n):
    k = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    got = mean_pool_kv_heads(k, n)
    assert got.dtype == np.float32 and got.shape == shape[:-2] + (n, shape[-1])
    np.testing.assert_allclose(got, _pool_loop(k, n), rtol=1e-6, atol=1e-7)
    if n == 8:
        np.testing.assert_array_equal(got, k)            # N == H: identity, bitwise


def test_mean_pool_matches_query_groups():
    """Query head h reads old K/V head h // G_old and new head h // G_new: the new head is the
    mean over the old heads whose query groups it takes over."""
    h, old, new = 8, 4, 2
    k = np.arange(old, dtype=np.float64).reshape(1, old, 1) * np.ones((1, old, 3))
    pooled = mean_pool_kv_heads(k, new)
    for q in range(h):
        j = q // (h // new)
        members = [i for i in range(old) if i // (old // new) == j]
        assert q // (h // old) in members
        assert pooled[0, j, 0] == np.mean(members)


def test_bad_head_counts():
    with pytest.raises(ValueError, match="cannot pool 4 K/V heads into 3.*1, 2, 4"):
        mean_pool_kv_heads(np.zeros((2, 4, 2)), 3)


def test_convert_params_tree():
    rng = np.random.default_rng(1)
    tree = {"layers_0": {"attn": {n: {"kernel": rng.normal(size=(4, 4, 2))}
                                  for n in ("q_proj", "k_proj", "v_proj")},
                         "attn_norm": {"scale": np.ones(4)}}}
    out = convert_params(tree, 2)
    assert out["layers_0"]["attn"]["q_proj"]["kernel"] is tree["layers_0"]["attn"]["q_proj"][
        "kernel"]
    for n in ("k_proj", "v_proj"):
        np.testing.assert_allclose(out["layers_0"]["attn"][n]["kernel"],
                                   _pool_loop(tree["layers_0"]["attn"][n]["kernel"], 2))
    tree["layers_0"]["attn"]["k_proj"]["kernel_scale"] = np.ones(1)
    with pytest.raises(ValueError, match="no rule to pool layers_0/attn/k_proj/kernel_scale"):
        convert_params(tree, 2)
