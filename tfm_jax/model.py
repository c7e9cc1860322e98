"""Decoder-only Transformer LM assembled from :mod:`tfm_jax.layers`, every choice from config.

Block (``norm_position``):

* pre  (GPT-2/Llama): ``h = x + Attn(N1(x));  y = h + FFN(N2(h))``; a final norm before the head.
* post (original):    ``h = N1(x + Attn(x));  y = N2(h + FFN(h))``; no final norm.

Activations carry logical axes (batch, length, embed) at block boundaries; parameters get theirs
at creation. ``scan_layers`` stacks the blocks under ``nn.scan`` (one compiled block, a leading
``layers`` axis on every block parameter); ``remat`` recomputes block activations in backward.

Variables: ``params``; with ``norm: batchnorm`` also ``batch_stats`` (running statistics,
mutable in train mode). The KV cache of inference is not a variable collection but an explicit
pytree passed in and returned (:class:`TransformerLM`, :mod:`tfm_jax.layers.kv_cache`).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from tfm_jax.core import telemetry
from tfm_jax.config import MoEConfig, ModelConfig, param_counts
from tfm_jax.layers.attention import Attention, Segments
from tfm_jax.layers.attention_ops.dense import make_attention_mask
from tfm_jax.layers.rope import rope_tables
from tfm_jax.layers.embed import Embed
from tfm_jax.layers.ffn import FeedForward
from tfm_jax.layers.kv_cache import Cache, init_cache as init_kv_cache
from tfm_jax.layers.linear import Linear
from tfm_jax.layers.moe import MoEFeedForward
from tfm_jax.layers.norms import make_norm
from tfm_jax.layers.ops import Ops
from tfm_jax.parallel import axes

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def ffn_factory(cfg: ModelConfig, ops: Optional[Ops] = None, moe: Optional[MoEConfig] = None
                ) -> Callable[..., nn.Module]:
    """The FFN a :class:`Block` builds (called with ``name=``): the dense
    :class:`~tfm_jax.layers.ffn.FeedForward`, or with ``moe`` the
    :class:`~tfm_jax.layers.moe.MoEFeedForward` of the model's FFN type."""
    common = dict(init_std=cfg.init_std, out_init_std=cfg.init_std / np.sqrt(2 * cfg.n_layers),
                  dtype=DTYPES[cfg.dtype], param_dtype=DTYPES[cfg.param_dtype], ops=ops)
    if moe is not None and moe.n_experts:
        return functools.partial(MoEFeedForward, moe, moe.expert_hidden or cfg.resolved_ffn_hidden,
                                 cfg.ffn_type, **common)
    return functools.partial(FeedForward, cfg.resolved_ffn_hidden, cfg.ffn_type, **common)


def norm_factory(cfg: ModelConfig, ops: Optional[Ops] = None) -> Callable[..., nn.Module]:
    """The norm a :class:`Block` builds twice (``name=``): ``cfg.norm`` with its options."""
    return functools.partial(make_norm, cfg.norm, eps=cfg.norm_eps, bn_momentum=cfg.bn_momentum,
                             bn_masked=cfg.bn_masked, param_dtype=DTYPES[cfg.param_dtype],
                             ops=ops)


def attention_factory(cfg: ModelConfig, ops: Optional[Ops] = None) -> Callable[..., nn.Module]:
    """The attention a :class:`Block` builds (``name=``): GQA projections with RoPE; the core
    is the ops seam's."""
    return functools.partial(
        Attention, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim, cfg.rope_theta,
        init_std=cfg.init_std, out_init_std=cfg.init_std / np.sqrt(2 * cfg.n_layers),
        dtype=DTYPES[cfg.dtype], param_dtype=DTYPES[cfg.param_dtype], block_q=cfg.attn_block_q,
        ops=ops, qkv_bias=cfg.qkv_bias, rope_scaling=cfg.rope_scaling)


