"""Component probes (tfm_jax.ablate.probes) and the padded-batch option of the data
(data.random_truncate): every numeric helper against a direct numpy formula, the recomputed
attention weights against the library's attention, the measurements on a tiny untrained model
(consistency checks that can fail), and -- marked slow -- the probes through the ablation
runner end to end."""

import math
import pathlib
import types

import numpy as np
import pytest

from tfm_jax import data as data_lib
from tfm_jax.ablate import probes
from tfm_jax.ablate.measurements import MEASUREMENTS, RunContext
from tfm_jax.config import ConfigError, load_config

RNG = np.random.default_rng(0)


# ----------------------------------------------------------------------------- pure numerics


def test_fractions():
    pre = np.array([[1.0, -1.0, 0.0], [2.0, -3.0, -0.5]])
    assert probes.nonpositive_fraction(pre) == pytest.approx(4 / 6)
    assert probes.dead_fraction(pre) == pytest.approx(2 / 3)      # columns 1 and 2 never > 0


def test_effective_rank_reference():
    x = RNG.normal(size=(64, 8))
    s = np.linalg.svd(x, compute_uv=False)
    p = s / s.sum()
    assert probes.effective_rank(x) == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    # rank one -> 1; orthonormal columns -> D
    assert probes.effective_rank(np.outer(RNG.normal(size=32), RNG.normal(size=5))) == \
        pytest.approx(1.0, abs=1e-6)
    q, _ = np.linalg.qr(RNG.normal(size=(32, 6)))
    assert probes.effective_rank(q) == pytest.approx(6.0)
    assert probes.energy_rank(q, 0.99) == 6
    assert probes.energy_rank(np.diag([10.0, 1.0, 0.01]), 0.99) == 1
    assert probes.effective_rank(np.zeros((3, 3))) == 0.0


