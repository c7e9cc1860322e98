"""Hugging Face checkpoints without torch or transformers: the config.json mapping and its
refusals, the llama3 RoPE frequency rule against a numpy formula, the streaming safetensors
reader on files written with safetensors.numpy here, the export tensors, the q/k/v bias layer
and the CLI's one-line errors."""

import json
import math

import numpy as np
import pytest

from tfm_jax.config import ConfigError, load_config
from tfm_jax.core.errors import CheckpointMismatch, DataError
from tfm_jax.hf import mapping

safetensors_numpy = pytest.importorskip("safetensors.numpy")

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 40,
         "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu",
         "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
         "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
         "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False}
QWEN2 = {**{k: v for k, v in LLAMA.items() if k not in ("rope_scaling", "attention_bias",
                                                          "mlp_bias")},
         "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
         "tie_word_embeddings": True, "use_sliding_window": False, "sliding_window": 32,
         "rope_theta": 10000.0}


# ----------------------------------------------------------------------------- config.json


def test_llama3_mapping():
    o = mapping.model_overrides(LLAMA)
    assert (o["model.d_model"], o["model.n_layers"], o["model.n_heads"], o["model.n_kv_heads"],
            o["model.ffn_hidden"], o["model.vocab_size"]) == (16, 2, 4, 2, 24, 40)
    assert o["model.head_dim"] is None and o["model.norm_eps"] == 1e-5
    assert o["model.rope_theta"] == 500000.0 and not o["model.qkv_bias"]
    assert o["model.rope_scaling"] == {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 16}
    assert o["data.seq_len"] == 64
    # transformers 5 writes rope_parameters (theta inside) instead of rope_theta/rope_scaling
    v5 = {k: v for k, v in LLAMA.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {**LLAMA["rope_scaling"], "rope_theta": 500000.0}
    assert mapping.model_overrides(v5) == o


def test_qwen2_and_mistral_mapping():
    o = mapping.model_overrides(QWEN2)
    assert o["model.qkv_bias"] and o["model.tie_embeddings"] and o["model.rope_scaling"] is None
    mistral = {**LLAMA, "architectures": ["MistralForCausalLM"], "model_type": "mistral",
               "sliding_window": None, "rope_scaling": None, "head_dim": 8}
    o = mapping.model_overrides(mistral)
    assert o["model.head_dim"] == 8 and not o["model.qkv_bias"]


@pytest.mark.parametrize("change, field", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type='yarn'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"mlp_bias": True}, "mlp_bias=True"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "architectures="),
    ({"architectures": ["MistralForCausalLM"], "sliding_window": 4096}, "sliding_window=4096"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types="),
    ({"num_hidden_layers": None}, "num_hidden_layers"),
])
def test_unsupported_fields_are_named(change, field):
    with pytest.raises(ConfigError) as err:
        mapping.model_overrides({**LLAMA, **change})
    msg = str(err.value)
    assert field in msg and "\n" not in msg


def test_qwen2_sliding_window_refused():
    with pytest.raises(ConfigError, match="use_sliding_window=True"):
        mapping.model_overrides({**QWEN2, "use_sliding_window": True})


def test_export_refusals_name_the_setting():
    base = load_config(None, [])
    for over, key in [({"model.norm": "layernorm"}, "model.norm=layernorm"),
                      ({"model.norm_position": "post"}, "model.norm_position=post"),
                      ({"model.ffn_type": "gelu"}, "model.ffn_type=gelu")]:
        with pytest.raises(ConfigError, match=key):
            mapping.check_exportable(base.replace(**over).model)
    moe = base.replace(**{"moe.n_experts": 4})
    with pytest.raises(ConfigError, match="moe.n_experts=4"):
        mapping.check_exportable(moe.model, moe.quant, moe.moe)


def test_hf_config_round_trips_through_the_mapping():
    none = {"data.tokenizer": "none"}
    cfg = load_config(None, []).replace(**mapping.model_overrides(LLAMA), **none)
    back = mapping.hf_config(cfg.model, seq_len=64, dtype="float32")
    assert mapping.model_overrides(back) == mapping.model_overrides(LLAMA)
    qcfg = load_config(None, []).replace(**mapping.model_overrides(QWEN2), **none)
    q = mapping.hf_config(qcfg.model, seq_len=64, dtype="bfloat16")
    assert q["architectures"] == ["Qwen2ForCausalLM"] and q["tie_word_embeddings"]
    assert mapping.model_overrides(q)["model.qkv_bias"]


# ----------------------------------------------------------------------------- llama3 rope


