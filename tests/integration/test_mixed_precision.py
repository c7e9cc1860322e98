"""Mixed precision end to end: one train step with bf16 parameters in each policy, cross-checked
against the others bit for bit; short runs of the small model in each policy against float32;
every shipped config (llama3-8b shrunk) trains from the command line; no float32 GEMM operand in
a bf16 step lowered with the GPU op set, in every structure, remat policy and attention core."""

import collections
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from tfm_jax.config import load_config
from tfm_jax.tools.inspect import dot_dtypes, lower_step
from tfm_jax.train import build
from train_support import SMALL, small_cfg

ROOT = pathlib.Path(__file__).resolve().parents[2]
ONE_LAYER = ["model.n_layers=1", "data.seq_len=16", "train.batch_size=4", "train.warmup_steps=0"]

def _one_step(tmp_path, *extra):
    cfg = small_cfg(tmp_path, *ONE_LAYER, "model.dtype=bfloat16", "model.param_dtype=bfloat16",
                    *extra)
    setup = build(cfg, jax.devices()[:1])
    state = setup.init_state()
    rng = np.random.default_rng(0)
    toks = rng.integers(0, 256, (4, 17)).astype(np.int32)
    batch = setup.shard_batch({"inputs": toks[:, :-1], "targets": toks[:, 1:],
                               "mask": np.ones((4, 16), np.float32)})
    before = jax.device_get(state.params)        # (the step donates the state)
    with setup.context():
        new, m = setup.train_step(state, batch)
    assert bool(m["finite"])
    return before, new


def test_bf16_parameters_train_in_each_policy(tmp_path):
    s0, master = _one_step(tmp_path, "model.master_weights=float32")
    _, nearest = _one_step(tmp_path, "model.master_weights=none", "model.param_rounding=nearest")
    _, stoch = _one_step(tmp_path, "model.master_weights=none", "model.param_rounding=stochastic")
    leaves = lambda s: jax.tree.leaves(jax.device_get(getattr(s, "params", s)))   # noqa: E731
    assert {x.dtype for x in leaves(master)} == {jnp.dtype(jnp.bfloat16)}
    # master copy: float32, its cast is the parameters, and it moved
    m32 = jax.tree.leaves(jax.device_get(master.opt_state.master))
    assert {x.dtype for x in m32} == {jnp.dtype(jnp.float32)}
    for p, m in zip(leaves(master), m32):
        np.testing.assert_array_equal(p, m.astype(ml_dtypes.bfloat16))
    assert any(not np.array_equal(a, b) for a, b in zip(leaves(master), leaves(s0)))
    # moments in float32 (not the parameter dtype)
    moments = [x for x in jax.tree.leaves(jax.device_get(master.opt_state.inner))
               if getattr(x, "ndim", 0) >= 1]
    assert moments and {x.dtype for x in moments} == {jnp.dtype(jnp.float32)}
    # first step from the same bf16 start (the master copy starts equal to the parameters):
    # the cast of the master p + u is the nearest-even rounding of p + u, bit for bit
    for a, b in zip(leaves(master), leaves(nearest)):
        np.testing.assert_array_equal(a, b)
    # stochastic: within one bf16 ulp of the float32 value p + u, not always the nearest one
    same = total = 0
    for s, m in zip(leaves(stoch), m32):
        cast = m.astype(ml_dtypes.bfloat16)
        ulp = np.abs(np.nextafter(cast, np.inf).astype(np.float32) - cast.astype(np.float32))
        assert np.all(np.abs(s.astype(np.float32) - m) <= ulp)
        same += int(np.sum(s == cast))
        total += m.size
    assert 0.3 * total < same < total, (same, total)


# Final train loss of a short run of the small model (SMALL dims, 40 steps) within this many
# percent of float32's. Measured on the 2-core CPU VM: every policy within 0.5 % of f32 at
# 40 steps (the tiny model's 300-step figures are in docs/mixed-precision.md).
POLICY_TOLERANCE_PCT = 2.0


def test_policies_train_close_to_float32(tmp_path, text_corpus):
    from benchmarks import mixed_precision

    out = mixed_precision.main(["--steps", "40", "--policies",
                                "f32,bf16-compute,bf16-master,bf16-stochastic",
                                *SMALL, f"data.path={text_corpus}", "train.lr=3e-3"])
    res = out["results"]
    assert res["f32"]["train_loss"] < 4.5          # it learned (uniform over 264: 5.58)
    for name in ("bf16-compute", "bf16-master", "bf16-stochastic"):
        assert abs(res[name]["train_vs_f32_pct"]) < POLICY_TOLERANCE_PCT, (name, res)
        assert abs(res[name]["val_vs_f32_pct"]) < POLICY_TOLERANCE_PCT, (name, res)


SHRINK = ["model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2",
          "model.head_dim=16", "model.ffn_hidden=128", "data.seq_len=32", "train.batch_size=2",
          "train.steps=2", "train.warmup_steps=0", "train.eval_every=2", "train.eval_batches=1",
          "train.checkpoint_every=2", "train.sample_tokens=0", "run.progress=false",
          "run.tensorboard=false"]


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_shipped_config_trains(config, tmp_path, text_corpus):
    """Each config's own dtypes / remat / scan / MoE with shrunken dims: llama3-8b keeps its
    bf16 parameters (float32 master weights), its 128k vocabulary and full remat."""
    devices = 8 if config == "moe-tiny.yaml" else 1      # its mesh: expert 4 x data 2
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    extra = {"llama3-8b.yaml": ["model.loss_chunk=32"],
             "moe-tiny.yaml": ["train.batch_size=8"]}.get(config, [])
    proc = subprocess.run([sys.executable, "-m", "tfm_jax", "train", "--config", config,
                           *SHRINK, *extra, f"data.path={text_corpus}",
                           f"run.dir={tmp_path / 'run'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [r for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if r]
    assert rows and "nan" not in rows[-1].lower()


BF16 = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
        "model.multiple_of=16", "data.seq_len=32", "train.batch_size=2", "model.dtype=bfloat16",
        "model.attn_block_q=16"]
VARIANTS = {
    "plain": [], "scan": ["model.scan_layers=true"], "remat-full": ["model.remat=full"],
    "remat-dots-scan": ["model.remat=dots", "model.scan_layers=true"],
    "dense": ["backend.attention=dense"], "block": ["backend.attention=block"],
    "flash": ["backend.attention=flash"], "xla_sdpa": ["backend.attention=xla_sdpa"],
    "masked-path": ["model.attn_block_q=0"], "tied": ["model.tie_embeddings=true"],
    "bf16-params": ["model.param_dtype=bfloat16"], "grad-accum": ["train.grad_accum=2"],
    "chunked-loss": ["model.loss_chunk=16", "model.tie_embeddings=true"],
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_bf16_step_has_no_float32_gemm_operand(variant):
    """Lowered with the GPU op set on CPU (what XLA receives on a GPU): every dot of forward
    and backward takes bf16 operands (softmax, norms and the loss stay float32 elsewhere)."""
    dots = dot_dtypes(lower_step(load_config(None, BF16 + VARIANTS[variant]), "gpu"))
    assert len(dots) > 20
    bad = collections.Counter(d for d in dots if d[:2] != ("bf16", "bf16"))
    assert not bad, bad