def test_attention_probs_match_library_attention():
    import jax.numpy as jnp

    from tfm_jax.layers.attention_ops.dense import grouped_attention
    b, t, h, hkv, dh = 2, 7, 4, 2, 8
    q, k, v = (RNG.normal(size=(b, t, n, dh)).astype(np.float32) for n in (h, hkv, hkv))
    valid = np.ones((b, t), bool)
    valid[1, 5:] = False
    p = probes.causal_attention_probs(q, k, valid)                       # (B, H, T, T)
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-12)
    assert np.all(np.triu(p[0, 0], 1) == 0) and np.all(p[1, :, :, 5:] == 0)
    mask = np.tril(np.ones((t, t), bool))[None] & valid[:, None, :]
    ref = np.asarray(grouped_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                       jnp.asarray(mask)))
    out = np.einsum("bhqk,bkhd->bqhd", p, np.repeat(v, h // hkv, axis=2))
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_entropy_and_similarity_reference():
    p = RNG.random((2, 3, 5, 5))
    p /= p.sum(-1, keepdims=True)
    ent = probes.attention_entropy(p)
    ref = np.array([np.mean([-(p[b, h, i] * np.log(p[b, h, i])).sum()
                             for b in range(2) for i in range(5)]) for h in range(3)])
    np.testing.assert_allclose(ent, ref, rtol=1e-12)
    rows = np.zeros((2, 5), bool)
    rows[0, 2] = True
    np.testing.assert_allclose(probes.attention_entropy(p, rows),
                               -(p[0, :, 2] * np.log(p[0, :, 2])).sum(-1), rtol=1e-12)
    # uniform causal rows: entropy log(i + 1)
    u = np.tril(np.ones((4, 4)))
    u = (u / u.sum(-1, keepdims=True))[None, None]
    assert probes.attention_entropy(u)[0] == pytest.approx(np.mean(np.log([1, 2, 3, 4])))
    sim = probes.head_similarity(p)
    a, c = p[:, 0].ravel(), p[:, 2].ravel()
    assert sim[0, 2] == pytest.approx(a @ c / np.linalg.norm(a) / np.linalg.norm(c))
    np.testing.assert_allclose(np.diag(sim), 1.0)
    same = np.repeat(p[:, :1], 3, axis=1)
    assert probes.mean_off_diagonal(probes.head_similarity(same)) == pytest.approx(1.0)
    m = np.arange(9.0).reshape(3, 3)
    assert probes.mean_off_diagonal(m) == pytest.approx((1 + 2 + 3 + 5 + 6 + 7) / 6)
    assert math.isnan(probes.mean_off_diagonal(np.ones((1, 1))))


def test_per_layer_norms_unscanned_and_scanned():
    g = {("layers_0", "ffn", "wo", "kernel"): RNG.normal(size=(3, 2)),
         ("layers_1", "attn", "q_proj", "kernel"): RNG.normal(size=(4,)),
         ("layers_1", "ffn_norm", "scale"): RNG.normal(size=(2,)),
         ("embed", "embedding"): RNG.normal(size=(5, 2))}
    ref = [np.linalg.norm(g[("layers_0", "ffn", "wo", "kernel")]),
           np.sqrt(np.square(g[("layers_1", "attn", "q_proj", "kernel")]).sum()
                   + np.square(g[("layers_1", "ffn_norm", "scale")]).sum())]
    np.testing.assert_allclose(probes.per_layer_norms(g, 2), ref)
    stacked = {("layers", "ffn", "wo", "kernel"): np.stack([np.ones((3, 2)), 2 * np.ones((3, 2))])}
    np.testing.assert_allclose(probes.per_layer_norms(stacked, 2), [np.sqrt(6), np.sqrt(24)])
    with pytest.raises(ValueError, match="leading axis 2, expected n_layers=3"):
        probes.per_layer_norms(stacked, 3)
    assert probes.layer_of(("final_norm", "scale")) is None


def test_top_activating_and_agreement():
    acts = np.array([[0.1, 5.0], [0.9, 1.0], [0.5, 3.0], [0.0, 4.0]])
    np.testing.assert_array_equal(probes.top_activating(acts, 2), [[1, 2], [0, 3]])
    top_targets = np.array([[7, 7, 3], [1, 2, 2], [4, 5, 5]])
    assert probes.memory_agreement(top_targets, np.array([7, 1, 5])) == pytest.approx(2 / 3)


def test_show_bytes():
    toks = np.array([ord("a"), 10, ord("|"), data_lib.PAD_ID, 200])
    assert probes._show(toks) == "a\\n\\|<pad>\\xc8"


# ----------------------------------------------------------------------------- padded rows


def test_random_truncate_rows():
    tokens = np.arange(1000, dtype=np.uint16) % 250
    full = data_lib.train_batch(tokens, np.array([0]), step=3, seed=1, batch_size=64, seq_len=16)
    cut = data_lib.train_batch(tokens, np.array([0]), step=3, seed=1, batch_size=64, seq_len=16,
                               random_truncate=0.75)
    lengths = cut["mask"].sum(1)
    assert lengths.min() >= 4 and lengths.max() <= 16 and len(set(lengths)) > 3
    for r in range(64):
        n = int(lengths[r])
        assert np.all(cut["mask"][r, :n] == 1) and np.all(cut["mask"][r, n:] == 0)
        # same windows as without truncation; PAD after the last real target
        np.testing.assert_array_equal(cut["targets"][r, :n], full["targets"][r, :n])
        np.testing.assert_array_equal(cut["inputs"][r, :n + 1], full["inputs"][r, :n + 1])
        assert np.all(cut["targets"][r, n:] == data_lib.PAD_ID)
        assert np.all(cut["inputs"][r, n + 1:] == data_lib.PAD_ID)
    # rows of a process slice are the same rows
    part = data_lib.train_batch(tokens, np.array([0]), step=3, seed=1, batch_size=64, seq_len=16,
                                random_truncate=0.75, rows=slice(8, 16))
    np.testing.assert_array_equal(part["mask"], cut["mask"][8:16])
    with pytest.raises(data_lib.DataError, match="random_truncate=1.0 must be in"):
        data_lib.train_batch(tokens, np.array([0]), step=0, seed=0, batch_size=2, seq_len=8,
                             random_truncate=1.0)


def test_random_truncate_config():
    assert load_config(None, ["data.random_truncate=0.5"]).data.random_truncate == 0.5
    with pytest.raises(ConfigError, match="data.packing=true"):
        load_config(None, ["data.random_truncate=0.5", "data.packing=false"])


# ----------------------------------------------------------------------------- measurements


def _ctx(tmp_path, devices, **model):
    """A RunContext over an untrained tiny model and a synthetic corpus (no training)."""
    from tfm_jax.train import build
    overrides = [f"model.{k}={v}" for k, v in {"d_model": 32, "n_layers": 2, "n_heads": 4,
                                                 "n_kv_heads": 2, **model}.items()]
    cfg = load_config(None, overrides + ["data.seq_len=16", "train.batch_size=4"])
    setup = build(cfg, devices[:1])
    state = setup.init_state()
    toks = np.random.default_rng(1).integers(0, 256, 4000).astype(np.uint16)
    corpus = types.SimpleNamespace(val=toks, val_doc_starts=np.array([0]))
    return RunContext(cfg=cfg, run_dir=pathlib.Path(tmp_path), variant="v", seed=0,
                      cache={"restored": (setup, state), "corpus": corpus})


def test_bn_eval_layernorm_is_batch_independent(tmp_path, devices):
    ctx = _ctx(tmp_path, devices, norm="layernorm")
    ctx.options = {"batches": 1, "batch_size": 3, "truncate": 0.5}
    out = MEASUREMENTS["bn_eval"](ctx)
    for k in ("bn_loss_batch_masked", "bn_loss_batch_unmasked", "bn_loss_b1"):
        assert out[k] == pytest.approx(out["bn_loss_running"], rel=1e-5)
    assert 0 < out["pad_fraction"] < 0.5


@pytest.mark.slow
def test_bn_eval_batchnorm_modes_differ(tmp_path, devices):
    ctx = _ctx(tmp_path, devices, norm="batchnorm", init_std=0.5)
    ctx.options = {"batches": 1, "batch_size": 3, "truncate": 0.5}
    out = MEASUREMENTS["bn_eval"](ctx)
    # fresh running statistics (mean 0, var 1) are not the batch's; padding moves the stats
    assert abs(out["bn_loss_running"] - out["bn_loss_batch_masked"]) > 1e-4
    assert abs(out["bn_loss_batch_unmasked"] - out["bn_loss_batch_masked"]) > 1e-5
    assert abs(out["bn_loss_b1"] - out["bn_loss_batch_masked"]) > 1e-5


@pytest.mark.parametrize("kind", ["relu", pytest.param("swiglu", marks=pytest.mark.slow)])
def test_ffn_parts_consistent_with_params(tmp_path, devices, kind):
    """The captured hidden activation times wo is the captured FFN output, for ReLU and SwiGLU,
    and the ReLU zero share equals the share of non-positive pre-activations."""
    from flax import linen as nn
    from flax import traverse_util
    ctx = _ctx(tmp_path, devices, ffn_type=kind, ffn_hidden=24, init_std=0.2)
    batches = probes.probe_batches(ctx, 1, 2)
    parts = probes._ffn_parts(ctx, batches)
    params = traverse_util.flatten_dict(nn.meta.unbox(ctx.restore()[1].params), sep="/")
    for i, p in enumerate(parts):
        wo = np.asarray(params[f"layers_{i}/ffn/wo/kernel"])
        np.testing.assert_allclose(p["act"] @ wo, p["out"], rtol=1e-4, atol=1e-5)
        assert p["act"].shape == (32, 24) and p["inp"].shape == (32, 32)
    ctx.options = {"batches": 1, "batch_size": 2}
    out = MEASUREMENTS["ffn_activity"](ctx)
    if kind == "relu":
        assert out["ffn_zero_fraction"] == pytest.approx(out["ffn_nonpositive_fraction"])
    else:
        assert out["ffn_zero_fraction"] < 0.01
    assert 1 <= out["ffn_erank_hidden"] <= 24 and 1 <= out["ffn_erank_out"] <= 32


def test_head_diversity_and_memory_run(tmp_path, devices):
    ctx = _ctx(tmp_path, devices, ffn_type="relu", ffn_hidden=24)
    ctx.options = {"batches": 1, "batch_size": 2}
    out = MEASUREMENTS["head_diversity"](ctx)
    # near-uniform attention at init: entropy close to the uniform ceiling, heads alike
    assert out["attn_entropy"] <= out["attn_entropy_uniform"] + 1e-9
    assert out["attn_entropy"] > 0.9 * out["attn_entropy_uniform"]
    assert 0.9 < out["head_similarity"] <= 1 + 1e-9
    ctx.options = {"batches": 1, "batch_size": 2, "top": 3, "keys": 2}
    mem = MEASUREMENTS["ffn_memory"](ctx)
    assert 0 <= mem["ffn_memory_agreement"] <= 1
    text = (pathlib.Path(tmp_path) / "ffn_memory.md").read_text()
    assert text.count("\n| ") >= 3 and "->" in text


def test_probe_refuses_scanned_layers(tmp_path):
    # the checks come before any model is built
    cfg = load_config(None, ["model.scan_layers=true"])
    ctx = RunContext(cfg=cfg, run_dir=pathlib.Path(tmp_path), variant="v", seed=0)
    with pytest.raises(ValueError, match="needs model.scan_layers=false"):
        MEASUREMENTS["head_diversity"](ctx)
    ctx.options = {"bogus": 1}
    with pytest.raises(ValueError, match="unknown option"):
        MEASUREMENTS["ffn_activity"](ctx)


@pytest.mark.parametrize("scan", ["true", pytest.param("false", marks=pytest.mark.slow)])
def test_grad_norms_per_layer(tmp_path, devices, scan):
    ctx = _ctx(tmp_path, devices, scan_layers=scan)
    ctx.options = {"batches": 1, "batch_size": 2}
    out = MEASUREMENTS["grad_norms"](ctx)
    rows = out["grad_norms"].rows
    assert [r["layer"] for r in rows] == [0, 1]
    assert all(r["grad_norm_init"] > 0 for r in rows)
    # untrained: the "final" state is the initial one
    assert rows[0]["grad_norm_final"] == pytest.approx(rows[0]["grad_norm_init"], rel=1e-5)


@pytest.mark.slow
def test_probes_through_the_runner(tmp_path, text_corpus):
    """The studies' measurements through `tfm-jax ablate` on a few-step experiment."""
    import jax
    import yaml

    from tfm_jax.ablate.runner import run_experiment
    from tfm_jax.ablate.spec import load_experiment
    raw = {"name": "probes", "base": "tiny", "out_dir": str(tmp_path / "out"),
           "overrides": {"model": {"d_model": 32, "n_layers": 2, "n_heads": 4},
                         "data": {"seq_len": 32, "random_truncate": 0.5,
                                  "path": str(text_corpus)},
                         "train": {"batch_size": 8, "steps": 4, "warmup_steps": 1,
                                   "log_every": 2, "eval_every": 4, "checkpoint_every": 4,
                                   "eval_batches": 1, "sample_tokens": 0},
                         "run": {"tensorboard": False, "progress": False}},
           "variants": {"ln": {"model": {"norm": "layernorm", "ffn_type": "relu"}},
                        "bn": {"model": {"norm": "batchnorm", "norm_position": "post"}}},
           "seeds": [0],
           "measurements": [{"name": "bn_eval", "batches": 1, "batch_size": 4},
                            {"name": "grad_norms", "batches": 1},
                            {"name": "ffn_activity", "batches": 1, "batch_size": 4},
                            {"name": "ffn_memory", "batches": 1, "batch_size": 4, "top": 3},
                            {"name": "head_diversity", "batches": 1, "batch_size": 2},
                            {"name": "divergence", "max_val_loss": "unigram"}],
           "claims": [{"claim": "LN batch-independent", "metric":
                       "bn_loss_b1[ln] - bn_loss_running[ln]", "expected": 0,
                       "check": "abs(measured) < 1e-4"}]}
    exp = load_experiment(tmp_path / "probes.yaml", yaml.safe_load(yaml.safe_dump(raw)))
    res = run_experiment(exp, devices=jax.devices()[:1], progress=False)
    assert not res.failed
    import json
    out = json.loads((tmp_path / "out" / "results.json").read_text())
    assert not out["warnings"], out["warnings"]
    assert out["claims"][0]["verdict"] == "holds"
    sc = out["aggregates"]["scalars"]
    assert {"ffn_zero_fraction", "head_similarity", "diverged"} <= set(sc["ln"])
    assert (tmp_path / "out" / "ln" / "seed0" / "ffn_memory.md").is_file()
