"""PyTorch eager peer of the tfm_jax decoder-only LM, plus CPU timing helpers.

The model here is meant to be *mathematically identical* to the tfm_jax model
so that throughput numbers compare like with like:

  tokens -> embed -> n_layers x Block -> RMSNorm -> lm_head -> logits

  Block(x):  x = x + Attention(RMSNorm(x))
             x = x + SwiGLU(RMSNorm(x))

No biases, no dropout, untied embedding / lm_head, RoPE ("rotate-half") on q/k,
causal softmax attention with grouped-query heads (GQA).

Weights can be exchanged with other implementations through a flat dict of
numpy arrays with *canonical* keys in "x @ W" layout, i.e. every projection
matrix has shape (in_features, out_features); see `load_numpy_weights`.

Run the benchmark:

    python -m benchmarks.torch_peer --d-model 256 --layers 4 --heads 8 \
        --kv-heads 2 --seq 256 --batch 8 --vocab 256
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def _sdpa_supports_gqa() -> bool:
    """True if this torch's scaled_dot_product_attention accepts enable_gqa."""
    if not hasattr(F, "scaled_dot_product_attention"):
        return False
    try:
        q = torch.zeros(1, 2, 1, 2)
        kv = torch.zeros(1, 1, 1, 2)
        F.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)
        return True
    except TypeError:
        return False


# Module-level switch so tests can exercise the repeat_interleave fallback too.
USE_SDPA_GQA = _sdpa_supports_gqa()


# -----------------------------------------------------------------------------
# Model


class RMSNorm(nn.Module):
    """y = x * rsqrt(mean(x^2, -1) + eps) * scale, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        y = y * self.scale.float()
        return y.to(x.dtype)


def rope_cos_sin(seq_len: int, head_dim: int, theta: float, device=None):
    """cos, sin tables of shape (T, Dh/2) for positions 0..T-1 (float32)."""
    assert head_dim % 2 == 0, "head_dim must be even for RoPE"
    i = torch.arange(head_dim // 2, dtype=torch.float32, device=device)
    inv_freq = theta ** (-2.0 * i / head_dim)  # (Dh/2,)
    pos = torch.arange(seq_len, dtype=torch.float32, device=device)  # (T,)
    angle = pos[:, None] * inv_freq[None, :]  # (T, Dh/2)
    return angle.cos(), angle.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x: (B, nh, T, Dh); cos/sin: (T, Dh/2)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]  # (B, nh, T, Dh/2) each
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention, scale 1/sqrt(Dh), GQA.

    q: (B, H, T, Dh); k, v: (B, Hkv, T, Dh). Query head h reads kv head
    h // (H // Hkv). Returns (B, H, T, Dh).
    """
    n_rep = q.shape[1] // k.shape[1]
    if USE_SDPA_GQA:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=n_rep > 1)
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=1)  # (B, H, T, Dh)
        v = v.repeat_interleave(n_rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        assert n_heads % n_kv_heads == 0, "n_heads must be a multiple of n_kv_heads"
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.wq = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hkv, Dh = self.n_heads, self.n_kv_heads, self.head_dim
        # head-major projection output: column h*Dh + j is head h, dim j
        q = self.wq(x).view(B, T, H, Dh).transpose(1, 2)  # (B, H, T, Dh)
        k = self.wk(x).view(B, T, Hkv, Dh).transpose(1, 2)  # (B, Hkv, T, Dh)
        v = self.wv(x).view(B, T, Hkv, Dh).transpose(1, 2)  # (B, Hkv, T, Dh)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = causal_attention(q, k, v)  # (B, H, T, Dh)
        y = y.transpose(1, 2).reshape(B, T, H * Dh)  # (B, T, H*Dh)
        return self.wo(y)  # (B, T, d)


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, ffn_hidden: int):
        super().__init__()
        self.w_gate = nn.Linear(d_model, ffn_hidden, bias=False)
        self.w_up = nn.Linear(d_model, ffn_hidden, bias=False)
        self.w_down = nn.Linear(ffn_hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))  # (B, T, d)


class Block(nn.Module):
    def __init__(self, d_model, n_heads, n_kv_heads, head_dim, ffn_hidden, norm_eps):
        super().__init__()
        self.attn_norm = RMSNorm(d_model, norm_eps)
        self.attn = Attention(d_model, n_heads, n_kv_heads, head_dim)
        self.ffn_norm = RMSNorm(d_model, norm_eps)
        self.ffn = SwiGLU(d_model, ffn_hidden)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        x = x + self.ffn(self.ffn_norm(x))
        return x


