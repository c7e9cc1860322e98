"""The Pallas paged-attention decode kernel (tfm_jax.layers.attention_ops.paged) against the
gather path: run through Pallas' interpreter on CPU it equals the gathered pages + the XLA
cached attention for MHA / GQA / MQA and ragged lengths; a scheduler whose model uses it
produces the same greedy tokens as decoding alone; lowered for CUDA, each layer of the decode
step becomes one Triton kernel (the op a GPU run gets); on a GPU (marker ``gpu``) the compiled
kernel equals the gather path."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from serve_support import cfg_of, model_and_vars
from tfm_jax.config import ConfigError, load_config
from tfm_jax.layers import paged_cache as pc
from tfm_jax.layers.attention_ops import dense, paged
from tfm_jax.layers.ops import xla_ops
from tfm_jax.model import TransformerLM
from tfm_jax.platform import backends
from tfm_jax.serve import SamplingParams, Scheduler

needs_kernel = pytest.mark.skipif(paged.unavailable() is not None,
                                  reason=str(paged.unavailable()))


def _pools(hkv, d, page, num_pages, pages_per_seq, lengths, seed=0):
    r = np.random.default_rng(seed)
    b = len(lengths)
    layer = pc.init_pages(n_layers=1, num_pages=num_pages, page_size=page, n_kv_heads=hkv,
                          head_dim=d)[0]
    table = r.permutation(np.arange(1, num_pages))[:b * pages_per_seq].reshape(b, pages_per_seq)
    for i, n in enumerate(lengths):                     # pages past a row's length: scratch
        table[i, -(-n // page):] = pc.SCRATCH_PAGE
    layer = layer.replace(block_table=jnp.asarray(table, jnp.int32))
    s = pages_per_seq * page
    k = r.normal(size=(b, s, hkv, d)).astype(np.float32)
    v = r.normal(size=(b, s, hkv, d)).astype(np.float32)
    return pc.write(layer, k, v)


@pytest.mark.parametrize("h,hkv", [(4, 4), (8, 2), (4, 1)])
@pytest.mark.parametrize("page,pages_per_seq", [(4, 6), (8, 4)])
@needs_kernel
def test_interpreted_kernel_equals_the_gather_path(h, hkv, page, pages_per_seq):
    d, lengths = 16, [1, 7, page * pages_per_seq]
    layer = _pools(hkv, d, page, 3 * pages_per_seq + 2, pages_per_seq, lengths)
    q = jnp.asarray(np.random.default_rng(1).normal(size=(3, 1, h, d)), jnp.float32)
    pos = jnp.asarray([[n - 1] for n in lengths], jnp.int32)
    got = paged.pallas_paged_attention(q, layer, pos, interpret=True)
    view = pc.gather(layer)
    want = dense.cached_attention(q, view.k, view.v, pos)
    assert got.shape == want.shape == (3, 1, h, d)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)


def test_shapes_the_compiled_kernel_cannot_take_fall_back_to_gather():
    assert paged.unsupported(64, 16) is None and paged.unsupported(128, 32) is None
    assert "head_dim 40" in paged.unsupported(40, 16)
    assert "page_size 8" in paged.unsupported(64, 8)
    layer = _pools(2, 8, 4, 12, 5, [3, 9])                    # head_dim 8: not for Triton
    q = jnp.zeros((2, 1, 4, 8), jnp.float32)
    pos = jnp.asarray([[2], [8]], jnp.int32)
    assert paged.pallas_paged_attention(q, layer, pos) is None
    if paged.unavailable() is None:
        assert paged.pallas_paged_attention(q, layer, pos, interpret=True) is not None


def test_backend_setting_picks_the_kernel():
    cpu = jax.devices()[:1]
    auto = backends.resolve_ops(load_config(None, []), cpu)
    assert auto.paged_attention is None                       # auto: gather off a GPU
    pallas = load_config(None, ["backend.paged_attention=pallas"])
    why = paged.unavailable()
    if why is None:
        forced = backends.resolve_ops(pallas, cpu)
        assert forced.paged_attention is paged.kernel(True)   # interpreted on CPU
        assert "paged decode: Pallas kernel (interpreted)" in forced.describe()
    else:                          # a jax without the kernel: one line naming why
        with pytest.raises(ConfigError, match="backend.paged_attention=pallas: jax .* does not"):
            backends.resolve_ops(pallas, cpu)


@needs_kernel
def test_scheduler_with_the_kernel_decodes_like_the_gather_path():
    model, variables = model_and_vars(cfg_of(2, scan_layers=True))
    kernel_model = TransformerLM(model.cfg, ops=dataclasses.replace(
        xla_ops(), paged_attention=paged.kernel(True)))
    r = np.random.default_rng(3)
    prompts = [list(r.integers(1, 64, n)) for n in (3, 9, 5)]
    outs = []
    for m in (model, kernel_model):
        sched = Scheduler(m, variables, slots=3, num_pages=13, page_size=4, chunk=4, max_len=24)
        reqs = [sched.submit(p, SamplingParams(max_tokens=6 + i)) for i, p in enumerate(prompts)]
        sched.run()
        outs.append([q.output for q in reqs])
    assert outs[0] == outs[1] and all(len(o) == 6 + i for i, o in enumerate(outs[0]))


def _decode_step_for_cuda(cfg_model):
    ops = dataclasses.replace(xla_ops(), paged_attention=paged.kernel(False))
    model = TransformerLM(cfg_model, ops=ops)
    sched_like = Scheduler(model, {}, slots=2, num_pages=9, page_size=16, chunk=4, max_len=64)
    variables = jax.eval_shape(lambda: model_and_vars(cfg_model)[1])
    layers = jax.eval_shape(lambda: sched_like.layers)
    table = jax.ShapeDtypeStruct((2, 4), jnp.int32)
    lengths = jax.ShapeDtypeStruct((2,), jnp.int32)
    tokens = jax.ShapeDtypeStruct((2, 1), jnp.int32)
    exp = jax.export.export(
        jax.jit(sched_like._decode_fn), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])
    try:
        return exp(variables, layers, table, lengths, tokens).mlir_module()
    except RuntimeError as err:        # jax 0.12 asks a GPU for its compute capability
        if "No supported GPU devices found" not in str(err):
            raise
        pytest.skip(f"jax {jax.__version__} lowers a Triton kernel only with a GPU present")


@pytest.mark.parametrize("scan", [False, True])
@needs_kernel
def test_decode_step_lowered_for_cuda_runs_the_triton_kernel(scan):
    cfg = cfg_of(2, scan_layers=scan, d_model=64)        # head_dim 16: shapes Triton takes
    text = _decode_step_for_cuda(cfg)
    # one Triton kernel per layer (scanned: one in the loop body)
    calls = re.findall(r"custom_call @([\w$.]+)", text)
    assert calls.count("__gpu$xla.gpu.triton") == (1 if scan else cfg.n_layers), calls
    assert "tfm_paged_decode" in text
    # no gathered copy of the pools (Hkv 2, 9 pages of 16, head_dim 16): the gathers left
    # read the embedding and the block table
    operands = re.findall(r"stablehlo\.gather.*?: \((tensor<[^>]+>)", text)
    assert operands and not [t for t in operands if "2x9x16x16" in t], operands


@pytest.mark.gpu
@pytest.mark.parametrize("h,hkv", [(8, 8), (8, 2), (8, 1)])
@needs_kernel
def test_compiled_kernel_on_a_gpu_equals_the_gather_path(h, hkv):
    d, page, pps, lengths = 64, 16, 8, [1, 100, 128]
    layer = _pools(hkv, d, page, 3 * pps + 2, pps, lengths)
    q = jnp.asarray(np.random.default_rng(1).normal(size=(3, 1, h, d)), jnp.float32)
    pos = jnp.asarray([[n - 1] for n in lengths], jnp.int32)
    got = jax.jit(paged.pallas_paged_attention)(q, layer, pos)
    view = pc.gather(layer)
    with jax.default_matmul_precision("highest"):
        want = dense.cached_attention(q, view.k, view.v, pos)
    # the kernel's dots may run in TF32 on the GPU: a tolerance for 10-bit mantissas
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-2, atol=2e-2)
