"""Packed documents (data.packing=segments): every attention core, and the model, give each
document exactly what a forward pass over that document alone gives (values and gradients);
the loss of a packed batch is the sum of the per-document losses."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tfm_jax.config import ModelConfig
from tfm_jax.data import packing
from tfm_jax.layers import ops as ops_lib
from tfm_jax.layers.attention_ops import block, dense, flash
from tfm_jax.model import TransformerLM
from tfm_jax.platform.xla_cpu import cpu_xla_ops
from tfm_jax.train.step import masked_ce_sum

# two rows of 12 positions: documents of lengths 5, 4, 3 / 2, 7 and 3 padding positions
LENGTHS = [[5, 4, 3], [2, 7]]
T = 12


def _segments() -> np.ndarray:
    seg = np.zeros((len(LENGTHS), T), np.int32)
    for r, lens in enumerate(LENGTHS):
        col = 0
        for s, n in enumerate(lens, start=1):
            seg[r, col:col + n] = s
            col += n
    return seg


def _spans():
    for r, lens in enumerate(LENGTHS):
        col = 0
        for n in lens:
            yield r, col, col + n
            col += n


def _native_core():
    from tfm_jax.platform.kernels import cpu
    ok, why = cpu.available()
    if not ok:
        pytest.skip(f"native kernels unavailable: {why}")
    return cpu.causal_attention


CORES = {
    "dense": lambda: dense.dense_causal_attention,
    "block": lambda: functools.partial(block.causal_attention, block_q=4),
    "flash": lambda: functools.partial(flash.flash_attention, block_q=4, block_k=4),
    "xla_sdpa": lambda: flash.xla_sdpa_attention,
    "native": _native_core,
}


@pytest.mark.parametrize("name", list(CORES))
def test_every_core_masks_across_documents(name):
    core = CORES[name]()
    r = np.random.default_rng(0)
    b, h, hkv, d = len(LENGTHS), 4, 2, 8
    q, k, v = (jnp.asarray(r.normal(size=(b, T, n, d)), jnp.float32) for n in (h, hkv, hkv))
    w = jnp.asarray(r.normal(size=(b, T, h, d)), jnp.float32)           # dO
    seg = jnp.asarray(_segments())
    valid = seg > 0

    def packed_loss(q, k, v):
        out = core(q, k, v, valid, segment_ids=seg)
        return jnp.sum(jnp.where(valid[..., None, None], out * w, 0.0)), out

    (_, out), grads = jax.jit(jax.value_and_grad(packed_loss, argnums=(0, 1, 2),
                                                 has_aux=True))(q, k, v)

    # reference: every document alone at the start of its own row (zeros after it, which a
    # causal core never shows to the document), the plain causal core, one batched call
    spans = list(_spans())

    def alone(x):
        out = np.zeros((len(spans), T) + x.shape[2:], np.float32)
        for i, (row, a, e) in enumerate(spans):
            out[i, :e - a] = np.asarray(x[row, a:e])
        return jnp.asarray(out)

    def doc_loss(q, k, v, w):
        out = dense.dense_causal_attention(q, k, v)
        return jnp.sum(out * w), out

    (_, ref), ref_g = jax.jit(jax.value_and_grad(doc_loss, argnums=(0, 1, 2), has_aux=True))(
        alone(q), alone(k), alone(v), alone(w))
    real = np.asarray(valid)
    for i, (row, a, e) in enumerate(spans):
        np.testing.assert_allclose(np.asarray(out[row, a:e]), np.asarray(ref[i, :e - a]),
                                   atol=2e-5, rtol=2e-5)
        for got, want in zip(grads, ref_g):
            np.testing.assert_allclose(np.asarray(got)[row, a:e], np.asarray(want)[i, :e - a],
                                       atol=2e-5, rtol=2e-5)
    assert real.sum() == sum(e - a for _, a, e in spans)


def _model_cfg(block_q: int) -> ModelConfig:
    return ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                       ffn_hidden=48, attn_block_q=block_q)


@pytest.fixture(scope="module")
def params():
    """One initialization for every model test here: the op sets and attn_block_q share the
    parameters (the model's init compile is the slow part)."""
    model = TransformerLM(_model_cfg(4), ops=ops_lib.xla_ops())
    return jax.jit(model.init)(jax.random.key(0), jnp.zeros((len(LENGTHS), T), jnp.int32))


@pytest.mark.parametrize("ops_name,block_q", [("xla", 4), ("cpu-xla", 4), ("xla", 0),
                                              ("native", 4)])
def test_model_packed_forward_equals_per_document_forwards(ops_name, block_q, params):
    ops = {"xla": ops_lib.xla_ops, "cpu-xla": cpu_xla_ops}.get(ops_name)
    if ops_name == "native":
        _native_core()
        from tfm_jax.platform.kernels import cpu
        ops = cpu.native_ops
    model = TransformerLM(_model_cfg(block_q), ops=ops())
    r = np.random.default_rng(1)
    tokens = jnp.asarray(r.integers(0, 64, size=(len(LENGTHS), T)), jnp.int32)
    seg = jnp.asarray(_segments())
    positions = jnp.asarray(np.concatenate(
        [np.concatenate([np.arange(n) for n in lens] + [np.arange(T - sum(lens))])[None]
         for lens in LENGTHS]), jnp.int32)
    packed = jax.jit(lambda p: model.apply(p, tokens, positions=positions, segment_ids=seg,
                                           token_mask=seg > 0))(params)
    spans = list(_spans())     # each document alone at the start of its own row, one call
    alone = np.zeros((len(spans), T), np.int32)
    for i, (row, a, e) in enumerate(spans):
        alone[i, :e - a] = np.asarray(tokens[row, a:e])
    ref = jax.jit(model.apply)(params, jnp.asarray(alone))
    for i, (row, a, e) in enumerate(spans):
        np.testing.assert_allclose(np.asarray(packed[row, a:e]), np.asarray(ref[i, :e - a]),
                                   atol=3e-5, rtol=3e-5)


def test_segment_batch_rows_are_whole_documents_and_the_loss_stays_inside_them():
    docs = [list(range(10 + i, 10 + i + n)) for i, n in enumerate([3, 9, 5, 2, 14, 6, 1, 4])]
    eos = 99
    stream = np.concatenate([d + [eos] for d in docs]).astype(np.uint16)
    starts = np.cumsum([0] + [len(d) + 1 for d in docs[:-1]])
    kw = dict(step=7, seed=3, batch_size=6, seq_len=12)
    b = packing.segment_batch(stream, starts, **kw)
    by_first = {d[0]: d for d in docs}
    for row in range(6):
        seg, pos = b["segment_ids"][row], b["positions"][row]
        assert np.all(np.diff(seg[seg > 0]) >= 0) and np.all(seg[b["mask"][row] == 0] == 0)
        for s in np.unique(seg[seg > 0]):
            cols = np.flatnonzero(seg == s)
            assert np.array_equal(pos[cols], np.arange(cols.size))      # positions restart
            inp, tgt = b["inputs"][row, cols], b["targets"][row, cols]
            doc = by_first[int(tgt[0])] + [eos]
            assert inp[0] == eos and list(tgt) == doc[:cols.size]       # targets: own document
            assert list(inp[1:]) == doc[:cols.size - 1]                 # inputs shifted by one
    again = packing.segment_batch(stream, starts, **kw)
    assert all(np.array_equal(b[k], again[k]) for k in b)               # pure in (seed, step)
    part = packing.segment_batch(stream, starts, rows=slice(2, 4), **kw)
    assert all(np.array_equal(b[k][2:4], part[k]) for k in b)


def test_packed_loss_is_the_sum_of_per_document_losses(params):
    model = TransformerLM(_model_cfg(4), ops=ops_lib.xla_ops())
    docs = [list(np.random.default_rng(i).integers(0, 60, size=n)) for i, n in
            enumerate([4, 6, 3, 8, 5])]
    eos = 63
    stream = np.concatenate([d + [eos] for d in docs]).astype(np.uint16)
    starts = np.cumsum([0] + [len(d) + 1 for d in docs[:-1]])
    b = packing.segment_batch(stream, starts, step=0, seed=0, batch_size=2, seq_len=T)
    logits = jax.jit(functools.partial(model.apply, positions=jnp.asarray(b["positions"]),
                                       segment_ids=jnp.asarray(b["segment_ids"]),
                                       token_mask=jnp.asarray(b["mask"]) > 0))(
        params, jnp.asarray(b["inputs"]))
    packed = float(masked_ce_sum(logits, jnp.asarray(b["targets"]), jnp.asarray(b["mask"])))
    inputs, targets, mask = [], [], []     # each document alone in its own row, one call
    for row in range(2):
        seg = b["segment_ids"][row]
        for s in np.unique(seg[seg > 0]):
            cols = np.flatnonzero(seg == s)
            pad = T - cols.size
            inputs.append(np.pad(b["inputs"][row, cols], (0, pad)))
            targets.append(np.pad(b["targets"][row, cols], (0, pad)))
            mask.append(np.pad(np.ones(cols.size, np.float32), (0, pad)))
    lg = jax.jit(model.apply)(params, jnp.asarray(np.stack(inputs)))
    alone = float(masked_ce_sum(lg, jnp.asarray(np.stack(targets)), jnp.asarray(np.stack(mask))))
    assert len(inputs) >= 3 and packed == pytest.approx(alone, rel=1e-5)


def test_cudnn_core_refuses_segments_with_one_line():
    from tfm_jax.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="data.packing=segments needs an attention core"):
        load_config(None, ["data.packing=segments", "backend.attention=cudnn",
                           "backend.platform=gpu", "model.dtype=bfloat16"])
    q = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match="cuDNN attention core takes no segment ids"):
        flash.sdpa_seq_lengths_attention(q, q, q, segment_ids=jnp.ones((1, 4), jnp.int32),
                                         implementation="xla")
