"""KV-cache memory arithmetic: config + arithmetic only, no jax (``tfm-jax kv-cache`` stays light).

A decoder layer caches one key and one value vector per token and per K/V head, so::

    total = 2 * n_kv_heads * head_dim * bytes * n_layers * seq * batch

(the 2 is K *and* V). MHA caches ``n_heads`` K/V heads, GQA ``n_kv_heads``, MQA one, so the
ratios MHA/GQA = ``n_heads / n_kv_heads`` and MHA/MQA = ``n_heads`` hold at any length. For
Llama-3-8B (32 layers, 8 K/V heads, head_dim 128) in bf16 that is 131,072 bytes per token,
512 MiB at 4096 tokens (MHA: 2 GiB, MQA: 64 MiB).

Quantized caches (``int8``, ``fp8``) store 1 byte per element *plus* their scales. The scale
overhead is reported separately (``scale_bytes``, ``total_with_scales``) and never folded into
``total_bytes``, which is the formula above: by default one float32 scale per token and K/V head,
for K and for V (``scale_per="token_head"``; ``"token"``: one per token across heads).
"""

from __future__ import annotations

from typing import Any, Optional

from tfm_jax.config.schema import ModelConfig, param_counts

# Bytes per element of the cache (and of the weights, for the share next to them).
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1, "fp8": 1}
QUANTIZED = frozenset({"int8", "fp8"})
_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "e4m3": "fp8",
            "float8_e4m3fn": "fp8"}
SCALE_PER = ("token_head", "token")


def canonical_dtype(dtype: str) -> str:
    """``'bfloat16'`` -> ``'bf16'``; raises ValueError naming the allowed names."""
    name = _ALIASES.get(str(dtype).lower(), str(dtype).lower())
    if name not in DTYPE_BYTES:
        raise ValueError(f"KV dtype {dtype!r} is not one of {', '.join(DTYPE_BYTES)} "
                         f"(aliases: {', '.join(_ALIASES)})")
    return name


def attention_kind(n_heads: int, n_kv_heads: int) -> str:
    """``MHA`` (as many K/V heads as query heads), ``MQA`` (one) or ``GQA`` (in between)."""
    if n_kv_heads == n_heads:
        return "MHA"
    return "MQA" if n_kv_heads == 1 else "GQA"


def _model(cfg: Any) -> ModelConfig:
    model = getattr(cfg, "model", cfg)
    if not isinstance(model, ModelConfig):
        raise TypeError(f"expected a Config or ModelConfig, got {type(cfg).__name__}")
    return model


def kv_cache_bytes(cfg: Any, seq: int, batch: int = 1, dtype: str = "bf16",
                   n_kv_heads: Optional[int] = None, *, scale_per: str = "token_head",
                   scale_bytes: int = 4) -> dict[str, Any]:
    """KV-cache size of ``cfg``'s model (a :class:`~tfm_jax.config.Config` or its ``model``)
    for ``batch`` sequences of ``seq`` tokens, elements stored as ``dtype``.

    ``n_kv_heads`` overrides the config's (``n_heads``: MHA, 1: MQA). Returns plain ints/floats::

        kind, n_layers, n_kv_heads, head_dim, seq, batch, dtype, bytes_per_element,
        bytes_per_token_per_layer   2 * n_kv_heads * head_dim * bytes
        bytes_per_token             ... * n_layers
        bytes_per_layer             ... * seq * batch (one layer's cache)
        total_bytes                 2 * n_kv_heads * head_dim * bytes * n_layers * seq * batch
        scale_bytes                 int8/fp8 only (else 0): scales, ``scale_bytes`` each, one per
                                    token and K/V head (``scale_per="token_head"``) or per token
                                    (``"token"``), for K and V, every layer
        total_with_scales           total_bytes + scale_bytes
        weights_bytes               parameters (at this n_kv_heads) stored as ``dtype``, scales of
                                    quantized weights excluded
        kv_share                    total_with_scales / (total_with_scales + weights_bytes)
    """
    m = _model(cfg)
    name = canonical_dtype(dtype)
    hkv = m.n_kv_heads if n_kv_heads is None else int(n_kv_heads)
    if hkv < 1 or m.n_heads % hkv:
        raise ValueError(f"n_kv_heads={hkv} must divide n_heads={m.n_heads} (MHA: equal, "
                         "GQA: divisor, MQA: 1)")
    if seq < 1 or batch < 1:
        raise ValueError(f"seq={seq} and batch={batch} must be positive")
    if scale_per not in SCALE_PER:
        raise ValueError(f"scale_per={scale_per!r} must be one of {SCALE_PER}")
    nbytes = DTYPE_BYTES[name]
    dh, layers = m.resolved_head_dim, m.n_layers
    per_tok_layer = 2 * hkv * dh * nbytes
    total = per_tok_layer * layers * seq * batch
    scales = 0
    if name in QUANTIZED:
        per_tok = 2 * (hkv if scale_per == "token_head" else 1)     # K and V
        scales = per_tok * scale_bytes * layers * seq * batch
    weights = param_counts(m.model_copy(update={"n_kv_heads": hkv}))["total"] * nbytes
    return {
        "kind": attention_kind(m.n_heads, hkv), "n_layers": layers, "n_heads": m.n_heads,
        "n_kv_heads": hkv, "head_dim": dh, "seq": int(seq), "batch": int(batch), "dtype": name,
        "bytes_per_element": nbytes,
        "bytes_per_token_per_layer": per_tok_layer,
        "bytes_per_token": per_tok_layer * layers,
        "bytes_per_layer": per_tok_layer * seq * batch,
        "total_bytes": total,
        "scale_bytes": scales,
        "total_with_scales": total + scales,
        "weights_bytes": weights,
        "kv_share": (total + scales) / (total + scales + weights),
    }


def kv_table(cfg: Any, seq: int, batch: int = 1, dtype: str = "bf16") -> list[dict[str, Any]]:
    """:func:`kv_cache_bytes` for MHA (``n_heads``), the config's ``n_kv_heads`` and MQA (1),
    largest first, without duplicates; each row has ``config: True`` for the config's own."""
    m = _model(cfg)
    heads = sorted({m.n_heads, m.n_kv_heads, 1}, reverse=True)
    rows = []
    for h in heads:
        row = kv_cache_bytes(m, seq, batch, dtype, n_kv_heads=h)
        row["config"] = h == m.n_kv_heads
        rows.append(row)
    return rows


def human_bytes(n: float) -> str:
    """Binary units: ``human_bytes(2**31) == '2.00 GiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