def test_llama3_frequencies_against_a_numpy_formula():
    from tfm_jax.config.schema import RopeScaling
    from tfm_jax.layers.rope import inv_frequencies

    dim, theta = 128, 500000.0
    rule = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=8192)
    got = inv_frequencies(dim, theta, rule)
    want = []
    for i in range(dim // 2):     # Llama 3.1's rule, one frequency at a time
        f = 1.0 / theta ** (2 * i / dim)
        wavelen = 2 * math.pi / f
        if wavelen < 8192 / 4.0:
            want.append(f)
        elif wavelen > 8192 / 1.0:
            want.append(f / 8.0)
        else:
            s = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            want.append((1 - s) * f / 8.0 + s * f)
    np.testing.assert_allclose(got, np.array(want), rtol=2e-6)
    assert (got < inv_frequencies(dim, theta)).any()        # the rule changes some
    np.testing.assert_array_equal(got[:8], inv_frequencies(dim, theta)[:8])  # high kept


def test_default_rope_tables_unchanged():
    import jax.numpy as jnp

    from tfm_jax.layers.rope import rope_tables

    pos = jnp.arange(12, dtype=jnp.int32)[None]
    inv = 10000.0 ** (-jnp.arange(0, 16, 2, dtype=jnp.float32) / 16)
    ang = pos.astype(jnp.float32)[..., None] * inv
    want = jnp.stack([jnp.sin(ang), jnp.cos(ang)])[:, :, :, None, :]
    np.testing.assert_array_equal(np.asarray(rope_tables(pos, 16, 10000.0)), np.asarray(want))


# ----------------------------------------------------------------------------- tensors


def _hf_tensors(cfg_json, rng, dtype=np.float32):
    """Random HF-named tensors for ``cfg_json`` (independent of tfm_jax.hf's table)."""
    d, f, v = cfg_json["hidden_size"], cfg_json["intermediate_size"], cfg_json["vocab_size"]
    h, hkv = cfg_json["num_attention_heads"], cfg_json["num_key_value_heads"]
    dh = d // h
    bias = cfg_json["model_type"] == "qwen2"
    t = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not cfg_json["tie_word_embeddings"]:
        t["lm_head.weight"] = (v, d)
    for i in range(cfg_json["num_hidden_layers"]):
        n = f"model.layers.{i}."
        t.update({n + "input_layernorm.weight": (d,), n + "post_attention_layernorm.weight": (d,),
                  n + "self_attn.q_proj.weight": (h * dh, d),
                  n + "self_attn.k_proj.weight": (hkv * dh, d),
                  n + "self_attn.v_proj.weight": (hkv * dh, d),
                  n + "self_attn.o_proj.weight": (d, h * dh),
                  n + "mlp.gate_proj.weight": (f, d), n + "mlp.up_proj.weight": (f, d),
                  n + "mlp.down_proj.weight": (d, f)})
        if bias:
            t.update({n + "self_attn.q_proj.bias": (h * dh,),
                      n + "self_attn.k_proj.bias": (hkv * dh,),
                      n + "self_attn.v_proj.bias": (hkv * dh,)})
    return {k: rng.standard_normal(s).astype(dtype) for k, s in t.items()}


def _folder(tmp_path, cfg_json, tensors, shards=1):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(cfg_json))
    names = sorted(tensors)
    if shards == 1:
        safetensors_numpy.save_file(tensors, str(tmp_path / "model.safetensors"),
                                    metadata={"format": "pt"})
        return tmp_path
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in names[s::shards]}
        safetensors_numpy.save_file(part, str(tmp_path / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": weight_map}))
    return tmp_path


@pytest.mark.parametrize("cfg_json, shards", [(LLAMA, 1), (QWEN2, 3)], ids=["llama", "qwen2"])
def test_streaming_reader_places_every_tensor(tmp_path, cfg_json, shards):
    import jax

    from tfm_jax.hf import config_from_hf, read_params
    from tfm_jax.hf.checkpoint import hf_tensors
    from tfm_jax.model import TransformerLM

    t = _hf_tensors(cfg_json, np.random.default_rng(0))
    src = _folder(tmp_path / "m", cfg_json, t, shards)
    cfg = config_from_hf(src)
    params = read_params(src, cfg)
    # the tree is exactly the model's (names, shapes, dtypes), biases included
    shapes = jax.eval_shape(lambda: TransformerLM(cfg.model).init(
        jax.random.key(0), np.zeros((1, 4), np.int32), train=False))["params"]
    from flax import linen as nn
    want = jax.tree.map(lambda s: (s.shape, np.dtype(s.dtype)), nn.meta.unbox(shapes))
    assert jax.tree.map(lambda a: (a.shape, a.dtype), params) == want
    # element by element against the HF layout: q row h*Dh+j is head h, dim j
    lp, n, dh = params["layers_1"], "model.layers.1.", 4
    q = t[n + "self_attn.q_proj.weight"]
    for h, j, c in [(0, 0, 0), (3, 1, 5), (2, 3, 15)]:
        assert lp["attn"]["q_proj"]["kernel"][c, h, j] == q[h * dh + j, c]
    o = t[n + "self_attn.o_proj.weight"]
    assert lp["attn"]["o_proj"]["kernel"][1, 2, 7] == o[7, 1 * dh + 2]
    np.testing.assert_array_equal(lp["ffn"]["wo"]["kernel"], t[n + "mlp.down_proj.weight"].T)
    if cfg.model.qkv_bias:
        np.testing.assert_array_equal(lp["attn"]["k_bias"]["bias"].reshape(-1),
                                      t[n + "self_attn.k_proj.bias"])
    # export gives the same tensors back, bit for bit
    back = dict(hf_tensors(params, cfg, "float32"))
    assert sorted(back) == sorted(t)
    for k in t:
        np.testing.assert_array_equal(back[k], t[k])
    # a scanned run's tree (layers stacked on a leading axis) exports the same tensors
    n_layers = cfg.model.n_layers
    stacked = {k: v for k, v in params.items() if not k.startswith("layers_")}
    stacked["layers"] = jax.tree.map(lambda *xs: np.stack(xs),
                                     *[params[f"layers_{i}"] for i in range(n_layers)])
    scanned = cfg.replace(**{"model.scan_layers": True})
    for k, a in hf_tensors(stacked, scanned, "float32"):
        np.testing.assert_array_equal(a, t[k])


def test_bf16_tensors_load_and_raw_reader_agrees(tmp_path):
    import ml_dtypes

    from tfm_jax.hf import SafetensorsFolder, config_from_hf, read_params
    from tfm_jax.hf.checkpoint import _raw_tensor

    t = _hf_tensors(LLAMA, np.random.default_rng(1), ml_dtypes.bfloat16)
    src = _folder(tmp_path / "bf16", LLAMA, t)
    name = "model.layers.0.self_attn.q_proj.weight"
    raw = _raw_tensor(src / "model.safetensors", name)
    assert raw.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(raw.view(np.uint16), t[name].view(np.uint16))
    np.testing.assert_array_equal(SafetensorsFolder(src).get(name).view(np.uint16),
                                  t[name].view(np.uint16))
    p = read_params(src, config_from_hf(src))
    assert p["layers_0"]["attn"]["q_proj"]["kernel"].dtype == np.float32
    np.testing.assert_array_equal(p["embed"]["embedding"],
                                  t["model.embed_tokens.weight"].astype(np.float32))
    pb = read_params(src, config_from_hf(src, param_dtype="bfloat16"))
    assert pb["embed"]["embedding"].dtype == ml_dtypes.bfloat16


def test_missing_and_misshaped_tensors_are_named(tmp_path):
    from tfm_jax.hf import read_hf

    t = _hf_tensors(LLAMA, np.random.default_rng(2))
    gone = dict(t)
    del gone["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(CheckpointMismatch, match=r"model.layers.1.mlp.up_proj.weight is "
                       r"missing \(expected shape \(24, 16\)"):
        read_hf(_folder(tmp_path / "a", LLAMA, gone))
    bad = dict(t, **{"model.layers.0.self_attn.k_proj.weight": np.zeros((4, 16), np.float32)})
    with pytest.raises(CheckpointMismatch, match=r"k_proj.weight has shape \(4, 16\), "
                       r"config.json implies \(8, 16\)"):
        read_hf(_folder(tmp_path / "b", LLAMA, bad))
    extra = dict(t, **{"model.layers.0.self_attn.o_proj.bias": np.zeros(16, np.float32)})
    with pytest.raises(CheckpointMismatch, match="o_proj.bias has no place"):
        read_hf(_folder(tmp_path / "c", LLAMA, extra))


def test_not_a_model_folder(tmp_path):
    from tfm_jax.hf import read_hf

    with pytest.raises(DataError, match="not a Hugging Face model folder"):
        read_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    with pytest.raises(DataError, match="no model.safetensors"):
        read_hf(tmp_path)


# ----------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize("case", ["not-a-model", "yarn", "missing", "misshaped"])
def test_import_hf_cli_bad_input_one_line(tmp_path, capsys, case):
    from tfm_jax import cli

    t = _hf_tensors(LLAMA, np.random.default_rng(3))
    src = tmp_path / "src"
    if case == "not-a-model":
        src.mkdir()
        (src / "notes.txt").write_text("hello")
        want = "not a Hugging Face model folder"
    elif case == "yarn":
        _folder(src, {**LLAMA, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, t)
        want = "rope_scaling.rope_type='yarn'"
    elif case == "missing":
        _folder(src, LLAMA, {k: v for k, v in t.items() if k != "model.norm.weight"})
        want = "model.norm.weight is missing (expected shape (16,)"
    else:
        _folder(src, LLAMA, dict(t, **{"model.embed_tokens.weight":
                                       np.zeros((41, 16), np.float32)}))
        want = "model.embed_tokens.weight has shape (41, 16), config.json implies (40, 16)"
    assert cli.main(["import-hf", str(src), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tfm-jax: error: ") and want in err and "\n" not in err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- model features


def test_qkv_bias_parameters_and_counts():
    import jax
    from flax import linen as nn

    from tfm_jax.core.roles import param_role
    from tfm_jax.model import TransformerLM, count_params

    cfg = load_config(None, ["model.qkv_bias=true", "model.n_layers=1"])
    v = jax.eval_shape(lambda: TransformerLM(cfg.model).init(
        jax.random.key(0), np.zeros((1, 4), np.int32), train=False))
    p = nn.meta.unbox(v["params"])
    attn = p["layers_0"]["attn"]
    assert attn["q_bias"]["bias"].shape == (cfg.model.n_heads, cfg.model.resolved_head_dim)
    assert attn["k_bias"]["bias"].shape == (cfg.model.n_kv_heads, cfg.model.resolved_head_dim)
    assert param_role(("layers_0", "attn", "k_bias", "bias")) == "bias"
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(p))
    assert count_params(cfg.model)["total"] == n


def test_init_from_names_the_mismatching_field(tmp_path):
    from tfm_jax.train.init_from import check_compatible

    src = load_config(None, [f"run.dir={tmp_path / 'a'}"])
    check_compatible(src.replace(**{"run.dir": str(tmp_path / "b"), "train.lr": 1e-4}), src,
                     tmp_path / "a")
    with pytest.raises(ConfigError, match=r"model.n_kv_heads=1 but the source run has 2"):
        check_compatible(src.replace(**{"model.n_kv_heads": 1, "run.dir": str(tmp_path / "b")}),
                         src, tmp_path / "a")
    with pytest.raises(ConfigError, match="run.dir is the source run"):
        check_compatible(src, src, tmp_path / "a")


def test_biased_attention_with_llama3_rope_against_numpy():
    """Attention with q/k/v biases and llama3 RoPE frequencies vs a float64 numpy attention
    (rotate-half RoPE, causal softmax, contiguous K/V groups)."""
    import jax
    import jax.numpy as jnp

    from tfm_jax.config.schema import RopeScaling
    from tfm_jax.layers.attention import Attention

    b, t, d, h, hkv, dh = 2, 12, 16, 4, 2, 8
    rule = RopeScaling(factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=4)
    attn = Attention(h, hkv, dh, rope_theta=1000.0, qkv_bias=True, rope_scaling=rule,
                     block_q=t)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, t, d)).astype(np.float32)
    pos = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    from flax import linen as nn
    shapes = jax.eval_shape(attn.init, jax.random.key(0), x, pos, None)
    p = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32) * 0.5,
                     nn.meta.unbox(shapes))
    got = np.asarray(jax.jit(lambda p, x, pos: attn.apply(p, x, pos, None))(p, x, pos))

    w = {k: np.asarray(v, np.float64) for k, v in
         {"q": p["params"]["q_proj"]["kernel"], "k": p["params"]["k_proj"]["kernel"],
          "v": p["params"]["v_proj"]["kernel"], "o": p["params"]["o_proj"]["kernel"],
          "bq": p["params"]["q_bias"]["bias"], "bk": p["params"]["k_bias"]["bias"],
          "bv": p["params"]["v_bias"]["bias"]}.items()}
    xd = x.astype(np.float64)
    q = np.einsum("btd,dhe->bthe", xd, w["q"]) + w["bq"]
    k = np.einsum("btd,dhe->bthe", xd, w["k"]) + w["bk"]
    v = np.einsum("btd,dhe->bthe", xd, w["v"]) + w["bv"]
    inv = []
    for i in range(dh // 2):                      # llama3 rule, written out per frequency
        f = 1000.0 ** (-2 * i / dh)
        wl = 2 * np.pi / f
        s = (4 / wl - 1.0) / (4.0 - 1.0)
        inv.append(f if wl < 4 / 4.0 else f / 4.0 if wl > 4 / 1.0 else (1 - s) * f / 4 + s * f)
    ang = np.arange(t)[:, None] * np.array(inv)[None]           # (T, Dh/2)
    cos, sin = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]

    def rot(z):
        z1, z2 = z[..., :dh // 2], z[..., dh // 2:]
        return np.concatenate([z1 * cos - z2 * sin, z2 * cos + z1 * sin], -1)

    q, k = rot(q), rot(k)
    k, v = np.repeat(k, h // hkv, axis=2), np.repeat(v, h // hkv, axis=2)
    s = np.einsum("bqhe,bkhe->bhqk", q, k) / np.sqrt(dh)
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = np.einsum("bhqk,bkhe->bqhe", a, v)
    want = np.einsum("bqhe,hed->bqd", o, w["o"])
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
