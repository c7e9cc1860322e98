"""Paged KV cache: writes and gathers against a numpy reference (scattered pages, scratch page),
and the model's prefill + decode through pages equal to the contiguous cache and to the full
forward (MHA / GQA / MQA, scanned and unscanned, chunked prefill, int8 / fp8 pages)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from serve_support import HEADS, V, cfg_of, model_and_vars
from tfm_jax.layers import kv_cache as kv
from tfm_jax.layers import paged_cache as pc
from tfm_jax.model import DTYPES

PAGE = 4
PAGES_PER_SEQ = 4            # 16 positions per row
NUM_PAGES = 12               # page 0 scratch + 11 usable


def scattered_table(batch, seed=0):
    """Each row owns PAGES_PER_SEQ distinct pages drawn in shuffled, non-adjacent order."""
    perm = np.random.default_rng(seed).permutation(np.arange(1, NUM_PAGES))
    return perm[:batch * PAGES_PER_SEQ].reshape(batch, PAGES_PER_SEQ).astype(np.int32)


def test_write_then_gather_matches_numpy():
    r = np.random.default_rng(0)
    table = scattered_table(2)
    table[1, 3] = pc.SCRATCH_PAGE                    # row 1 owns only 3 pages
    layer = pc.init_pages(n_layers=1, num_pages=NUM_PAGES, page_size=PAGE, n_kv_heads=2,
                          head_dim=3)[0]
    layer = layer.replace(block_table=jnp.asarray(table))
    ref = np.zeros((2, PAGES_PER_SEQ * PAGE, 2, 3), np.float32)
    k1 = r.normal(size=(2, 5, 2, 3)).astype(np.float32)
    layer = pc.write(layer, k1, k1 * 2)              # prefill: positions 0..4
    ref[:, :5] = k1
    start = np.array([5, 7], np.int32)
    k2 = r.normal(size=(2, 3, 2, 3)).astype(np.float32)
    layer = pc.write(layer, k2, k2 * 2, jnp.asarray(start))   # 5..7 and 7..9
    for b in range(2):
        ref[b, start[b]:start[b] + 3] = k2[b]
    got = pc.gather(layer)
    np.testing.assert_array_equal(np.asarray(got.k)[0, :8], ref[0, :8])
    np.testing.assert_array_equal(np.asarray(got.k)[1, :10], ref[1, :10])
    np.testing.assert_array_equal(np.asarray(got.v)[1, :10], 2 * ref[1, :10])
    # the values sit in the pages the table names, slot p % PAGE (pools are head-major)
    np.testing.assert_array_equal(np.asarray(layer.k)[:, table[1, 2], 1], ref[1, 9])
    # a position past the table (row 1, position 14 -> its 4th page: scratch) stays out of
    # every owned page
    layer2 = pc.write(layer, np.full((2, 1, 2, 3), 7.0, np.float32),
                      np.full((2, 1, 2, 3), 7.0, np.float32), jnp.asarray([8, 14], jnp.int32))
    owned = np.asarray(layer2.k)[:, table[1, :3]]
    np.testing.assert_array_equal(owned, np.asarray(layer.k)[:, table[1, :3]])
    # writing past the whole table never clamps onto the last page
    layer3 = pc.write(layer, np.full((2, 2, 2, 3), 9.0, np.float32),
                      np.full((2, 2, 2, 3), 9.0, np.float32), jnp.asarray([15, 15], jnp.int32))
    np.testing.assert_array_equal(np.asarray(layer3.k)[:, table[0, 3], 3], 9.0)   # position 15
    np.testing.assert_array_equal(np.asarray(layer3.k)[:, table[0, 3], :3],
                                  np.asarray(layer.k)[:, table[0, 3], :3])


def _run(model, variables, layers, tokens, lengths, steps, chunk=None):
    """Prefill (whole padded prompt, or from 0 in decode-mode chunks of ``chunk``), then feed
    the true next tokens; logits at every step (steps + 1, B, V)."""
    b = tokens.shape[0]
    p = int(lengths.max())
    apply = jax.jit(model.apply, static_argnames=("decode",))
    cache = kv.Cache(layers, jnp.zeros((b,), jnp.int32))
    if chunk is None:
        mask = np.arange(p)[None, :] < lengths[:, None]
        logits, cache = apply(variables, jnp.asarray(np.where(mask, tokens[:, :p], 0)),
                              token_mask=jnp.asarray(mask), cache=cache)
        last = np.asarray(logits)[np.arange(b), lengths - 1]
    else:                         # equal lengths only: every row takes the same chunks
        assert (lengths == p).all()
        for s in range(0, p, chunk):
            logits, cache = apply(variables, jnp.asarray(tokens[:, s:s + chunk]), cache=cache,
                                  decode=True)
        last = np.asarray(logits)[:, -1]
    outs = [last]
    for s in range(steps):
        logits, cache = apply(variables, jnp.asarray(tokens[np.arange(b), lengths + s])[:, None],
                              cache=cache, decode=True)
        outs.append(np.asarray(logits)[:, 0])
    return np.stack(outs), cache


def _paged_layers(cfg, batch, table, kv_cache="none"):
    layers = pc.init_pages(n_layers=cfg.n_layers, num_pages=NUM_PAGES, page_size=PAGE,
                           n_kv_heads=cfg.n_kv_heads, head_dim=cfg.resolved_head_dim,
                           dtype=DTYPES[cfg.dtype], kv_cache=kv_cache, stacked=cfg.scan_layers)
    return pc.with_block_table(layers, jnp.asarray(table))


# one case in the default suite (each compiles 5 functions, ~3 s); the rest with -m slow
GRID = [pytest.param(h, s, id=f"{h}-{'scanned' if s else 'unscanned'}",
                     marks=() if (h, s) == ("gqa", True) else pytest.mark.slow)
        for h in HEADS for s in (False, True)]


@pytest.mark.parametrize("heads,scan", GRID)
def test_paged_decoding_equals_contiguous_and_full_forward(heads, scan):
    cfg = cfg_of(HEADS[heads], scan_layers=scan)
    model, variables = model_and_vars(cfg)
    lengths = np.array([5, 9], np.int32)
    steps = 5
    tokens = np.random.default_rng(1).integers(0, V, (2, 16)).astype(np.int32)
    got, cache = _run(model, variables, _paged_layers(cfg, 2, scattered_table(2)), tokens,
                      lengths, steps)
    contiguous = model.init_cache(2, PAGES_PER_SEQ * PAGE).layers
    want, _ = _run(model, variables, contiguous, tokens, lengths, steps)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    full = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(tokens)))
    ref = np.stack([full[np.arange(2), lengths - 1 + s] for s in range(steps + 1)])
    assert np.abs(ref).max() > 1.0
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(cache.lengths), lengths + steps)


def test_chunked_prefill_through_pages_equals_full_forward():
    cfg = cfg_of(2, scan_layers=True)
    model, variables = model_and_vars(cfg)
    tokens = np.random.default_rng(2).integers(0, V, (2, 16)).astype(np.int32)
    lengths = np.array([9, 9], np.int32)
    got, _ = _run(model, variables, _paged_layers(cfg, 2, scattered_table(2, seed=3)), tokens,
                  lengths, 3, chunk=3)
    full = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(tokens)))
    ref = np.stack([full[:, 8 + s] for s in range(4)])
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_bf16_pages_equal_the_bf16_contiguous_cache():
    cfg = cfg_of(2, scan_layers=True, dtype="bfloat16")
    model, variables = model_and_vars(cfg)
    lengths = np.array([5, 9], np.int32)
    tokens = np.random.default_rng(6).integers(0, V, (2, 16)).astype(np.int32)
    layers = _paged_layers(cfg, 2, scattered_table(2, seed=7))
    assert layers.k.dtype == jnp.bfloat16
    got, _ = _run(model, variables, layers, tokens, lengths, 4)
    want, _ = _run(model, variables, model.init_cache(2, PAGES_PER_SEQ * PAGE).layers, tokens,
                   lengths, 4)
    # the same bf16 values stored and read: only the gather differs
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", [pytest.param("int8", marks=pytest.mark.slow),   # both run in
                                 pytest.param("fp8", marks=pytest.mark.slow)])   # integration
def test_quantized_pages_equal_the_quantized_contiguous_cache(fmt):
    cfg = cfg_of(2, scan_layers=True)
    model, variables = model_and_vars(cfg)
    lengths = np.array([5, 9], np.int32)
    tokens = np.random.default_rng(4).integers(0, V, (2, 16)).astype(np.int32)
    layers = _paged_layers(cfg, 2, scattered_table(2, seed=5), kv_cache=fmt)
    assert layers.k.dtype == kv.QUANT_DTYPES[fmt]
    got, cache = _run(model, variables, layers, tokens, lengths, 4)
    contiguous = model.init_cache(2, PAGES_PER_SEQ * PAGE, kv_cache=fmt).layers
    want, _ = _run(model, variables, contiguous, tokens, lengths, 4)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert pc.bytes_of_pages(cache.layers) == NUM_PAGES * pc.bytes_per_page(
        n_layers=2, page_size=PAGE, n_kv_heads=2, head_dim=8, itemsize=1, kv_cache=fmt)
