"""The LM head's float32 logits and a sequence-chunked cross-entropy for large vocabularies.

* :func:`head_logits`: ``x @ W`` with float32 logits straight out of the GEMM
  (``preferred_element_type``), whose backward casts the logits' cotangent to the operands'
  dtype so dX and dW are GEMMs in the compute dtype (bf16 tensor cores, no float32 operand).
* :func:`chunked_ce_sum`: the masked cross-entropy sum over tokens in blocks of ``chunk``
  tokens. Only one block's (chunk, V) float32 logits exist at a time, in the forward *and* the
  backward (a custom VJP recomputes each block's logits from the saved hidden states), and the
  head's gradient sums over blocks in float32. For Llama-3's 128k vocabulary at 8k tokens one
  float32 logits copy is 3.9 GiB; chunked it is ``chunk * V * 4`` bytes.

Pure ``jnp``: no parameters here (the model owns the head weight).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_DIMS = (((1,), (0,)), ((), ()))          # (N, d) @ (d, V)


@jax.custom_vjp
def head_logits(x: jax.Array, w: jax.Array) -> jax.Array:
    """(N, d) @ (d, V) -> float32 (N, V); x and w in the compute dtype (module doc)."""
    return jax.lax.dot_general(x, w, _DIMS, preferred_element_type=jnp.float32)


def _head_fwd(x, w):
    return head_logits(x, w), (x, w)


def _head_bwd(res, g):
    x, w = res
    g = g.astype(jnp.result_type(x, w))
    dx = jax.lax.dot_general(g, w, (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32).astype(x.dtype)
    dw = jax.lax.dot_general(x, g, (((0,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32).astype(w.dtype)
    return dx, dw


head_logits.defvjp(_head_fwd, _head_bwd)


def _ce_block(x, w, t, m):
    """Per-token loss and softmax of one block: x (n, d), w (d, V), t/m (n,)."""
    logits = jax.lax.dot_general(x, w, _DIMS, preferred_element_type=jnp.float32)   # (n, V)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
    return (lse - picked) * m, logits, lse   # (n,), (n, V), (n,)


def _blocks(x, targets, mask, chunk):
    """(N, d), (N,), (N,) -> (n_blocks, chunk, ...) padded with masked tokens."""
    n = x.shape[0]
    pad = (-n) % chunk
    if pad:
        x = jnp.pad(x, ((0, pad), (0, 0)))
        targets, mask = jnp.pad(targets, (0, pad)), jnp.pad(mask, (0, pad))
    nb = (n + pad) // chunk
    return (x.reshape(nb, chunk, x.shape[-1]), targets.reshape(nb, chunk),
            mask.reshape(nb, chunk))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def chunked_ce_sum(x: jax.Array, w: jax.Array, targets: jax.Array, mask: jax.Array,
                   chunk: int) -> jax.Array:
    """Sum over tokens of ``mask * -log softmax(x @ w)[target]`` in blocks of ``chunk`` tokens.

    x (N, d) in the compute dtype (the GEMMs run in it, logits float32); w (d, V) as stored (cast
    to x's dtype once; its gradient sums over blocks in float32 and returns in w's dtype);
    targets (N,) int, mask (N,) float. Returns a float32 scalar. Equal to the plain loss of
    :func:`head_logits` up to float summation order; so is its gradient."""
    return _chunked_fwd(x, w, targets, mask, chunk)[0]


def _chunked_fwd(x, w, targets, mask, chunk):
    xb, tb, mb = _blocks(x, targets, mask.astype(jnp.float32), chunk)
    wc = w.astype(x.dtype)         # once per step, as the head's own cast

    def body(total, blk):
        ce, _, lse = _ce_block(w=wc, x=blk[0], t=blk[1], m=blk[2])
        return total + jnp.sum(ce), lse

    total, lse = jax.lax.scan(body, jnp.zeros((), jnp.float32), (xb, tb, mb))
    return total, (x, w, targets, mask, lse)


def _chunked_bwd(chunk, res, g):
    x, w_stored, targets, mask, lse = res
    xb, tb, mb = _blocks(x, targets, mask.astype(jnp.float32), chunk)
    w = w_stored.astype(x.dtype)
    cd = x.dtype

    def body(dw, blk):
        xc, t, m, l = blk
        logits = jax.lax.dot_general(xc, w, _DIMS, preferred_element_type=jnp.float32)
        p = jnp.exp(logits - l[:, None])                                       # softmax (n, V)
        dlogits = (p - jax.nn.one_hot(t, w.shape[1], dtype=jnp.float32)) * (m * g)[:, None]
        dlogits = dlogits.astype(cd)
        dxc = jax.lax.dot_general(dlogits, w, (((1,), (1,)), ((), ())),
                                  preferred_element_type=jnp.float32).astype(x.dtype)
        dw = dw + jax.lax.dot_general(xc, dlogits, (((0,), (0,)), ((), ())),
                                      preferred_element_type=jnp.float32)
        return dw, dxc

    dw, dxb = jax.lax.scan(body, jnp.zeros(w.shape, jnp.float32), (xb, tb, mb, lse))
    dx = dxb.reshape(-1, x.shape[-1])[:x.shape[0]]
    zeros_t = (jnp.zeros(targets.shape, jax.dtypes.float0)
               if jnp.issubdtype(targets.dtype, jnp.integer) else jnp.zeros_like(targets))
    return dx, dw.astype(w_stored.dtype), zeros_t, jnp.zeros_like(mask)


chunked_ce_sum.defvjp(_chunked_fwd, _chunked_bwd)
