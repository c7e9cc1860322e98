"""Export a TransformerLM parameter tree to the canonical flat numpy dict.

The canonical format is the one of ``benchmarks/torch_peer.py`` (``load_numpy_weights``): every
projection is an ``x @ W`` matrix of shape (in_features, out_features); keys are::

    embed (V, d)
    layers.{i}.attn_norm (d,)   layers.{i}.wq (d, H*Dh)    layers.{i}.wk (d, Hkv*Dh)
    layers.{i}.wv (d, Hkv*Dh)   layers.{i}.wo (H*Dh, d)    layers.{i}.ffn_norm (d,)
    layers.{i}.w_gate (d, F)    layers.{i}.w_up (d, F)     layers.{i}.w_down (F, d)
    final_norm (d,)             lm_head (d, V)

Head-major flattening: column ``h*Dh + j`` of ``wq`` is head ``h``, dim ``j`` (what a row-major
reshape of the (d, H, Dh) kernel gives). Only the architecture the torch peer implements is
exportable: pre-norm, RMSNorm, SwiGLU, untied embeddings.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from flax import linen as nn

from tfm_jax.config import ModelConfig


def _check_supported(cfg: ModelConfig) -> None:
    problems = []
    if cfg.norm != "rmsnorm":
        problems.append(f"norm={cfg.norm!r} (need 'rmsnorm')")
    if cfg.norm_position != "pre":
        problems.append(f"norm_position={cfg.norm_position!r} (need 'pre')")
    if cfg.ffn_type != "swiglu":
        problems.append(f"ffn_type={cfg.ffn_type!r} (need 'swiglu')")
    if cfg.tie_embeddings:
        problems.append("tie_embeddings=True (need untied)")
    if cfg.qkv_bias:
        problems.append("qkv_bias=True (the canonical format has no biases)")
    if problems:
        raise ValueError("export_canonical: the canonical format supports only pre-norm RMSNorm "
                         "SwiGLU untied models without biases; got " + ", ".join(problems))


def _layer_trees(params: Mapping[str, Any], cfg: ModelConfig) -> list[Mapping[str, Any]]:
    """One (numpy) parameter tree per layer, from the unscanned or scanned layout."""
    if "layers" in params:                                  # scanned: leading layer axis
        stacked = params["layers"]
        return [jax.tree.map(lambda a, i=i: np.asarray(a)[i], stacked)
                for i in range(cfg.n_layers)]
    try:
        return [params[f"layers_{i}"] for i in range(cfg.n_layers)]
    except KeyError as err:
        raise ValueError(f"export_canonical: params have neither 'layers' nor {err.args[0]!r}; "
                         f"top-level keys: {sorted(params)}") from None


def export_canonical(params: Mapping[str, Any], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """TransformerLM params (boxed or not; optionally wrapped as ``{"params": ...}``) ->
    canonical ``{key: float32 np.ndarray}``. Raises ValueError for unsupported configs."""
    _check_supported(cfg)
    params = nn.meta.unbox(params)
    if "params" in params and "embed" not in params:
        params = params["params"]
    h, hkv, dh = cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
    d, f = cfg.d_model, cfg.resolved_ffn_hidden
    # owned, writable, C-contiguous float32 copies (torch.from_numpy warns on read-only views)
    f32 = lambda a: np.array(a, dtype=np.float32, order="C", copy=True)  # noqa: E731

    out = {"embed": f32(params["embed"]["embedding"])}
    for i, lp in enumerate(_layer_trees(params, cfg)):
        p = f"layers.{i}."
        gate, up = f32(lp["ffn"]["wi_0"]["kernel"]), f32(lp["ffn"]["wi_1"]["kernel"])
        if gate.shape != (d, f) or up.shape != (d, f):
            raise ValueError(f"export_canonical: layer {i} ffn wi_0/wi_1 have shapes "
                             f"{gate.shape}/{up.shape}, expected {(d, f)}")
        out[p + "attn_norm"] = f32(lp["attn_norm"]["scale"])
        out[p + "wq"] = f32(lp["attn"]["q_proj"]["kernel"]).reshape(d, h * dh)
        out[p + "wk"] = f32(lp["attn"]["k_proj"]["kernel"]).reshape(d, hkv * dh)
        out[p + "wv"] = f32(lp["attn"]["v_proj"]["kernel"]).reshape(d, hkv * dh)
        out[p + "wo"] = f32(lp["attn"]["o_proj"]["kernel"]).reshape(h * dh, d)
        out[p + "ffn_norm"] = f32(lp["ffn_norm"]["scale"])
        out[p + "w_gate"] = gate
        out[p + "w_up"] = up
        out[p + "w_down"] = f32(lp["ffn"]["wo"]["kernel"])
    out["final_norm"] = f32(params["final_norm"]["scale"])
    out["lm_head"] = f32(params["lm_head"]["kernel"])
    return out


def import_canonical(w: Mapping[str, np.ndarray], cfg: ModelConfig,
                     scanned: bool = False) -> dict[str, Any]:
    """Canonical dict -> TransformerLM ``params`` tree (the inverse of :func:`export_canonical`).

    Lets a model start from weights that do not depend on this package's parameter layout (the
    torch peer's, or a seeded canonical set), so losses can be compared across layout changes.
    """
    _check_supported(cfg)
    h, hkv, dh = cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
    d = cfg.d_model
    a = lambda k: np.asarray(w[k], np.float32)  # noqa: E731

    def layer(i: int) -> dict[str, Any]:
        p = f"layers.{i}."
        return {
            "attn_norm": {"scale": a(p + "attn_norm")},
            "attn": {"q_proj": {"kernel": a(p + "wq").reshape(d, h, dh)},
                     "k_proj": {"kernel": a(p + "wk").reshape(d, hkv, dh)},
                     "v_proj": {"kernel": a(p + "wv").reshape(d, hkv, dh)},
                     "o_proj": {"kernel": a(p + "wo").reshape(h, dh, d)}},
            "ffn_norm": {"scale": a(p + "ffn_norm")},
            "ffn": {"wi_0": {"kernel": a(p + "w_gate")}, "wi_1": {"kernel": a(p + "w_up")},
                    "wo": {"kernel": a(p + "w_down")}},
        }

    layers = [layer(i) for i in range(cfg.n_layers)]
    out: dict[str, Any] = {"embed": {"embedding": a("embed")},
                           "final_norm": {"scale": a("final_norm")},
                           "lm_head": {"kernel": a("lm_head")}}
    if scanned:
        out["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
    else:
        out.update({f"layers_{i}": lp for i, lp in enumerate(layers)})
    return out


def random_canonical(cfg: ModelConfig, seed: int = 0, std: float = 0.02) -> dict[str, np.ndarray]:
    """Seeded canonical weights (normal(std) matrices, norm scales 1 + small noise)."""
    rng = np.random.default_rng(seed)
    h, hkv, dh = cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
    d, f, v = cfg.d_model, cfg.resolved_ffn_hidden, cfg.vocab_size
    mat = lambda *s: (std * rng.standard_normal(s)).astype(np.float32)  # noqa: E731
    vec = lambda: (1.0 + 0.1 * rng.standard_normal(d)).astype(np.float32)  # noqa: E731
    w = {"embed": mat(v, d)}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        w.update({p + "attn_norm": vec(), p + "wq": mat(d, h * dh), p + "wk": mat(d, hkv * dh),
                  p + "wv": mat(d, hkv * dh), p + "wo": mat(h * dh, d), p + "ffn_norm": vec(),
                  p + "w_gate": mat(d, f), p + "w_up": mat(d, f), p + "w_down": mat(f, d)})
    w["final_norm"] = vec()
    w["lm_head"] = mat(d, v)
    return w
