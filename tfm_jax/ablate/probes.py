"""Component probes of the ablation runner: what a trained model's norms, FFNs and heads do.

Pure numerics first (numpy, float64; each tested against a direct formula in
tests/unit/ablate/test_probes.py), then the measurements that feed them from a trained run (registered in
:data:`tfm_jax.ablate.measurements.MEASUREMENTS`):

* ``bn_eval``     -- validation loss on variable-length padded batches with BatchNorm's running
  statistics vs batch statistics (masked / unmasked), and at batch size 1 (seed Ch1.1.2).
* ``grad_norms``  -- gradient L2 norm per layer at initialisation and after training (Ch1.1.3).
* ``ffn_activity``-- share of zero / negative FFN pre-activations, effective rank of the FFN's
  input, hidden activation and output (the "ReLU loses ~50 %, 4d conserves d" claim, Ch1.2.2).
* ``ffn_memory``  -- FFN as key-value memory (Geva et al. 2021): top-activating contexts per key,
  the tokens each value vector promotes, and how often the two agree (Ch1.2.3).
* ``head_diversity`` -- attention-pattern entropy per head and similarity between heads (Ch1.3).

The activations come from Flax's ``capture_intermediates`` (module outputs), so the model code
needs no probe hooks; these probes need ``model.scan_layers: false``.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np

from tfm_jax.ablate.measurements import RunContext, Series, register
from tfm_jax.core import rundir

# --------------------------------------------------------------------------------------------
# Pure numerics (numpy).


def nonpositive_fraction(pre: np.ndarray) -> float:
    """Share of pre-activations <= 0: for ReLU exactly the share of hidden units that output 0.
    pre: (N, F)."""
    return float(np.mean(np.asarray(pre) <= 0))


def dead_fraction(pre: np.ndarray) -> float:
    """Share of hidden units never positive over the N probe tokens. pre: (N, F)."""
    return float(np.mean(np.all(np.asarray(pre) <= 0, axis=0)))


def effective_rank(x: np.ndarray) -> float:
    """Entropy effective rank (Roy & Vetterli 2007): ``exp(H(p))``, ``p = s / sum(s)`` over the
    singular values s of x (N, D) (uncentred). D for a well-spread matrix, 1 for rank one."""
    s = np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)
    s = s[s > 0]
    if s.size == 0:
        return 0.0
    p = s / s.sum()
    return float(np.exp(-np.sum(p * np.log(p))))


def energy_rank(x: np.ndarray, energy: float = 0.99) -> int:
    """Number of singular directions holding ``energy`` of the squared Frobenius norm of x."""
    s2 = np.square(np.linalg.svd(np.asarray(x, np.float64), compute_uv=False))
    if s2.sum() == 0:
        return 0
    return int(np.searchsorted(np.cumsum(s2) / s2.sum(), energy) + 1)


def causal_attention_probs(q: np.ndarray, k: np.ndarray, valid: Optional[np.ndarray] = None
                           ) -> np.ndarray:
    """Softmax attention weights of causal self-attention, GQA-aware.

    q (B, T, H, Dh), k (B, T, Hkv, Dh) (after RoPE), valid (B, T) bool key mask or None
    -> p (B, H, T, T), rows summing to 1 over the allowed keys (query head h uses K/V head
    h // (H / Hkv))."""
    q = np.asarray(q, np.float64)
    k = np.asarray(k, np.float64)
    b, t, h, dh = q.shape
    group = h // k.shape[2]
    kk = np.repeat(k, group, axis=2)                                     # (B, T, H, Dh)
    s = np.einsum("bqhd,bkhd->bhqk", q, kk) / math.sqrt(dh)             # (B, H, T, T)
    allowed = np.tril(np.ones((t, t), bool))[None, None]
    if valid is not None:
        allowed = allowed & np.asarray(valid, bool)[:, None, None, :]
    s = np.where(allowed, s, -np.inf)
    s = s - s.max(-1, keepdims=True)
    e = np.where(allowed, np.exp(s), 0.0)
    return e / e.sum(-1, keepdims=True)


def attention_entropy(p: np.ndarray, rows: Optional[np.ndarray] = None) -> np.ndarray:
    """Mean entropy (nats) of each head's attention rows. p (B, H, T, T); rows (B, T) bool
    selects the query rows counted (default all) -> (H,)."""
    p = np.asarray(p, np.float64)
    ent = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)  # (B,H,T)
    if rows is None:
        return ent.mean(axis=(0, 2))
    w = np.asarray(rows, np.float64)[:, None, :]
    return (ent * w).sum(axis=(0, 2)) / np.maximum(w.sum(axis=(0, 2)), 1.0)