class TorchLM(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        ffn_hidden: int,
        rope_theta: float = 10000.0,
        norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.vocab_size, self.d_model, self.n_layers = vocab_size, d_model, n_layers
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.ffn_hidden, self.rope_theta = ffn_hidden, rope_theta
        self.embed = nn.Embedding(vocab_size, d_model)
        self.layers = nn.ModuleList(
            Block(d_model, n_heads, n_kv_heads, head_dim, ffn_hidden, norm_eps)
            for _ in range(n_layers)
        )
        self.final_norm = RMSNorm(d_model, norm_eps)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None):
        """tokens: (B, T) int64 -> logits (B, T, V); also mean CE loss if targets."""
        B, T = tokens.shape
        cos, sin = rope_cos_sin(T, self.head_dim, self.rope_theta, tokens.device)  # (T, Dh/2)
        x = self.embed(tokens)  # (B, T, d)
        for block in self.layers:
            x = block(x, cos, sin)
        x = self.final_norm(x)
        logits = self.lm_head(x)  # (B, T, V)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.view(B * T, -1).float(), targets.reshape(B * T))
        return logits, loss


# -----------------------------------------------------------------------------
# Canonical numpy weight exchange ("x @ W" layout: matrices are (in, out))


def _canonical_params(model: TorchLM):
    """Yield (canonical key, torch parameter, transpose?) for every parameter."""
    yield "embed", model.embed.weight, False
    for i, b in enumerate(model.layers):
        p = f"layers.{i}."
        yield p + "attn_norm", b.attn_norm.scale, False
        yield p + "wq", b.attn.wq.weight, True
        yield p + "wk", b.attn.wk.weight, True
        yield p + "wv", b.attn.wv.weight, True
        yield p + "wo", b.attn.wo.weight, True
        yield p + "ffn_norm", b.ffn_norm.scale, False
        yield p + "w_gate", b.ffn.w_gate.weight, True
        yield p + "w_up", b.ffn.w_up.weight, True
        yield p + "w_down", b.ffn.w_down.weight, True
    yield "final_norm", model.final_norm.scale, False
    yield "lm_head", model.lm_head.weight, True


def load_numpy_weights(model: TorchLM, w: dict, strict: bool = True) -> TorchLM:
    """Copy canonical numpy weights into `model` (in place; returns model).

    Raises KeyError on a missing key, ValueError on a wrong shape, and (if
    strict) ValueError on keys the model does not have.
    """
    expected = set()
    with torch.no_grad():
        for key, param, transpose in _canonical_params(model):
            expected.add(key)
            if key not in w:
                raise KeyError(f"load_numpy_weights: missing key {key!r}")
            arr = np.asarray(w[key])
            want = tuple(param.shape[::-1]) if transpose else tuple(param.shape)
            if arr.shape != want:
                raise ValueError(
                    f"load_numpy_weights: {key!r} has shape {arr.shape}, expected {want}"
                )
            t = torch.from_numpy(np.ascontiguousarray(arr)).to(param.dtype)
            param.copy_(t.T if transpose else t)
    if strict:
        extra = sorted(set(w) - expected)
        if extra:
            raise ValueError(f"load_numpy_weights: unexpected keys {extra}")
    return model


def export_numpy_weights(model: TorchLM) -> dict:
    """Inverse of load_numpy_weights: canonical key -> float32 numpy array."""
    out = {}
    for key, param, transpose in _canonical_params(model):
        t = param.detach().cpu().float()
        out[key] = np.ascontiguousarray((t.T if transpose else t).numpy())
    return out


# -----------------------------------------------------------------------------
# FLOP accounting and timing


def train_flops_per_token(
    vocab_size, d_model, n_layers, n_heads, n_kv_heads, head_dim, ffn_hidden, seq_len
) -> float:
    """Training FLOPs per token (PaLM paper, appendix B convention).

        flops = 6 * N + 12 * n_layers * seq_len * n_heads * head_dim

    N counts matmul parameters only:
        per layer  d*(H + 2*Hkv)*Dh  (wq, wk, wv)  + H*Dh*d  (wo)  + 3*d*F  (SwiGLU)
        plus       d*V               (lm_head)
    The embedding lookup, norms and elementwise ops are not counted. 6 = 2
    (multiply-add) x 3 (forward + backward, backward = 2x forward).

    Attention: forward FLOPs per token per layer = 4 * seq_len * H * Dh
    (2*T*H*Dh for QK^T and 2*T*H*Dh for AV), counted for the full T x T score
    matrix, i.e. causal masking is NOT discounted. Training = 3x forward, giving
    12 * n_layers * seq_len * H * Dh.
    """
    d, H, Hkv, Dh, F_, V = d_model, n_heads, n_kv_heads, head_dim, ffn_hidden, vocab_size
    per_layer = d * (H + 2 * Hkv) * Dh + H * Dh * d + 3 * d * F_
    n_matmul = n_layers * per_layer + d * V
    attn = 3 * n_layers * 4 * seq_len * H * Dh
    return float(6 * n_matmul + attn)


