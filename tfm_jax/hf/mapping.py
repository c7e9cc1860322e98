"""Hugging Face ``config.json`` <-> ``model.*`` settings, and the tensor-name table (no jax).

The Llama family maps one to one onto this framework's pre-norm RMSNorm SwiGLU decoder:
``LlamaForCausalLM`` (Llama 2 and 3, with the llama3 RoPE rule), ``MistralForCausalLM`` without
a sliding window and ``Qwen2ForCausalLM`` (q/k/v biases, tied embeddings). Anything else is
refused with one line naming the ``config.json`` field. HF's q/k projections use the same
"rotate-half" RoPE layout as :mod:`tfm_jax.layers.rope`, so no row permutation is needed.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from tfm_jax.config import ConfigError

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                 "Qwen2ForCausalLM": "qwen2"}
# data.seq_len of an imported model: its max_position_embeddings, capped (a training row)
MAX_SEQ_LEN = 2048


def _refuse(field: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"config.json: {field}={value!r} is not supported ({why})")


def _rope(cfg: dict) -> tuple[float, Optional[dict]]:
    """(rope_theta, model.rope_scaling) from ``rope_theta``/``rope_scaling`` (transformers 4) or
    ``rope_parameters`` (transformers 5)."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling")
    field = "rope_scaling"
    if scaling is None and params:
        scaling, field = params, "rope_parameters"
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    if not scaling:
        return float(theta), None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind != "llama3":
        raise _refuse(f"{field}.rope_type", kind, "only the llama3 frequency rule is "
                      "implemented (model.rope_scaling)")
    try:
        rule = {"type": "llama3", "factor": float(scaling["factor"]),
                "low_freq_factor": float(scaling["low_freq_factor"]),
                "high_freq_factor": float(scaling["high_freq_factor"]),
                "original_max_position_embeddings":
                    int(scaling["original_max_position_embeddings"])}
    except KeyError as err:
        raise ConfigError(f"config.json: {field} of type llama3 lacks {err.args[0]!r}") from None
    return float(theta), rule


def model_overrides(cfg: dict) -> dict[str, Any]:
    """A HF ``config.json`` mapping -> ``{dotted key: value}`` of this framework's config
    (``model.*`` and ``data.seq_len``). Raises :class:`ConfigError` naming the field it cannot
    represent."""
    archs = cfg.get("architectures") or []
    arch = next((a for a in archs if a in ARCHITECTURES), None)
    family = ARCHITECTURES.get(arch) if arch else cfg.get("model_type")
    if family not in ARCHITECTURES.values():
        raise _refuse("architectures" if archs else "model_type", archs or cfg.get("model_type"),
                      "supported: " + ", ".join(ARCHITECTURES))
    act = cfg.get("hidden_act", cfg.get("hidden_activation", "silu"))
    if act != "silu":
        raise _refuse("hidden_act", act, "the FFN is SwiGLU: silu only")
    if cfg.get("mlp_bias"):
        raise _refuse("mlp_bias", cfg["mlp_bias"], "the FFN has no biases")
    if family != "qwen2" and cfg.get("attention_bias"):
        raise _refuse("attention_bias", cfg["attention_bias"], "the output projection has no "
                      "bias; only Qwen2's q/k/v biases are supported")
    if family == "mistral" and cfg.get("sliding_window") is not None:
        raise _refuse("sliding_window", cfg["sliding_window"], "sliding-window attention is "
                      "not implemented; only full attention (sliding_window null)")
    if family == "qwen2" and cfg.get("use_sliding_window"):
        raise _refuse("use_sliding_window", cfg["use_sliding_window"], "sliding-window "
                      "attention is not implemented")
    kinds = set(cfg.get("layer_types") or [])
    if kinds - {"full_attention"}:
        raise _refuse("layer_types", sorted(kinds), "only full_attention layers")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "vocab_size"):
        if not isinstance(cfg.get(key), int):
            raise ConfigError(f"config.json: {key} is missing or not an integer "
                              f"(got {cfg.get(key)!r})")
    theta, scaling = _rope(cfg)
    d, h = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim")
    out = {"model.vocab_size": cfg["vocab_size"], "model.d_model": d,
           "model.n_layers": cfg["num_hidden_layers"], "model.n_heads": h,
           "model.n_kv_heads": cfg.get("num_key_value_heads") or h,
           "model.head_dim": head_dim if head_dim and head_dim * h != d else None,
           "model.ffn_type": "swiglu", "model.ffn_hidden": cfg["intermediate_size"],
           "model.norm": "rmsnorm", "model.norm_position": "pre",
           "model.norm_eps": float(cfg.get("rms_norm_eps", 1e-6)),
           "model.rope_theta": theta, "model.rope_scaling": scaling,
           "model.qkv_bias": family == "qwen2",
           "model.tie_embeddings": bool(cfg.get("tie_word_embeddings", False)),
           "data.seq_len": min(int(cfg.get("max_position_embeddings", MAX_SEQ_LEN)),
                               MAX_SEQ_LEN)}
    return out