def head_similarity(p: np.ndarray) -> np.ndarray:
    """Cosine similarity between the heads' attention maps, each flattened over (B, T, T).
    p (B, H, T, T) -> (H, H); 1 on the diagonal; identical patterns give 1 everywhere."""
    p = np.asarray(p, np.float64)
    flat = np.moveaxis(p, 1, 0).reshape(p.shape[1], -1)                  # (H, B*T*T)
    norm = np.linalg.norm(flat, axis=1)
    return (flat @ flat.T) / np.maximum(np.outer(norm, norm), 1e-300)


def mean_off_diagonal(m: np.ndarray) -> float:
    m = np.asarray(m, np.float64)
    n = m.shape[0]
    if n < 2:
        return float("nan")
    return float((m.sum() - np.trace(m)) / (n * (n - 1)))


def layer_of(path: tuple[str, ...]) -> Optional[int]:
    """Block index of a parameter path (``layers_3/...`` -> 3); ``layers/...`` (scanned,
    stacked on a leading axis) -> -1; anything else (embedding, final norm, head) -> None."""
    for part in path:
        if part.startswith("layers_") and part[7:].isdigit():
            return int(part[7:])
        if part == "layers":
            return -1
    return None


def per_layer_norms(flat_grads: dict[tuple[str, ...], np.ndarray], n_layers: int) -> np.ndarray:
    """L2 norm of the gradients of each block's parameters -> (n_layers,). Keys: parameter
    paths; scanned stacks (``layers/...``) are split along their leading axis."""
    sq = np.zeros(n_layers, np.float64)
    for path, g in flat_grads.items():
        g = np.asarray(g, np.float64)
        i = layer_of(path)
        if i is None:
            continue
        if i == -1:
            if g.shape[0] != n_layers:
                raise ValueError(f"scanned parameter {'/'.join(path)} has leading axis "
                                 f"{g.shape[0]}, expected n_layers={n_layers}")
            sq += np.square(g).reshape(n_layers, -1).sum(axis=1)
        else:
            sq[i] += np.square(g).sum()
    return np.sqrt(sq)


def top_activating(acts: np.ndarray, top: int) -> np.ndarray:
    """Indices of the ``top`` largest activations of each unit. acts (N, F) -> (F, top), the
    largest first."""
    a = np.asarray(acts)
    idx = np.argpartition(-a, top - 1, axis=0)[:top]                     # (top, F) unordered
    order = np.argsort(-np.take_along_axis(a, idx, axis=0), axis=0)
    return np.take_along_axis(idx, order, axis=0).T


def memory_agreement(top_targets: np.ndarray, promoted: np.ndarray) -> float:
    """Share of keys whose value's most promoted token is the most frequent next token among
    the key's top-activating positions. top_targets (F, top) ints, promoted (F,) ints."""
    hits = []
    for row, tok in zip(np.asarray(top_targets), np.asarray(promoted)):
        vals, counts = np.unique(row, return_counts=True)
        hits.append(vals[np.argmax(counts)] == tok)
    return float(np.mean(hits))


# --------------------------------------------------------------------------------------------
# Probe batches and captured activations.