def _median_ms(times_s):
    return 1e3 * statistics.median(times_s)


def bench_torch_train(
    cfg: dict,
    batch_size: int,
    seq_len: int,
    steps: int = 20,
    warmup: int = 3,
    threads: int | None = None,
    lr: float = 3e-4,
    compile: bool = False,
) -> dict:
    """Time fp32 training steps of TorchLM(**cfg) on random tokens (CPU).

    One step = forward + mean CE loss + backward + AdamW step + zero_grad.
    Returns tokens_per_s (from the median step), step_ms (median),
    step_ms_all, n_params, threads.
    """
    n_threads = threads or os.cpu_count()
    torch.set_num_threads(n_threads)
    torch.manual_seed(0)
    model = TorchLM(**cfg)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(
        model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1
    )
    fwd = torch.compile(model) if compile else model
    model.train()

    g = torch.Generator().manual_seed(1234)
    data = torch.randint(0, cfg["vocab_size"], (batch_size, seq_len + 1), generator=g)
    x, y = data[:, :-1].contiguous(), data[:, 1:].contiguous()  # (B, T) each

    def step():
        _, loss = fwd(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)

    step_ms = _median_ms(times)
    return {
        "tokens_per_s": batch_size * seq_len / (step_ms / 1e3),
        "step_ms": step_ms,
        "step_ms_all": [1e3 * t for t in times],
        "n_params": n_params,
        "threads": n_threads,
    }


def torch_matmul_peak_flops(n: int = 1024, seconds: float = 1.0) -> float:
    """Measured fp32 FLOP/s of torch.mm on n x n matrices (median of repeats).

    Uses the current torch.get_num_threads(). Counts 2*n^3 FLOPs per matmul.
    """
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    out = torch.empty(n, n)
    for _ in range(3):  # warmup
        torch.mm(a, b, out=out)
    rates = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(rates) < 5:
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        rates.append(2.0 * n**3 / (time.perf_counter() - t0))
    return statistics.median(rates)


# -----------------------------------------------------------------------------
# KV-cache decoding (the peer of benchmarks/decode.py)


class TorchKVDecoder:
    """Greedy-decoding state of a :class:`TorchLM`: per layer a preallocated K/V cache
    (B, Hkv, max_len, Dh), filled by :meth:`prefill` and one position per :meth:`step`.

    Every row of the batch has the same length (the benchmark's fixed context). K/V are never
    repeated per query head (SDPA's ``enable_gqa`` where this torch has it, as in training).
    """

    def __init__(self, model: TorchLM, batch: int, max_len: int):
        self.model, self.batch, self.max_len = model, batch, max_len
        shape = (batch, model.n_kv_heads, max_len, model.head_dim)
        dtype = model.embed.weight.dtype
        self.k = [torch.zeros(shape, dtype=dtype) for _ in model.layers]
        self.v = [torch.zeros(shape, dtype=dtype) for _ in model.layers]
        self.cos, self.sin = rope_cos_sin(max_len, model.head_dim, model.rope_theta)
        self.length = 0

    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def _attend(self, i: int, x: torch.Tensor, start: int) -> torch.Tensor:
        """Layer i's attention for x (B, T, d) at positions start..start+T-1 (writes the cache)."""
        attn = self.model.layers[i].attn
        B, T, _ = x.shape
        H, Hkv, Dh = attn.n_heads, attn.n_kv_heads, attn.head_dim
        end = start + T
        cos, sin = self.cos[start:end], self.sin[start:end]
        q = apply_rope(attn.wq(x).view(B, T, H, Dh).transpose(1, 2), cos, sin)
        self.k[i][:, :, start:end] = apply_rope(attn.wk(x).view(B, T, Hkv, Dh).transpose(1, 2),
                                                cos, sin)
        self.v[i][:, :, start:end] = attn.wv(x).view(B, T, Hkv, Dh).transpose(1, 2)
        k, v = self.k[i][:, :, :end], self.v[i][:, :, :end]
        if T > 1:                      # prefill from position 0: causal over the prompt
            y = causal_attention(q, k, v)
        else:                          # one new token sees every cached key
            n_rep = H // Hkv
            if USE_SDPA_GQA:
                y = F.scaled_dot_product_attention(q, k, v, enable_gqa=n_rep > 1)
            else:
                y = F.scaled_dot_product_attention(q, k.repeat_interleave(n_rep, dim=1),
                                                   v.repeat_interleave(n_rep, dim=1))
        return attn.wo(y.transpose(1, 2).reshape(B, T, H * Dh))

    def _forward(self, tokens: torch.Tensor, start: int) -> torch.Tensor:
        x = self.model.embed(tokens)                                     # (B, T, d)
        for i, block in enumerate(self.model.layers):
            x = x + self._attend(i, block.attn_norm(x), start)
            x = x + block.ffn(block.ffn_norm(x))
        return self.model.lm_head(self.model.final_norm(x[:, -1]))      # (B, V)

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, P) -> logits (B, V) at the last prompt token; the cache holds 0..P-1."""
        if tokens.shape[1] > self.max_len:
            raise ValueError(f"prompt of {tokens.shape[1]} tokens > max_len {self.max_len}")
        logits = self._forward(tokens, 0)
        self.length = tokens.shape[1]
        return logits

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B,) at position ``length`` -> logits (B, V); length += 1."""
        if self.length >= self.max_len:
            raise ValueError(f"the cache is full ({self.max_len} positions)")
        logits = self._forward(tokens[:, None], self.length)
        self.length += 1
        return logits


