"""Self-checks for benchmarks/torch_peer.py against an independent numpy reference."""

import pathlib
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

# make `benchmarks` importable under plain `pytest` (no packaging / conftest needed)
_ROOT = str(pathlib.Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks import torch_peer  # noqa: E402
from benchmarks.torch_peer import (  # noqa: E402
    TorchLM,
    export_numpy_weights,
    load_numpy_weights,
    train_flops_per_token,
)

CFG = dict(vocab_size=32, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=4, ffn_hidden=24)
B, T = 2, 6
EPS, THETA = 1e-6, 10000.0


def random_weights(seed=0):
    """Canonical weights in "x @ W" layout, float64 for the reference."""
    rng = np.random.default_rng(seed)
    d, H, Hkv, Dh, F, V = (CFG[k] for k in ("d_model", "n_heads", "n_kv_heads", "head_dim", "ffn_hidden", "vocab_size"))
    w = {"embed": rng.normal(0, 1.0, (V, d))}
    for i in range(CFG["n_layers"]):
        p = f"layers.{i}."
        w[p + "attn_norm"] = 1.0 + 0.1 * rng.normal(size=d)
        w[p + "wq"] = rng.normal(0, 0.3, (d, H * Dh))
        w[p + "wk"] = rng.normal(0, 0.3, (d, Hkv * Dh))
        w[p + "wv"] = rng.normal(0, 0.3, (d, Hkv * Dh))
        w[p + "wo"] = rng.normal(0, 0.3, (H * Dh, d))
        w[p + "ffn_norm"] = 1.0 + 0.1 * rng.normal(size=d)
        w[p + "w_gate"] = rng.normal(0, 0.3, (d, F))
        w[p + "w_up"] = rng.normal(0, 0.3, (d, F))
        w[p + "w_down"] = rng.normal(0, 0.3, (F, d))
    w["final_norm"] = 1.0 + 0.1 * rng.normal(size=d)
    w["lm_head"] = rng.normal(0, 0.3, (d, V))
    return {k: v.astype(np.float32) for k, v in w.items()}


# ---- plain numpy reference (float64) ---------------------------------------


def np_rmsnorm(x, scale):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS) * scale