class Block(nn.Module):
    """One decoder block from its parts: a norm factory, an attention factory and an FFN factory
    (dense or MoE), each called with ``name=`` (defaults: :func:`norm_factory`,
    :func:`attention_factory`, :func:`ffn_factory` of ``cfg``)."""

    cfg: ModelConfig
    train: bool = False
    ops: Optional[Ops] = None
    decode: bool = False          # with a layer cache: decode (True) or prefill (False)
    ffn: Optional[Callable[..., nn.Module]] = None         # FFN factory; None: dense
    norm: Optional[Callable[..., nn.Module]] = None        # norm factory
    attention: Optional[Callable[..., nn.Module]] = None   # attention factory

    @nn.compact
    def __call__(self, x, positions, attn_mask, token_mask, rope_sincos, layer_cache=None):
        """x (B, T, d) -> (B, T, d). Returns ``(y, new_layer_cache)`` (None without a cache) so
        it can be scanned (the cache is a scanned input and output)."""
        cfg = self.cfg
        norm = self.norm or norm_factory(cfg, self.ops)
        attn = (self.attention or attention_factory(cfg, self.ops))(name="attn")
        ffn_mod = (self.ffn or ffn_factory(cfg, self.ops))(name="ffn")
        # MoE: padding positions are not routed (they take no expert capacity)
        ffn = (functools.partial(ffn_mod, token_mask=token_mask)
               if getattr(ffn_mod, "uses_token_mask", False) else ffn_mod)
        n1, n2 = norm(name="attn_norm"), norm(name="ffn_norm")
        new_cache = None

        def attend(z):
            nonlocal new_cache
            if layer_cache is None:
                return attn(z, positions, attn_mask, token_mask, rope_sincos)
            out, new_cache = attn(z, positions, attn_mask, token_mask, rope_sincos, layer_cache,
                                  decode=self.decode)
            return out

        if cfg.norm_position == "pre":
            h = x + attend(n1(x, token_mask, train=self.train))
            y = h + ffn(n2(h, token_mask, train=self.train))
        else:
            h = n1(x + attend(x), token_mask, train=self.train)
            y = n2(h + ffn(h), token_mask, train=self.train)
        return nn.with_logical_constraint(y.astype(DTYPES[cfg.dtype]), axes.ACT_BTD), new_cache


class BlockGroup(nn.Module):
    """``every`` consecutive blocks, the last with the MoE FFN: the unit ``nn.scan`` repeats
    when ``scan_layers`` meets ``moe.every > 1`` (blocks ``block_0`` .. ``block_{every-1}``;
    layer ``i`` of the unscanned model is ``block_{i % every}`` of group ``i // every``). The
    layer cache, if any, holds the group's ``every`` layers on a leading axis."""

    cfg: ModelConfig
    train: bool = False
    ops: Optional[Ops] = None
    decode: bool = False
    ffns: tuple = ()              # one FFN factory (or None: dense) per block of the group
    block_cls: Callable[..., nn.Module] = Block

    @nn.compact
    def __call__(self, x, positions, attn_mask, token_mask, rope_sincos, layer_cache=None):
        caches = []
        for j, ffn in enumerate(self.ffns):
            c = None if layer_cache is None else jax.tree.map(lambda a: a[j], layer_cache)
            x, c = self.block_cls(self.cfg, self.train, self.ops, self.decode, ffn,
                                  name=f"block_{j}")(
                x, positions, attn_mask, token_mask, rope_sincos, *(() if c is None else (c,)))
            caches.append(c)
        new = None if layer_cache is None else jax.tree.map(lambda *a: jnp.stack(a), *caches)
        return x, new


