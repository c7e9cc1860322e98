"""Multi-head attention with grouped K/V heads (MHA / GQA / MQA) and rotary embeddings.

Split in two, as in MaxText: :class:`Attention` holds the projections (q: d -> H x Dh,
k/v: d -> Hkv x Dh, o: H x Dh -> d) with logical axes and applies RoPE (:mod:`tfm_jax.layers.rope`);
the attention core itself is the op the ops seam gives it (:mod:`tfm_jax.layers.ops`, cores in
:mod:`tfm_jax.layers.attention_ops`). Query head ``h`` uses K/V head ``h // G``, G = H / Hkv.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import struct

from tfm_jax.layers import kv_cache, paged_cache
from tfm_jax.layers.attention_ops.dense import grouped_attention
from tfm_jax.layers.linear import Linear
from tfm_jax.layers.ops import Ops, resolve as resolve_ops
from tfm_jax.layers.rope import apply_rope, rope_tables
from tfm_jax.parallel import axes


@struct.dataclass
class Segments:
    """The attention mask of packed documents: ``ids`` (B, T) int segment ids (0: padding); a
    query attends causally to the keys of its own segment only. Passed where a (B, T, T) mask
    goes, it keeps the causal core's fast path (every core takes ``segment_ids``)."""

    ids: jax.Array


class _Bias(nn.Module):
    """A projection's bias (H, Dh), zeros at init; its leaf is named ``bias`` (role ``bias``: no
    weight decay, :mod:`tfm_jax.core.roles`)."""
    heads: int
    head_dim: int
    head_axis: str
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.param("bias", nn.with_logical_partitioning(
            nn.initializers.zeros, (self.head_axis, axes.HEAD_DIM)),
            (self.heads, self.head_dim), self.param_dtype)


class Attention(nn.Module):
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    init_std: float = 0.02
    out_init_std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    block_q: int = 64
    ops: Optional[Ops] = None   # GEMM + causal core (tfm_jax.layers.ops); None: XLA defaults
    qkv_bias: bool = False      # learned q/k/v biases (Qwen2): q_bias/bias, k_bias/bias, ...
    rope_scaling: Any = None    # model.rope_scaling (used only when rope_sincos is not given)

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, mask: Optional[jax.Array],
                 k_valid: Optional[jax.Array] = None,
                 rope_sincos: Optional[jax.Array] = None,
                 cache: Optional[kv_cache.LayerCache] = None, *, decode: bool = False):
        """x (B, T, d), positions (B, T) -> (B, T, d). ``rope_sincos``: precomputed
        :func:`rope_tables` of ``positions`` (computed here when not given).

        ``mask`` bool (B, T, T): general masked attention. ``mask=None``: causal self-attention
        over positions 0..T-1 with optional key padding ``k_valid`` (B, T), block-causal path.
        ``mask=Segments(ids)``: the same causal core, within each packed document only.

        With a KV ``cache`` (:class:`~tfm_jax.layers.kv_cache.LayerCache`, inference) it returns
        ``(out, new_cache)``. Prefill (``decode=False``): the attention above over the prompt,
        and the K/V of all T tokens written at positions [0, T). Decode (``decode=True``,
        ``mask`` unused): the K/V of the T new tokens written at ``positions[:, 0]`` of each
        row, then the queries attend to the cache through ``ops.cached_attention``. A paged
        cache (:class:`~tfm_jax.layers.paged_cache.PagedLayerCache`) works the same way: writes
        go through its block table, reads see each row's pages gathered in order -- or, for a
        one-token decode step with an ops set that has ``paged_attention``, read in place.
        """
        d = x.shape[-1]
        ops = resolve_ops(self.ops)

        def proj(heads, head_axis, name):
            return Linear((heads, self.head_dim), (axes.EMBED, head_axis, axes.HEAD_DIM),
                          init_std=self.init_std, dtype=self.dtype,
                          param_dtype=self.param_dtype, ops=ops, name=name)(x)

        q = proj(self.n_heads, axes.HEADS, "q_proj")                   # (B, T, H, Dh)
        k = proj(self.n_kv_heads, axes.KV_HEADS, "k_proj")             # (B, T, Hkv, Dh)
        v = proj(self.n_kv_heads, axes.KV_HEADS, "v_proj")             # (B, T, Hkv, Dh)
        if self.qkv_bias:
            q = q + _Bias(self.n_heads, self.head_dim, axes.HEADS, self.param_dtype,
                          name="q_bias")().astype(q.dtype)
            k = k + _Bias(self.n_kv_heads, self.head_dim, axes.KV_HEADS, self.param_dtype,
                          name="k_bias")().astype(k.dtype)
            v = v + _Bias(self.n_kv_heads, self.head_dim, axes.KV_HEADS, self.param_dtype,
                          name="v_bias")().astype(v.dtype)
        q = nn.with_logical_constraint(q, (axes.BATCH, axes.LENGTH, axes.HEADS, axes.HEAD_DIM))
        k = nn.with_logical_constraint(k, (axes.BATCH, axes.LENGTH, axes.KV_HEADS, axes.HEAD_DIM))
        if rope_sincos is None:
            rope_sincos = rope_tables(positions, self.head_dim, self.rope_theta,
                                      self.rope_scaling)
        q = apply_rope(q, rope_sincos)
        k = apply_rope(k, rope_sincos)
        view, out = cache, None
        if isinstance(cache, paged_cache.PagedLayerCache):   # pages + block table
            cache = paged_cache.write(cache, k, v, positions[:, 0] if decode else None)
            if (decode and q.shape[1] == 1 and ops.paged_attention is not None
                    and not cache.quantized):                # read the pages in place
                out = ops.paged_attention(q, cache, positions)   # None: shapes it cannot take
            if out is None:                                  # gather a contiguous copy
                view = paged_cache.gather(cache)
        elif cache is not None:
            # prefill writes at 0 (one slice for all rows); decode at each row's length
            cache = kv_cache.write(cache, k, v, positions[:, 0] if decode else None)
            view = cache = kv_cache.constrain(cache, kv_cache.layer_logical_axes(cache))
        if out is None:                                      # (B, T, H, Dh) from the cores
            if cache is not None and decode:
                out = ops.cached_attention(q, view.k, view.v, positions, view.k_scale,
                                           view.v_scale)
            elif mask is None:
                out = ops.causal_attention(q, k, v, k_valid, block_q=self.block_q)
            elif isinstance(mask, Segments):
                out = ops.causal_attention(q, k, v, k_valid, block_q=self.block_q,
                                           segment_ids=mask.ids)
            else:
                out = grouped_attention(q, k, v, mask)
        out = nn.with_logical_constraint(out, (axes.BATCH, axes.LENGTH, axes.HEADS,
                                               axes.HEAD_DIM))
        out = Linear(d, (axes.HEADS, axes.HEAD_DIM, axes.EMBED), in_axes=2,
                     init_std=self.out_init_std, dtype=self.dtype, param_dtype=self.param_dtype,
                     ops=ops, name="o_proj")(out)
        return out if cache is None else (out, cache)