def _corpus(ctx: RunContext):
    if "corpus" not in ctx.cache:
        from tfm_jax import data as data_lib
        d = ctx.cfg.data
        ctx.cache["corpus"] = data_lib.load_corpus(d.path, d.val_fraction, d.cache_dir,
                                                   include=d.include)
    return ctx.cache["corpus"]


def probe_batches(ctx: RunContext, n_batches: int, batch_size: int, truncate: float = 0.0,
                  seed: int = 1234) -> list[dict[str, np.ndarray]]:
    """Validation rows drawn like training rows (:func:`tfm_jax.data.train_batch` on the
    validation split), optionally cut to random lengths and padded (``truncate``)."""
    from tfm_jax import data as data_lib
    corpus = _corpus(ctx)
    return [data_lib.train_batch(corpus.val, corpus.val_doc_starts, step=i, seed=seed,
                                 batch_size=batch_size, seq_len=ctx.cfg.data.seq_len,
                                 random_truncate=truncate) for i in range(n_batches)]


def _need_unscanned(ctx: RunContext, what: str) -> None:
    if ctx.cfg.model.scan_layers:
        raise ValueError(f"{what} captures per-layer activations and needs model.scan_layers="
                         "false (scanned layers stack them); rerun the variant without scan")


def capture(ctx: RunContext, batch: dict[str, np.ndarray], names: tuple[str, ...]
            ) -> dict[str, np.ndarray]:
    """Module outputs of the trained model on one batch (eval mode): ``{"layers_i/attn/q_proj":
    array, ...}`` for every module whose own name is in ``names``."""
    import jax
    import jax.numpy as jnp
    from flax import traverse_util

    from tfm_jax.train import input_mask

    setup, state = ctx.restore()
    variables = {"params": state.params, **state.model_state}

    def keep(mdl, method_name):
        return method_name == "__call__" and mdl.name in names

    with setup.context():
        _, inter = setup.model.apply(
            variables, jnp.asarray(batch["inputs"]), token_mask=input_mask(
                jnp.asarray(batch["mask"])), train=False, capture_intermediates=keep,
            mutable=["intermediates"])
    flat = traverse_util.flatten_dict(jax.device_get(inter["intermediates"]))
    return {"/".join(k[:-1]): np.asarray(v[0] if isinstance(v, tuple) else v)
            for k, v in flat.items()}


# --------------------------------------------------------------------------------------------
# Measurements.


@register("bn_eval")
def measure_bn_eval(ctx: RunContext) -> dict[str, Any]:
    """Validation loss (nats/token over real tokens) on variable-length padded batches of the
    validation split, four ways: ``bn_loss_running`` (eval mode: BatchNorm's running
    statistics), ``bn_loss_batch_masked`` / ``bn_loss_batch_unmasked`` (train-mode batch
    statistics over the real tokens / over all positions, padding included),
    ``bn_loss_b1`` (batch statistics of each row alone: batch size 1). Also ``pad_fraction``.
    For LayerNorm / RMSNorm models the four agree (no cross-sample statistics): the check.

    Options: ``batches`` (8), ``batch_size`` (train.batch_size), ``truncate`` (0.75: rows keep
    a random 25-100 % of seq_len)."""
    import jax
    import jax.numpy as jnp

    from tfm_jax.model import TransformerLM
    from tfm_jax.train import input_mask, masked_ce_sum

    ctx.check_options({"batches", "batch_size", "truncate"})
    bs = int(ctx.option("batch_size", ctx.cfg.train.batch_size))
    batches = probe_batches(ctx, int(ctx.option("batches", 8)), bs,
                            float(ctx.option("truncate", 0.75)))
    setup, state = ctx.restore()
    variables = {"params": state.params, **state.model_state}
    mcfg = ctx.cfg.model
    models = {m: TransformerLM(mcfg.model_copy(update={"bn_masked": m}), ops=setup.ops,
                               moe=ctx.cfg.moe) for m in (True, False)}

    def loss_sums(model, batch, train):
        tm = input_mask(batch["mask"])
        if train:
            logits, _ = model.apply(variables, batch["inputs"], token_mask=tm, train=True,
                                    mutable=list(state.model_state))
        else:
            logits = model.apply(variables, batch["inputs"], token_mask=tm, train=False)
        return masked_ce_sum(logits, batch["targets"], batch["mask"]), batch["mask"].sum()

    fns = {"running": jax.jit(lambda b: loss_sums(models[True], b, False)),
           "batch_masked": jax.jit(lambda b: loss_sums(models[True], b, True)),
           "batch_unmasked": jax.jit(lambda b: loss_sums(models[False], b, True))}
    tot = {k: [0.0, 0.0] for k in (*fns, "b1")}
    pads = []
    with setup.context():
        for batch in batches:
            jb = {k: jnp.asarray(v) for k, v in batch.items()}
            pads.append(1.0 - float(batch["mask"].mean()))
            for k, f in fns.items():
                s, n = f(jb)
                tot[k][0] += float(s)
                tot[k][1] += float(n)
            for r in range(bs):
                s, n = fns["batch_masked"]({k: v[r:r + 1] for k, v in jb.items()})
                tot["b1"][0] += float(s)
                tot["b1"][1] += float(n)
    out = {f"bn_loss_{k}": v[0] / max(v[1], 1.0) for k, v in tot.items()}
    out["pad_fraction"] = float(np.mean(pads))
    return out


