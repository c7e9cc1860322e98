"""The loss curve must not move when the implementation is optimised.

Training starts from seeded *canonical* weights (independent of this package's parameter layout,
see tfm_jax.tools.export) on a fixed synthetic byte corpus, so the same curve can be recomputed after
any layout or kernel change and compared with:

* the golden losses in tests/unit/train/data/golden_losses.json, recorded from the first (unoptimised)
  implementation: ``python tests/unit/train/test_loss_regression.py`` rewrites them -- only do that when the
  *math* changes on purpose, never to make an optimisation pass;
* the PyTorch peer trained from the same weights on the same batches (an independent reference).
"""

import json
import pathlib
import sys

import jax
import numpy as np
import pytest

from tfm_jax import data as data_lib
from tfm_jax.config import load_config
from tfm_jax.tools.export import import_canonical, random_canonical
from tfm_jax.train import build

GOLDEN = pathlib.Path(__file__).with_name("data") / "golden_losses.json"
STEPS = 6
BASE = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
        "model.ffn_hidden=96", "model.vocab_size=256", "data.tokenizer=none", "data.seq_len=64",
        "train.batch_size=4", "train.lr=3e-3", "train.warmup_steps=0", "train.min_lr_ratio=1.0",
        "train.weight_decay=0.1", "train.grad_clip=1.0", "mesh.data=1"]
VARIANTS = {"plain": [], "scan": ["model.scan_layers=true"], "accum2": ["train.grad_accum=2"],
            "remat": ["model.remat=full"], "remat_dots": ["model.remat=dots"],
            # several query blocks (the golden curve was recorded with the masked path)
            "blocks16": ["model.attn_block_q=16"], "masked": ["model.attn_block_q=0"],
            # one device picks the native CPU kernels when they build (backend.cpu_kernels=auto);
            # the XLA-only path must reproduce the same curve
            "xla_kernels": ["backend.cpu_kernels=xla"],
            "xla_kernels_blocks16": ["backend.cpu_kernels=xla", "model.attn_block_q=16"],
            # the native kernels on each maintained BLAS (skipped where one is not installed)
            "native_openblas": ["backend.cpu_blas=openblas"],
            "native_openblas_blocks16": ["backend.cpu_blas=openblas", "model.attn_block_q=16"],
            "native_mkl": ["backend.cpu_blas=mkl"]}


def corpus_tokens() -> np.ndarray:
    text = "".join(f"def f{i}(x, y={i % 7}):\n    return x * y + {i % 11}\n\n"
                   for i in range(400))
    return np.frombuffer(text.encode(), np.uint8).astype(np.uint16)


def batches(cfg):
    toks = corpus_tokens()
    return [data_lib.train_batch(toks, np.array([0]), step=s, seed=0,
                                 batch_size=cfg.train.batch_size, seq_len=cfg.data.seq_len)
            for s in range(STEPS)]


def tfm_losses(extra, devices) -> list[float]:
    cfg = load_config(None, BASE + extra)
    setup = build(cfg, devices=devices[:1])
    params = import_canonical(random_canonical(cfg.model, seed=0), cfg.model,
                              scanned=cfg.model.scan_layers)
    state = setup.init_state()
    state = state.replace(params=jax.device_put(params, setup.state_shardings.params))
    losses = []
    with setup.context():
        for b in batches(cfg):
            state, m = setup.train_step(state, setup.shard_batch(b))
            losses.append(float(m["loss"]))
    return losses


def _restore_blas():
    """The BLAS the native kernels use now, and a function that puts it back (a run with
    backend.cpu_blas=<name> switches it process-wide)."""
    try:
        from tfm_jax.platform.kernels import cpu
    except ImportError:
        return lambda: None
    prev = cpu.active_blas()
    return lambda: prev is not None and cpu.use_blas(prev)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_losses_match_golden(variant, devices):
    golden = json.loads(GOLDEN.read_text())["losses"]
    blas = [o.split("=")[1] for o in VARIANTS[variant] if o.startswith("backend.cpu_blas=")]
    if blas:
        from tfm_jax.platform.kernels import cpu
        ok, why = cpu.available(blas[0])
        if not ok:
            pytest.skip(f"native kernels on {blas[0]} unavailable here: {why}")
    restore = _restore_blas()
    try:
        got = tfm_losses(VARIANTS[variant], devices)
    finally:
        restore()
    np.testing.assert_allclose(got, golden, rtol=2e-5, atol=0)
    assert golden[-1] < golden[0] - 0.5        # the curve actually moves


def test_losses_match_torch_peer(devices):
    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[3]))
    from benchmarks.torch_peer import TorchLM, load_numpy_weights

    extra = ["train.grad_clip=0"]
    cfg = load_config(None, BASE + extra)
    m = cfg.model
    w = random_canonical(m, seed=0)
    model = TorchLM(m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads,
                    m.resolved_head_dim, m.resolved_ffn_hidden, m.rope_theta, m.norm_eps)
    load_numpy_weights(model, w)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    t = cfg.train
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=t.lr, betas=(t.b1, t.b2), eps=t.eps)
    ref = []
    for b in batches(cfg):
        _, loss = model(torch.from_numpy(b["inputs"]).long(), torch.from_numpy(b["targets"]).long())
        opt.zero_grad()
        loss.backward()
        opt.step()
        ref.append(float(loss.detach()))
    np.testing.assert_allclose(tfm_losses(extra, devices), ref, rtol=1e-4)


if __name__ == "__main__":
    import os
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    losses = tfm_losses([], jax.devices())
    GOLDEN.write_text(json.dumps({"config": BASE, "steps": STEPS, "losses": losses}, indent=1))
    print(GOLDEN, losses)