def np_rope(x):
    # x: (B, T, nh, Dh)
    Dh = x.shape[-1]
    half = Dh // 2
    inv_freq = np.array([THETA ** (-2.0 * i / Dh) for i in range(half)])
    angle = np.arange(x.shape[1])[:, None] * inv_freq[None, :]  # (T, half)
    cos = np.cos(angle)[None, :, None, :]
    sin = np.sin(angle)[None, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def np_forward(w, tokens):
    H, Hkv, Dh = CFG["n_heads"], CFG["n_kv_heads"], CFG["head_dim"]
    w = {k: v.astype(np.float64) for k, v in w.items()}
    Bn, Tn = tokens.shape
    x = w["embed"][tokens]  # (B, T, d)
    mask = np.tril(np.ones((Tn, Tn), dtype=bool))
    for i in range(CFG["n_layers"]):
        p = f"layers.{i}."
        h = np_rmsnorm(x, w[p + "attn_norm"])
        q = np_rope((h @ w[p + "wq"]).reshape(Bn, Tn, H, Dh))
        k = np_rope((h @ w[p + "wk"]).reshape(Bn, Tn, Hkv, Dh))
        v = (h @ w[p + "wv"]).reshape(Bn, Tn, Hkv, Dh)
        # explicit GQA: query head h uses kv head h // (H // Hkv)
        kv_idx = [hh // (H // Hkv) for hh in range(H)]
        k = k[:, :, kv_idx, :]
        v = v[:, :, kv_idx, :]
        out = np.zeros((Bn, Tn, H, Dh))
        for b in range(Bn):
            for hh in range(H):
                s = q[b, :, hh, :] @ k[b, :, hh, :].T / np.sqrt(Dh)  # (T, T)
                s = np.where(mask, s, -np.inf)
                s = s - s.max(axis=-1, keepdims=True)
                pr = np.exp(s)
                pr = pr / pr.sum(axis=-1, keepdims=True)
                out[b, :, hh, :] = pr @ v[b, :, hh, :]
        x = x + out.reshape(Bn, Tn, H * Dh) @ w[p + "wo"]
        h = np_rmsnorm(x, w[p + "ffn_norm"])
        g = h @ w[p + "w_gate"]
        silu = g / (1.0 + np.exp(-g))
        x = x + (silu * (h @ w[p + "w_up"])) @ w[p + "w_down"]
    x = np_rmsnorm(x, w["final_norm"])
    return x @ w["lm_head"]  # (B, T, V)


def _tokens():
    return np.random.default_rng(1).integers(0, CFG["vocab_size"], (B, T))


@pytest.mark.parametrize("sdpa_gqa", [True, False])
def test_forward_matches_numpy(monkeypatch, sdpa_gqa):
    if sdpa_gqa and not torch_peer._sdpa_supports_gqa():
        pytest.skip("this torch has no enable_gqa")
    monkeypatch.setattr(torch_peer, "USE_SDPA_GQA", sdpa_gqa)
    w = random_weights()
    tokens = _tokens()
    model = load_numpy_weights(TorchLM(**CFG), w).eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(tokens)).numpy()
    ref = np_forward(w, tokens)
    assert logits.shape == (B, T, CFG["vocab_size"])
    np.testing.assert_allclose(logits, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sdpa_gqa", [True, False])
def test_kv_decoder_matches_numpy_forward(monkeypatch, sdpa_gqa):
    """Prefill 3 tokens, then decode the rest one at a time: every step's logits equal the
    numpy full forward's logits at that position (the decode benchmark's peer)."""
    if sdpa_gqa and not torch_peer._sdpa_supports_gqa():
        pytest.skip("this torch has no enable_gqa")
    monkeypatch.setattr(torch_peer, "USE_SDPA_GQA", sdpa_gqa)
    w = random_weights()
    tokens = _tokens()
    ref = np_forward(w, tokens)                                  # (B, T, V)
    dec = torch_peer.TorchKVDecoder(load_numpy_weights(TorchLM(**CFG), w).eval(), B, T)
    got = [dec.prefill(torch.from_numpy(tokens[:, :3])).numpy()]
    for t in range(3, T):
        got.append(dec.step(torch.from_numpy(tokens[:, t])).numpy())
    np.testing.assert_allclose(np.stack(got, 1), ref[:, 2:], atol=1e-5, rtol=1e-5)
    assert dec.length == T
    with pytest.raises(ValueError, match="cache is full"):
        dec.step(torch.from_numpy(tokens[:, 0]))


def test_loss_is_mean_cross_entropy():
    w = random_weights()
    tokens = _tokens()
    targets = np.random.default_rng(2).integers(0, CFG["vocab_size"], (B, T))
    model = load_numpy_weights(TorchLM(**CFG), w)
    with torch.no_grad():
        _, loss = model(torch.from_numpy(tokens), torch.from_numpy(targets))
    ref = np_forward(w, tokens)
    ref = ref - ref.max(-1, keepdims=True)
    logp = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
    ref_loss = -np.take_along_axis(logp, targets[..., None], -1).mean()
    assert abs(loss.item() - ref_loss) < 1e-5


def test_export_load_round_trip():
    torch.manual_seed(0)
    m1 = TorchLM(**CFG)
    w = export_numpy_weights(m1)
    assert w["layers.0.wq"].shape == (16, 16)
    assert w["layers.0.wk"].shape == (16, 8)
    assert w["layers.1.w_down"].shape == (24, 16)
    assert w["lm_head"].shape == (16, 32)
    assert w["embed"].shape == (32, 16)
    m2 = load_numpy_weights(TorchLM(**CFG), w)
    for (k1, p1), (k2, p2) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert k1 == k2 and torch.equal(p1, p2)
    w2 = export_numpy_weights(m2)
    assert set(w2) == set(w)
    for k in w:
        np.testing.assert_array_equal(w[k], w2[k])
    # canonical layout: x @ W  ==  nn.Linear(x)
    x = torch.randn(3, 16)
    np.testing.assert_allclose(
        x.numpy() @ w["layers.0.wq"], m1.layers[0].attn.wq(x).detach().numpy(), atol=1e-6
    )


def test_load_errors():
    w = random_weights()
    model = TorchLM(**CFG)
    bad = dict(w)
    del bad["layers.1.wv"]
    with pytest.raises(KeyError, match="layers.1.wv"):
        load_numpy_weights(model, bad)
    bad = dict(w)
    bad["layers.0.w_down"] = bad["layers.0.w_down"].T  # (d, F) instead of (F, d)
    with pytest.raises(ValueError, match="layers.0.w_down"):
        load_numpy_weights(model, bad)
    bad = dict(w)
    bad["layers.2.wq"] = w["layers.0.wq"]
    with pytest.raises(ValueError, match="unexpected"):
        load_numpy_weights(model, bad)


def test_train_flops_per_token_hand_computed():
    # V=10, d=4, L=1, H=2, Hkv=1, Dh=2, F=8, T=3
    # per layer: qkv 4*(2+2)*2=32, wo 2*2*4=16, ffn 3*4*8=96 -> 144; lm_head 4*10=40
    # 6 * 184 = 1104; attention 12 * L * T * H * Dh = 12*1*3*2*2 = 144
    assert train_flops_per_token(10, 4, 1, 2, 1, 2, 8, 3) == 1248.0


def test_bench_smoke():
    res = torch_peer.bench_torch_train(CFG, batch_size=2, seq_len=8, steps=2, warmup=1, threads=1)
    assert set(res) >= {"tokens_per_s", "step_ms", "step_ms_all", "n_params", "threads"}
    assert res["tokens_per_s"] > 0 and len(res["step_ms_all"]) == 2 and res["threads"] == 1