def bench_torch_decode(model: TorchLM, prompt: torch.Tensor, new_tokens: int,
                       threads: int | None = None) -> dict:
    """Greedy decode of ``new_tokens`` after ``prompt`` (B, P); prefill is timed apart.

    Returns decode tokens/s (B * new_tokens / decode seconds), ms per step, prefill seconds and
    the generated ids (B, new_tokens) for cross-checking against another implementation.
    """
    n_threads = threads or os.cpu_count()
    torch.set_num_threads(n_threads)
    model.eval()
    B, P = prompt.shape
    dec = TorchKVDecoder(model, B, P + new_tokens)
    t0 = time.perf_counter()
    logits = dec.prefill(prompt)
    prefill_s = time.perf_counter() - t0
    out, step_s = [], []
    tok = logits.argmax(-1)
    for _ in range(new_tokens):
        out.append(tok)
        t0 = time.perf_counter()
        tok = dec.step(tok).argmax(-1)
        step_s.append(time.perf_counter() - t0)
    decode_s = sum(step_s)
    return {"tokens_per_s": B * new_tokens / decode_s, "step_ms": _median_ms(step_s),
            "prefill_s": prefill_s, "cache_bytes": dec.cache_bytes(), "threads": n_threads,
            "ids": torch.stack(out, 1).numpy()}


# -----------------------------------------------------------------------------
# CLI


def main(argv=None):
    p = argparse.ArgumentParser(description="PyTorch eager peer training throughput")
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=None, help="default d_model // heads")
    p.add_argument("--ffn-hidden", type=int, default=None, help="default 3 * d_model")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--peak-n", type=int, default=1024, help="matmul size for peak FLOP/s")
    args = p.parse_args(argv)

    cfg = dict(
        vocab_size=args.vocab,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
        n_kv_heads=args.kv_heads,
        head_dim=args.head_dim or args.d_model // args.heads,
        ffn_hidden=args.ffn_hidden or 3 * args.d_model,
    )
    res = bench_torch_train(
        cfg, args.batch, args.seq, steps=args.steps, warmup=args.warmup,
        threads=args.threads, lr=args.lr, compile=args.compile,
    )
    peak = torch_matmul_peak_flops(n=args.peak_n)  # same thread count as the bench
    fpt = train_flops_per_token(seq_len=args.seq, **cfg)
    out = {
        "framework": "torch",
        "torch_version": torch.__version__,
        "cfg": cfg,
        "batch_size": args.batch,
        "seq_len": args.seq,
        "dtype": "float32",
        "compile": args.compile,
        "sdpa_gqa": USE_SDPA_GQA,
        **res,
        "flops_per_token": fpt,
        "matmul_peak_flops": peak,
        "mfu": res["tokens_per_s"] * fpt / peak,
    }
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