class TransformerLM(nn.Module):
    """tokens (B, T) -> logits (B, T, vocab) in float32.

    Three modes (the KV cache is an explicit pytree, :mod:`tfm_jax.layers.kv_cache`):

    * train / full forward (``cache=None``): as always; returns the logits.
    * prefill (``cache=...``): the same causal forward over a right-padded prompt batch
      (``token_mask`` (B, T) marks each row's prompt, a prefix) that also writes every layer's
      K/V at positions [0, T); returns ``(logits, cache)`` with ``lengths`` = prompt lengths.
    * ``hidden_only=True`` (no cache): the final hidden states (B, T, d) instead of the logits,
      for a loss that applies the head in chunks (:func:`head_weight`).
    * packed documents (``segment_ids`` (B, T) and each document's ``positions``, from
      ``data.packing=segments``): RoPE restarts per document and attention stays inside it;
    * decode (``cache=..., decode=True``): T new tokens per row at positions
      ``lengths[b] + 0..T-1`` (RoPE at those absolute positions) attend to the cache; returns
      ``(logits, cache)`` with their K/V written and ``lengths + T``.
    """

    cfg: ModelConfig
    # The backend's GEMM / attention core / RMSNorm / SwiGLU (tfm_jax.layers.ops), resolved once
    # by tfm_jax.platform.backends.resolve_ops (tfm_jax.train.build does). None: XLA ops for jax's default
    # backend. Every set has the same parameters and, to fp32 rounding, the same numbers.
    ops: Optional[Ops] = None
    # Mixture-of-Experts (tfm_jax.layers.moe): None or n_experts 0: every FFN dense.
    moe: Optional[MoEConfig] = None

    @nn.compact
    def __call__(self, tokens: jax.Array, *, positions: Optional[jax.Array] = None,
                 token_mask: Optional[jax.Array] = None, train: bool = False,
                 cache: Optional[Cache] = None, decode: bool = False,
                 hidden_only: bool = False, segment_ids: Optional[jax.Array] = None):
        cfg = self.cfg
        dtype, pdtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
        b, t = tokens.shape
        if cache is not None and (train or positions is not None):
            raise ValueError("the KV cache is for inference: call with train=False and without "
                             "positions (prefill uses 0..T-1, decode each row's cache length)")
        if cache is not None and (isinstance(cache.layers, tuple) == cfg.scan_layers or (
                isinstance(cache.layers, tuple) and len(cache.layers) != cfg.n_layers)):
            raise ValueError(
                f"the KV cache's layout does not fit this model (scan_layers={cfg.scan_layers}, "
                f"{cfg.n_layers} layers); create it with TransformerLM.init_cache")
        if decode:
            if cache is None:
                raise ValueError("decode=True needs a cache (prefill one first)")
            if token_mask is not None:
                raise ValueError("decode: every new token is real, token_mask must be None")
            # (B, T): each row continues at its own length; the cache masks what it holds
            positions = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        if segment_ids is not None and (cache is not None or positions is None):
            raise ValueError("segment_ids (packed documents) are for training/evaluation "
                             "forwards and need each document's positions")
        # positions 0..T-1 (training, prefill): the block-causal path, no (B, T, T) mask at all
        causal_fast_path = positions is None and cfg.attn_block_q > 0
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is not None:     # packed documents: the core masks across segments
            attn_mask = (Segments(segment_ids) if cfg.attn_block_q > 0 else make_attention_mask(
                positions, positions, token_mask, segment_ids, segment_ids))
        else:
            attn_mask = (None if causal_fast_path or decode
                         else make_attention_mask(positions, positions, token_mask))  # (B,T,T)
        rope_sincos = rope_tables(positions, cfg.resolved_head_dim, cfg.rope_theta,
                                  cfg.rope_scaling)

        embed = Embed(cfg.vocab_size, cfg.d_model, cfg.init_std, dtype, pdtype, name="embed")
        x = nn.with_logical_constraint(embed(tokens), axes.ACT_BTD)                # (B, T, d)

        block_cls = Block
        if cfg.remat != "none":
            policy = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable
                      if cfg.remat == "dots" else None)
            block_cls = nn.remat(Block, policy=policy, prevent_cse=not cfg.scan_layers)
        block_args = (positions, attn_mask, token_mask, rope_sincos)
        new_layers = None
        if cfg.scan_layers:
            # the cache (stacked, leading layers axis) is scanned in and out like the params
            in_axes = (nn.broadcast,) * 4 + (() if cache is None else (0,))
            variable_axes = {"params": 0, "batch_stats": 0,
                             **{c: 0 for c in telemetry.COLLECTIONS}}   # sown: one per layer
            every = self.moe.every if self.moe is not None and self.moe.n_experts else 1
            if every == 1:   # every block alike (all MoE or all dense)
                ffn = ffn_factory(cfg, self.ops, self.moe) if self._moe_layer(0) else None
                unit, unit_args, cache_in = block_cls, (cfg, train, self.ops, decode, ffn), (
                    None if cache is None else cache.layers)
            else:            # scan over groups of `every` layers: (every-1) dense + 1 MoE
                if cfg.n_layers % every:
                    raise ValueError(f"scan_layers: model.n_layers={cfg.n_layers} is not a "
                                     f"multiple of moe.every={every}")
                ffns = tuple(ffn_factory(cfg, self.ops, self.moe) if self._moe_layer(j)
                             else None for j in range(every))
                unit, unit_args = BlockGroup, (cfg, train, self.ops, decode, ffns, block_cls)
                cache_in = None if cache is None else jax.tree.map(   # (L, ...) -> (L/e, e, ...)
                    lambda a: a.reshape(cfg.n_layers // every, every, *a.shape[1:]),
                    cache.layers)
            stack = nn.scan(unit, variable_axes=variable_axes,
                            split_rngs={"params": True}, in_axes=in_axes,
                            length=cfg.n_layers // every,
                            metadata_params={nn.PARTITION_NAME: axes.LAYERS})
            x, new_layers = stack(*unit_args, name="layers")(
                x, *block_args, *(() if cache_in is None else (cache_in,)))
            if new_layers is not None and every > 1:
                new_layers = jax.tree.map(lambda a: a.reshape(cfg.n_layers, *a.shape[2:]),
                                          new_layers)
        else:
            layer_caches = []
            for i in range(cfg.n_layers):
                ffn = ffn_factory(cfg, self.ops, self.moe) if self._moe_layer(i) else None
                x, layer_cache = block_cls(cfg, train, self.ops, decode, ffn,
                                           name=f"layers_{i}")(
                    x, *block_args, *(() if cache is None else (cache.layers[i],)))
                layer_caches.append(layer_cache)
            new_layers = tuple(layer_caches)

        if cfg.norm_position == "pre":
            x = make_norm(cfg.norm, eps=cfg.norm_eps, bn_momentum=cfg.bn_momentum,
                          bn_masked=cfg.bn_masked, param_dtype=pdtype, name="final_norm",
                          ops=self.ops)(
                x, token_mask, train=train)
        if hidden_only:     # (B, T, d): a chunked loss applies the head itself (head_weight)
            return nn.with_logical_constraint(x.astype(dtype), axes.ACT_BTD)
        if cfg.tie_embeddings:
            logits = embed.attend(x)
        else:
            # high precision under quantization recipes (quantized=False): the set's own GEMM
            logits = Linear(cfg.vocab_size, (axes.EMBED, axes.VOCAB), init_std=cfg.init_std,
                            dtype=dtype, param_dtype=pdtype, ops=self.ops, quantized=False,
                            f32_out=True, name="lm_head")(x)
        logits = nn.with_logical_constraint(logits.astype(jnp.float32), axes.ACT_BTV)
        if cache is None:
            return logits
        if decode:
            lengths = cache.lengths + t
        elif token_mask is None:
            lengths = jnp.full((b,), t, jnp.int32)
        else:
            lengths = jnp.sum(token_mask.astype(jnp.int32), axis=1)
        return logits, Cache(new_layers, lengths)

    def _moe_layer(self, i: int) -> bool:
        return self.moe is not None and self.moe.is_moe_layer(i)

    def init_cache(self, batch: int, max_len: int, *, kv_cache: str = "none",
                   kv_scale: str = "per_token_head") -> Cache:
        """An empty KV cache for this model (:func:`tfm_jax.layers.kv_cache.init_cache`):
        stacked when ``scan_layers``, stored in the compute dtype unless quantized."""
        cfg = self.cfg
        return init_kv_cache(n_layers=cfg.n_layers, batch=batch, max_len=max_len,
                             n_kv_heads=cfg.n_kv_heads, head_dim=cfg.resolved_head_dim,
                             dtype=DTYPES[cfg.dtype], kv_cache=kv_cache, kv_scale=kv_scale,
                             stacked=cfg.scan_layers)


def head_weight(cfg: ModelConfig, params) -> jax.Array:
    """The LM head's (d, V) weight in a params tree: ``lm_head/kernel``, or the embedding table
    transposed when tied (what ``hidden_only`` callers multiply the hidden states by)."""
    if cfg.tie_embeddings:
        return params["embed"]["embedding"].T
    return params["lm_head"]["kernel"]


def count_params(cfg: ModelConfig, moe: Optional[MoEConfig] = None) -> dict[str, int]:
    """Parameter counts by the config's formulas (:func:`tfm_jax.config.param_counts`, which
    needs no jax; checked against the real tree in tests). With MoE also ``active``."""
    return param_counts(cfg, moe)


def train_flops_per_token(cfg: ModelConfig, seq_len: int,
                          moe: Optional[MoEConfig] = None) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward), PaLM (appendix B) convention.

    Forward per token: ``2 * N_matmul`` (every projection incl. the LM head -- tied or not -- but
    not the embedding gather) ``+ 4 * n_layers * seq_len * H * Dh`` (QK^T and PV, counted over
    the full T x T square, ignoring the causal half). Norms, softmax, RoPE and the optimizer are
    not counted. With MoE layers (``moe``) the *active* projections count (top_k experts +
    router + shared expert per token), not every expert; capacity drops are ignored.
    """
    counts = count_params(cfg, moe)
    n_matmul = counts.get("active_matmul", counts["matmul"])
    attn = 4 * cfg.n_layers * seq_len * cfg.n_heads * cfg.resolved_head_dim
    return 3.0 * (2.0 * n_matmul + attn)