def hf_config(model: Any, *, seq_len: int, dtype: str, bos: Optional[int] = None,
              eos: Optional[int] = None, pad: Optional[int] = None) -> dict[str, Any]:
    """``config.json`` of a :class:`~tfm_jax.config.ModelConfig` (LlamaForCausalLM, or
    Qwen2ForCausalLM with ``qkv_bias``); :func:`check_exportable` first."""
    check_exportable(model)
    qwen = model.qkv_bias
    out: dict[str, Any] = {
        "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen else "llama",
        "vocab_size": model.vocab_size, "hidden_size": model.d_model,
        "intermediate_size": model.resolved_ffn_hidden,
        "num_hidden_layers": model.n_layers, "num_attention_heads": model.n_heads,
        "num_key_value_heads": model.n_kv_heads, "head_dim": model.resolved_head_dim,
        "hidden_act": "silu", "max_position_embeddings": seq_len,
        "rms_norm_eps": model.norm_eps, "rope_theta": model.rope_theta,
        "rope_scaling": (None if model.rope_scaling is None else
                         {"rope_type": "llama3", "factor": model.rope_scaling.factor,
                          "low_freq_factor": model.rope_scaling.low_freq_factor,
                          "high_freq_factor": model.rope_scaling.high_freq_factor,
                          "original_max_position_embeddings":
                              model.rope_scaling.original_max_position_embeddings}),
        "tie_word_embeddings": model.tie_embeddings, "attention_dropout": 0.0,
        "initializer_range": model.init_std, "use_cache": True, "torch_dtype": dtype,
    }
    if qwen:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=0)
    else:
        out.update(attention_bias=False, mlp_bias=False)
    out.update({k: v for k, v in (("bos_token_id", bos), ("eos_token_id", eos),
                                  ("pad_token_id", pad)) if v is not None})
    return out


def check_exportable(model: Any, quant: Any = None, moe: Any = None) -> None:
    """ConfigError naming the first setting a Llama/Qwen2 ``config.json`` cannot express."""
    bad = [("model.norm", model.norm, "rmsnorm"), ("model.norm_position", model.norm_position,
                                                    "pre"),
           ("model.ffn_type", model.ffn_type, "swiglu")]
    for key, value, want in bad:
        if value != want:
            raise ConfigError(f"export-hf: {key}={value} has no Hugging Face Llama/Qwen2 "
                              f"equivalent (needs {want})")
    if moe is not None and moe.n_experts:
        raise ConfigError(f"export-hf: moe.n_experts={moe.n_experts}: MoE layers have no "
                          "Llama/Qwen2 equivalent")
    if quant is not None and quant.fp8_weight_storage:
        raise ConfigError("export-hf: quant.fp8_weight_storage=true: FP8 kernels are not "
                          "exported; export a run with full-precision storage")
    if quant is not None and quant.recipe != "none":
        raise ConfigError(f"export-hf: quant.recipe={quant.recipe}: the run's quantization "
                          "state has no Hugging Face equivalent; export a quant.recipe=none run")


# -- tensors -----------------------------------------------------------------------------------
# (params path, HF name, HF shape -> tfm shape transform, tfm -> HF transform, HF shape)

def tensor_table(model: Any) -> list[tuple[tuple[str, ...], str, Callable, Callable, tuple]]:
    """Every parameter of an unscanned TransformerLM of ``model`` with its HF tensor: (path in
    the params tree, HF name, HF -> tfm-jax array function, the inverse, HF shape)."""
    d, h, hkv, dh = model.d_model, model.n_heads, model.n_kv_heads, model.resolved_head_dim
    f, v = model.resolved_ffn_hidden, model.vocab_size
    same = lambda a: a  # noqa: E731

    def lin(shape_tfm, n_in=1):   # HF (out, in) <-> kernel (*in, *out), n_in input axes
        rows_in = 1
        for n in shape_tfm[:n_in]:
            rows_in *= n
        return (lambda a: a.T.reshape(shape_tfm)), (lambda a: a.reshape(rows_in, -1).T)

    def bias(heads):
        return (lambda a: a.reshape(heads, dh)), (lambda a: a.reshape(-1))

    rows = [(("embed", "embedding"), "model.embed_tokens.weight", same, same, (v, d))]
    for i in range(model.n_layers):
        p, n = f"layers_{i}", f"model.layers.{i}."
        rows += [
            ((p, "attn_norm", "scale"), n + "input_layernorm.weight", same, same, (d,)),
            ((p, "attn", "q_proj", "kernel"), n + "self_attn.q_proj.weight",
             *lin((d, h, dh)), (h * dh, d)),
            ((p, "attn", "k_proj", "kernel"), n + "self_attn.k_proj.weight",
             *lin((d, hkv, dh)), (hkv * dh, d)),
            ((p, "attn", "v_proj", "kernel"), n + "self_attn.v_proj.weight",
             *lin((d, hkv, dh)), (hkv * dh, d)),
            ((p, "attn", "o_proj", "kernel"), n + "self_attn.o_proj.weight",
             *lin((h, dh, d), 2), (d, h * dh)),
            ((p, "ffn_norm", "scale"), n + "post_attention_layernorm.weight", same, same, (d,)),
            ((p, "ffn", "wi_0", "kernel"), n + "mlp.gate_proj.weight", *lin((d, f)), (f, d)),
            ((p, "ffn", "wi_1", "kernel"), n + "mlp.up_proj.weight", *lin((d, f)), (f, d)),
            ((p, "ffn", "wo", "kernel"), n + "mlp.down_proj.weight", *lin((f, d)), (d, f)),
        ]
        if model.qkv_bias:
            rows += [((p, "attn", f"{x}_bias", "bias"), n + f"self_attn.{x}_proj.bias",
                      *bias(heads), (heads * dh,))
                     for x, heads in (("q", h), ("k", hkv), ("v", hkv))]
    rows.append((("final_norm", "scale"), "model.norm.weight", same, same, (d,)))
    if not model.tie_embeddings:
        rows.append((("lm_head", "kernel"), "lm_head.weight", *lin((d, v)), (v, d)))
    return rows
