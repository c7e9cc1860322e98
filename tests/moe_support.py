"""Shared by the MoE tests of both tiers: the numpy MoE reference, router and expert weights,
a mesh (tests/ is on sys.path through its conftest.py)."""

import numpy as np

from tfm_jax.config import load_config
from tfm_jax.parallel import mesh as mesh_lib

D, F = 16, 24


def _np_moe(x, wr, ks, top_k, cap, *, router="softmax", bias=None, valid=None):
    """float64 reference of one group: x (N, d) -> (y, keep, aux, z, counts). Padding
    (``valid`` False) takes no slot, has output 0 and counts in no statistic."""
    x = x.astype(np.float64)
    n = x.shape[0]
    valid = np.ones(n, bool) if valid is None else valid
    logits = x @ wr
    if router == "softmax":
        p = np.exp(logits - logits.max(1, keepdims=True))
        p = p / p.sum(1, keepdims=True)
        sel = p
    else:
        s = 1 / (1 + np.exp(-logits))
        sel = s + (0 if bias is None else bias)
        p = s / s.sum(1, keepdims=True)            # normalised scores (aux loss)
    e = p.shape[1]
    experts = np.argsort(-sel, axis=1, kind="stable")[:, :top_k]
    w = np.take_along_axis(p, experts, 1)
    if top_k > 1:
        w = w / w.sum(1, keepdims=True)
    elif router == "sigmoid":                      # top-1 weight: the raw score
        w = np.take_along_axis(s, experts, 1)
    keep, count = np.zeros((n, top_k), bool), np.zeros(e, int)
    for j in range(top_k):
        for i in range(n):
            if valid[i]:
                keep[i, j] = count[experts[i, j]] < cap
                count[experts[i, j]] += 1
    y = np.zeros_like(x)
    for i in range(n):
        for j in range(top_k):
            if keep[i, j]:
                ex = experts[i, j]
                g, u = x[i] @ ks["wi_0"][ex], x[i] @ ks["wi_1"][ex]
                y[i] += w[i, j] * ((g / (1 + np.exp(-g))) * u) @ ks["wo"][ex]
    counts = np.bincount(experts[valid].ravel(), minlength=e).astype(float)
    f = counts / (valid.sum() * top_k)
    aux = e * np.sum(f * p[valid].mean(0))
    lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    return y, keep, aux, np.mean(lse[valid] ** 2), counts


def _weights(n_experts, seed=0):
    r = np.random.default_rng(seed)
    wr = r.normal(0, 0.5, (D, n_experts)).astype(np.float32)
    ks = {k: r.normal(0, 0.3, s).astype(np.float32) for k, s in
          (("wi_0", (n_experts, D, F)), ("wi_1", (n_experts, D, F)), ("wo", (n_experts, F, D)))}
    return wr, ks


def _mesh(shape):
    cfg = load_config(None, ["moe.n_experts=8", f"mesh.data={shape[0]}",
                             f"mesh.expert={shape[1]}"])
    return mesh_lib.make_mesh(cfg.mesh), mesh_lib.rules_tuple(cfg.mesh.rules)