@register("grad_norms")
def measure_grad_norms(ctx: RunContext) -> dict[str, Any]:
    """Gradient L2 norm of each block's parameters on training-like batches, at
    initialisation (the run's seed) and for the trained model: the series ``grad_norms`` (by
    ``layer``: ``grad_norm_init``, ``grad_norm_final``), and ``grad_norm_last_over_first_init``
    / ``..._final`` (top block / bottom block: > 1 when gradients grow towards the output, as
    Xiong et al. 2020 derive for Post-LN at init). Options: ``batches`` (2), ``batch_size``
    (train.batch_size)."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn
    from flax import traverse_util

    from tfm_jax.train import input_mask, masked_ce_sum

    ctx.check_options({"batches", "batch_size"})
    bs = int(ctx.option("batch_size", ctx.cfg.train.batch_size))
    batches = probe_batches(ctx, int(ctx.option("batches", 2)), bs,
                            ctx.cfg.data.random_truncate)
    setup, state = ctx.restore()
    with setup.context():
        init = setup.init_state()
    n = ctx.cfg.model.n_layers
    model = setup.model

    def loss(params, model_state, batch):
        logits, _ = model.apply({"params": params, **model_state}, batch["inputs"],
                                token_mask=input_mask(batch["mask"]), train=True,
                                mutable=list(model_state))
        return masked_ce_sum(logits, batch["targets"], batch["mask"]) / batch["mask"].sum()

    grad = jax.jit(jax.grad(loss))
    norms = {}
    with setup.context():
        for label, st in (("init", init), ("final", state)):
            acc = np.zeros(n)
            for batch in batches:
                g = grad(st.params, st.model_state, {k: jnp.asarray(v) for k, v in batch.items()})
                flat = traverse_util.flatten_dict(jax.device_get(nn.meta.unbox(g)))
                acc += np.square(per_layer_norms(flat, n))
            norms[label] = np.sqrt(acc / len(batches))
    rows = [{"layer": i, "grad_norm_init": float(norms["init"][i]),
             "grad_norm_final": float(norms["final"][i])} for i in range(n)]
    return {"grad_norms": Series(("layer",), rows),
            "grad_norm_last_over_first_init": float(norms["init"][-1] / norms["init"][0]),
            "grad_norm_last_over_first_final": float(norms["final"][-1] / norms["final"][0])}


def _ffn_parts(ctx: RunContext, batches) -> list[dict[str, np.ndarray]]:
    """Per layer, over the probe tokens (real ones): ``pre`` (N, F) the (gate) pre-activation,
    ``act`` (N, F) the hidden activation, ``inp`` (N, d) the FFN input, ``out`` (N, d)."""
    import jax

    _need_unscanned(ctx, "this FFN probe")
    kind = ctx.cfg.model.ffn_type
    in_name = "ffn_norm" if ctx.cfg.model.norm_position == "pre" else "attn_norm"
    layers: list[dict[str, list]] = [dict(pre=[], act=[], inp=[], out=[])
                                     for _ in range(ctx.cfg.model.n_layers)]
    for batch in batches:
        cap = capture(ctx, batch, ("wi", "wi_0", "wi_1", "ffn", in_name))
        real = batch["mask"].reshape(-1) > 0
        for i, lay in enumerate(layers):
            p = f"layers_{i}"
            take = lambda a: a.reshape(-1, a.shape[-1])[real]  # noqa: E731
            if kind == "swiglu":
                gate, up = cap[f"{p}/ffn/wi_0"], cap[f"{p}/ffn/wi_1"]
                act = np.asarray(jax.nn.silu(gate)) * up
                pre = gate
            else:
                from tfm_jax.layers.ffn import ACTIVATIONS
                pre = cap[f"{p}/ffn/wi"]
                act = np.asarray(ACTIVATIONS[kind](pre))
            lay["pre"].append(take(pre))
            lay["act"].append(take(act))
            lay["inp"].append(take(cap[f"{p}/{in_name}"]))
            lay["out"].append(take(cap[f"{p}/ffn"]))
    return [{k: np.concatenate(v) for k, v in lay.items()} for lay in layers]


@register("ffn_activity")
def measure_ffn_activity(ctx: RunContext) -> dict[str, Any]:
    """FFN activations of the trained model on validation rows, per layer (series
    ``ffn_layers`` by ``layer``) and averaged over layers:

    * ``ffn_zero_fraction`` -- hidden activations exactly 0 (ReLU: = pre-activations <= 0;
      GELU / SwiGLU are 0 almost nowhere),
    * ``ffn_nonpositive_fraction`` -- (gate) pre-activations <= 0, any activation,
    * ``ffn_dead_fraction`` -- hidden units never positive on the probe tokens,
    * ``ffn_erank_in`` / ``ffn_erank_hidden`` / ``ffn_erank_out`` -- entropy effective rank
      (:func:`effective_rank`) of the FFN's input (N, d), hidden activation (N, F), output
      (N, d); ``ffn_erank_out_over_d`` = out / d; ``ffn_rank99_hidden`` -- directions holding
      99 % of the hidden activation's energy.

    Options: ``batches`` (4), ``batch_size`` (16)."""
    ctx.check_options({"batches", "batch_size"})
    batches = probe_batches(ctx, int(ctx.option("batches", 4)), int(ctx.option("batch_size", 16)))
    parts = _ffn_parts(ctx, batches)
    d = ctx.cfg.model.d_model
    rows = []
    for i, p in enumerate(parts):
        rows.append({"layer": i,
                     "ffn_zero_fraction": float(np.mean(p["act"] == 0)),
                     "ffn_nonpositive_fraction": nonpositive_fraction(p["pre"]),
                     "ffn_dead_fraction": dead_fraction(p["pre"]),
                     "ffn_erank_in": effective_rank(p["inp"]),
                     "ffn_erank_hidden": effective_rank(p["act"]),
                     "ffn_erank_out": effective_rank(p["out"]),
                     "ffn_rank99_hidden": energy_rank(p["act"], 0.99)})
    out: dict[str, Any] = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != "layer"}
    out["ffn_erank_out_over_d"] = out["ffn_erank_out"] / d
    out["ffn_probe_tokens"] = int(parts[0]["pre"].shape[0])
    out["ffn_layers"] = Series(("layer",), rows)
    return out


def _show(tokens: np.ndarray) -> str:
    """Bytes as readable text: printable ASCII as is, others escaped, specials named."""
    from tfm_jax.data import BOS_ID, EOS_ID, PAD_ID
    names = {BOS_ID: "<bos>", EOS_ID: "<eos>", PAD_ID: "<pad>"}
    out = []
    for t in np.asarray(tokens).tolist():
        if t in names:
            out.append(names[t])
        elif 32 <= t < 127 and chr(t) not in "|`":
            out.append(chr(t))
        else:
            out.append({10: "\\n", 9: "\\t", 124: "\\|", 96: "'"}.get(t, f"\\x{t:02x}"))
    return "".join(out)


@register("ffn_memory")
def measure_ffn_memory(ctx: RunContext) -> dict[str, Any]:
    """FFN as key-value memory (Geva et al. 2021) for one layer of the trained model. Key i is
    column i of the input kernel (the hidden unit's activation), value i row i of ``wo``; the
    tokens a value promotes are the top of ``value_i . W_head`` (times the final norm's scale
    with Pre-Norm). Over validation rows, each key's ``top`` most activating positions and their
    next tokens (the targets there) are compared with its value's most promoted token:

    * ``ffn_memory_agreement`` -- share of keys whose value's top token is the most frequent
      next token of their top-activating positions;
    * ``ffn_memory_agreement_shuffled`` -- the same with values paired to random keys (chance);
    * ``ffn_memory.md`` in the run directory -- for the ``keys`` keys with the largest top
      activations: the contexts (last ``context`` bytes, the position's token in [ ]), the next
      tokens and the promoted tokens, as text.

    Options: ``layer`` (-1: the last), ``batches`` (8), ``batch_size`` (16), ``top`` (10),
    ``keys`` (8), ``context`` (16)."""
    from flax import linen as nn
    from flax import traverse_util

    ctx.check_options({"layer", "batches", "batch_size", "top", "keys", "context"})
    n_layers = ctx.cfg.model.n_layers
    layer = int(ctx.option("layer", -1)) % n_layers
    top, n_keys, width = (int(ctx.option("top", 10)), int(ctx.option("keys", 8)),
                          int(ctx.option("context", 16)))
    batches = probe_batches(ctx, int(ctx.option("batches", 8)), int(ctx.option("batch_size", 16)))
    acts = _ffn_parts(ctx, batches)[layer]["act"]                          # (N, F)
    tokens = np.concatenate([b["inputs"].reshape(-1)[b["mask"].reshape(-1) > 0] for b in batches])
    targets = np.concatenate([b["targets"].reshape(-1)[b["mask"].reshape(-1) > 0]
                              for b in batches])
    # position -> (row, t) to print contexts
    where = np.concatenate([np.argwhere(b["mask"] > 0) + [j * b["mask"].shape[0], 0]
                            for j, b in enumerate(batches)])
    inputs = np.concatenate([b["inputs"] for b in batches])

    setup, state = ctx.restore()
    params = traverse_util.flatten_dict(nn.meta.unbox(state.params), sep="/")
    wo = np.asarray(params[f"layers_{layer}/ffn/wo/kernel"], np.float64)     # (F, d)
    if ctx.cfg.model.tie_embeddings:
        head = np.asarray(params["embed/embedding"], np.float64).T           # (d, V)
    else:
        head = np.asarray(params["lm_head/kernel"], np.float64)              # (d, V)
    if ctx.cfg.model.norm_position == "pre" and "final_norm/scale" in params:
        head = head * np.asarray(params["final_norm/scale"], np.float64)[:, None]
    promo = wo @ head                                                        # (F, V)
    vocab = 259 if ctx.cfg.data.tokenizer == "byte" else promo.shape[1]
    promo = promo[:, :vocab]                                                 # real ids only
    promoted = np.argmax(promo, axis=1)
    idx = top_activating(acts, top)                                          # (F, top)
    agree = memory_agreement(targets[idx], promoted)
    perm = np.random.default_rng(0).permutation(len(promoted))
    shuffled = memory_agreement(targets[idx], promoted[perm])

    strength = np.take_along_axis(acts.T, idx, axis=1).mean(axis=1)          # (F,)
    lines = [f"# FFN key-value memory, layer {layer} of {n_layers} ({ctx.variant}, seed "
             f"{ctx.seed})", "",
             f"{acts.shape[1]} keys over {acts.shape[0]} validation tokens; agreement (value's "
             f"top token == most frequent next token of the key's top {top} positions): "
             f"{agree:.3f} (values shuffled across keys: {shuffled:.3f}).", "",
             "| key | mean top act. | top-activating contexts ([token] -> next) | value promotes |",
             "|---|---|---|---|"]
    for f in np.argsort(-strength)[:n_keys]:
        ctxs = []
        for pos in idx[f][:5]:
            r, t = where[pos]
            left = _show(inputs[r, max(0, t - width + 1):t])
            ctxs.append(f"`{left}[{_show(inputs[r, t:t + 1])}]` -> `{_show(targets[pos:pos + 1])}`")
        best = np.argsort(-promo[f])[:5]
        lines.append(f"| {f} | {strength[f]:.3g} | {'<br>'.join(ctxs)} | "
                     f"{' '.join('`' + _show(np.array([b])) + '`' for b in best)} |")
    rundir.atomic_write(ctx.run_dir / "ffn_memory.md", "\n".join(lines) + "\n")
    return {"ffn_memory_agreement": agree, "ffn_memory_agreement_shuffled": shuffled}


@register("head_diversity")
def measure_head_diversity(ctx: RunContext) -> dict[str, Any]:
    """Attention patterns of the trained model on validation rows (queries and keys captured
    after their projections, RoPE applied as the model does, causal softmax recomputed in
    float64 by :func:`causal_attention_probs`):

    * ``attn_entropy`` -- mean entropy (nats) of the heads' attention rows (over layers, heads,
      rows); ``attn_entropy_uniform`` -- the same for uniform causal attention (the ceiling);
    * ``head_similarity`` -- mean cosine similarity between the attention maps of different
      heads of a layer (1 = every head looks at the same keys; not defined for one head);
    * the series ``heads`` (by ``layer``: both).

    Options: ``batches`` (2), ``batch_size`` (8)."""
    from tfm_jax.layers.rope import apply_rope, rope_tables

    ctx.check_options({"batches", "batch_size"})
    _need_unscanned(ctx, "head_diversity")
    m = ctx.cfg.model
    batches = probe_batches(ctx, int(ctx.option("batches", 2)), int(ctx.option("batch_size", 8)))
    ent, sim = np.zeros(m.n_layers), np.zeros(m.n_layers)
    t = ctx.cfg.data.seq_len
    uniform = float(np.mean(np.log(np.arange(1, t + 1))))
    for batch in batches:
        cap = capture(ctx, batch, ("q_proj", "k_proj"))
        b = batch["inputs"].shape[0]
        sincos = rope_tables(np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)),
                             m.resolved_head_dim, m.rope_theta)
        for i in range(m.n_layers):
            q = np.asarray(apply_rope(cap[f"layers_{i}/attn/q_proj"], sincos))
            k = np.asarray(apply_rope(cap[f"layers_{i}/attn/k_proj"], sincos))
            p = causal_attention_probs(q, k)
            ent[i] += attention_entropy(p).mean() / len(batches)
            sim[i] += mean_off_diagonal(head_similarity(p)) / len(batches)
    rows = [{"layer": i, "attn_entropy": float(ent[i]),
             **({"head_similarity": float(sim[i])} if m.n_heads > 1 else {})}
            for i in range(m.n_layers)]
    out: dict[str, Any] = {"attn_entropy": float(ent.mean()), "attn_entropy_uniform": uniform,
                           "heads": Series(("layer",), rows)}
    if m.n_heads > 1:
        out["head_similarity"] = float(sim.mean())
    return out
