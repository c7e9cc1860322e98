"""The claims ledger: every quantitative or testable claim of the seed document, with a verdict.

``tfm-jax claims`` writes ``CLAIMS.md``: one row per claim -- the claim (quoted short, with its
section), the seed's figure, the measured figure, the verdict, where it was measured and the
command that reproduces it. The ledger is data: :data:`CLAIMS` is a list of :class:`Claim`
records, each with a function that extracts its measured figure from a :class:`Sources` (the
studies' ``results.json`` files under ``studies/``) or computes it (the seed's arithmetic:
KV-cache table, FFN hidden size, Llama-3-8B weight bytes, FP8 format limits).

Verdicts: ``confirmed``, ``refuted``, ``arithmetic error`` (the seed's own numbers do not add
up; the correct value is given), ``not measurable here`` (with the reason), and ``results
missing`` (the study that measures it has not been run: the row names the command).
Verdicts of the studies (``holds`` / ``does not hold``) map to confirmed / refuted; a study's
wording can be overridden per record where the row's claim is narrower or wider than the
study's check.

This module imports no jax.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from typing import Any, Callable, Optional

CONFIRMED, REFUTED, ARITHMETIC = "confirmed", "refuted", "arithmetic error"
NOT_MEASURABLE, MISSING = "not measurable here", "results missing"
VERDICTS = (CONFIRMED, REFUTED, ARITHMETIC, NOT_MEASURABLE, MISSING)

# study name -> (results file under the repository root, command that produces it)
STUDIES: dict[str, tuple[str, str]] = {
    "norm": ("studies/norm_study/results.json",
             "tfm-jax ablate norm  (then copy runs/ablate/norm/results.* to studies/norm_study/)"),
    "norm_depth": ("studies/norm_study/depth/results.json",
                   "tfm-jax ablate norm_depth  (copy to studies/norm_study/depth/)"),
    "norm_speed": ("studies/norm_study/norm_speed.json",
                   "python benchmarks/norm_speed.py --out studies/norm_study/norm_speed.json"),
    "ffn": ("studies/ffn_study/results.json",
            "tfm-jax ablate ffn  (copy to studies/ffn_study/)"),
    "heads": ("studies/heads_study/results.json",
              "tfm-jax ablate heads  (copy to studies/heads_study/)"),
    "attention": ("studies/ablate_attention/results.json",
                  "tfm-jax ablate attention  (copy to studies/ablate_attention/)"),
    "quant": ("studies/quant_study/results.json",
              "python -m experiments.scripts.quant_study --run-dir runs/tiny-300"),
    "fp8_training": ("studies/fp8_training/results.json", "tfm-jax ablate fp8_training"),
    "fp8_error_sources": ("studies/fp8_error_sources/results.json",
                          "tfm-jax ablate fp8_error_sources  (copy to "
                          "studies/fp8_error_sources/)"),
    "moe": ("studies/moe_study/results.json",
            "tfm-jax ablate moe  (the MoE study; copy to studies/moe_study/)"),
}


class Missing(LookupError):
    """A study's results (or one of its rows) are not there; ``command`` produces them."""

    def __init__(self, msg: str, command: str):
        super().__init__(msg)
        self.command = command


@dataclasses.dataclass
class Finding:
    """What a claim's extractor found."""

    measured: str
    verdict: str
    where: str
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Claim:
    section: str                       # "Ch1.4.2"
    quote: str                         # the claim, short
    seed_figure: str                   # the seed's number(s), as written
    extract: Callable[["Sources"], Finding]
    command: str = "—"                 # reproduces the measured figure ("—": nothing to run)
    study: Optional[str] = None        # key of STUDIES whose results it reads


# --------------------------------------------------------------------------------------------
# Reading the studies' results.


def _claims_from_markdown(text: str) -> list[dict[str, Any]]:
    """The ``## Claims`` table of an ablation's results.md (for studies committed without
    their results.json): rows with claim, source, claimed, measured, verdict, where."""
    rows, inside = [], False
    for line in text.splitlines():
        if line.startswith("## "):
            inside = line.strip() == "## Claims"
            continue
        if not inside or not line.startswith("|") or line.startswith("|---"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if cells[0] == "#" or len(cells) < 7:
            continue
        rows.append(dict(zip(("n", "claim", "source", "claimed", "measured", "verdict", "where"),
                             cells)))
    return rows


class Sources:
    """The studies' results under ``root`` (the repository), read once each."""

    def __init__(self, root: pathlib.Path | str):
        self.root = pathlib.Path(root)
        self._cache: dict[str, Any] = {}

    def results(self, study: str) -> dict[str, Any]:
        if study not in self._cache:
            rel, command = STUDIES[study]
            path = self.root / rel
            if path.is_file():
                self._cache[study] = json.loads(path.read_text())
            elif path.with_suffix(".md").is_file():
                md = path.with_suffix(".md").read_text()
                where = re.search(r"^Where: (.*?)\s*$", md, re.M)
                self._cache[study] = {"claims": _claims_from_markdown(md), "from_markdown": True,
                                      "where": where.group(1) if where else ""}
            else:
                raise Missing(f"{rel} not found", command)
        return self._cache[study]

    def claim_row(self, study: str, contains: str) -> dict[str, Any]:
        """The study's claims-table row whose claim text contains ``contains``."""
        rows = [r for r in self.results(study).get("claims", [])
                if contains.lower() in str(r.get("claim", "")).lower()]
        if not rows:
            raise Missing(f"no claim containing {contains!r} in {STUDIES[study][0]}",
                          STUDIES[study][1])
        return rows[0]


def fmt(x: Any) -> str:
    """A measured value for the table: 4 significant digits, text as is."""
    if isinstance(x, bool) or x is None:
        return str(x)
    if isinstance(x, (int, float)):
        if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
            return f"{x:.3g}"
        return f"{x:.4g}"
    return str(x)


def study_verdict(v: str) -> str:
    """An ablation study's verdict in the ledger's words."""
    v = str(v)
    if v == "holds":
        return CONFIRMED
    if v == "does not hold":
        return REFUTED
    if v in ("not measured", "") or v.startswith("error"):
        return MISSING
    return v


def from_study(study: str, contains: str, *, verdict: Optional[str] = None,
               measured: Optional[Callable[[Any], str]] = None,
               note: str = "") -> Callable[[Sources], Finding]:
    """Extractor reading one row of a study's claims table (``contains``: part of its claim
    text). ``verdict`` overrides the study's (where the ledger's claim is worded differently);
    ``measured`` formats the row's measured value (default :func:`fmt`)."""
    def extract(src: Sources) -> Finding:
        row = src.claim_row(study, contains)
        m = row.get("measured")
        v = study_verdict(row.get("verdict", ""))
        if v == MISSING:
            raise Missing(f"{STUDIES[study][0]}: {contains!r} was not measured "
                          f"({row.get('verdict')})", STUDIES[study][1])
        return Finding((measured or fmt)(m), verdict or v,
                       str(row.get("where") or src.results(study).get("where", "")),
                       note or str(row.get("note") or ""))
    return extract


def metric(src: Sources, study: str, name: str, variant: str) -> float:
    """Mean over seeds of a scalar metric of an ablation study."""
    res = src.results(study)
    try:
        return float(res["aggregates"]["scalars"][variant][name]["mean"])
    except (KeyError, TypeError):
        raise Missing(f"{name}[{variant}] not in {STUDIES[study][0]}", STUDIES[study][1]) from None


def where_of(src: Sources, study: str) -> str:
    w = src.results(study).get("where", "")
    return re.sub(r"\s+", " ", str(w))


# --------------------------------------------------------------------------------------------
# Arithmetic checks (no study needed).


def kv_table_finding(kind: str, seed_mb: float) -> Callable[[Sources], Finding]:
    """Llama-3-8B KV cache at seq 4096, batch 1, bf16 by the formula (tfm_jax.config.sizing)."""
    def extract(src: Sources) -> Finding:
        from tfm_jax.config import load_config
        from tfm_jax.config.sizing import kv_cache_bytes

        cfg = load_config("llama3-8b")
        kv = {"MHA": 32, "GQA": 8, "MQA": 1}[kind]
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"n_kv_heads": kv})})
        mib = kv_cache_bytes(cfg, 4096, 1, "bf16")["total_bytes"] / 2**20
        return Finding(f"{mib:,.0f} MiB", ARITHMETIC if abs(mib - seed_mb) / mib > 0.05
                       else CONFIRMED, "arithmetic (tfm_jax.config.sizing), any machine",
                       f"2 x {kv} K/V heads x 128 x 2 B x 32 layers x 4096 tokens; the seed's "
                       f"figure is {seed_mb / mib:.3g} of it (the ratios between rows hold)")
    return extract


def llama_ffn_hidden(src: Sources) -> Finding:
    from tfm_jax.config import ffn_hidden_size

    plain = ffn_hidden_size(4096, "swiglu")
    llama = ffn_hidden_size(4096, "swiglu", 4.0, 1.3, 1024)
    return Finding(f"(2/3)*4*4096 = {plain:,}; 14,336 = Llama-3 rule with ffn_dim_multiplier 1.3 "
                   f"and multiple_of 1024 -> {llama:,}", ARITHMETIC,
                   "arithmetic (tfm_jax.config.ffn_hidden_size)",
                   "14336 = 3.5 x 4096 is 31 % more than (2/3)*4d; the SwiGLU FFN then has "
                   f"{3 * 14336 / (2 * 4 * 4096):.3f}x the parameters of a ReLU 4d FFN, not 1x")


def llama_weights(src: Sources) -> Finding:
    from tfm_jax.config import load_config, param_counts

    n = param_counts(load_config("llama3-8b").model)["total"]
    gb = 2 * n / 1e9
    return Finding(f"bf16 weights alone: {n / 1e9:.2f} B params x 2 B = {gb:.2f} GB", ARITHMETIC,
                   "arithmetic (tfm_jax.config.param_counts, llama3-8b)",
                   "every total in the table (14.2 / 11.8 / 10.9 GB) is below the weights' own "
                   "bytes, and MHA - GQA = 2.4 GB is 4.7x the KV difference even by the correct "
                   "formula (1.5 GiB); the GQA model also has fewer K/V weights, but 0.2 GB")


def fp8_max(src: Sources) -> Finding:
    import ml_dtypes
    import numpy as np

    m = float(np.finfo(ml_dtypes.float8_e4m3fn).max)
    return Finding(f"{m:g}", CONFIRMED if m == 448.0 else REFUTED,
                   "ml_dtypes.finfo(float8_e4m3fn), any machine",
                   "e4m3fn (OCP / NVIDIA); Gaudi2's e4m3 (fnuz-like range) tops at 240")


def ratio_finding(num: float, den: float, seed_ratio: float, what: str,
                  where: str = "arithmetic on the seed's own table", rel_tol: float = 0.01
                  ) -> Callable[[Sources], Finding]:
    """Internal consistency of two of the seed's numbers and the ratio it states (within
    ``rel_tol``)."""
    def extract(src: Sources) -> Finding:
        r = num / den
        ok = abs(r - seed_ratio) <= rel_tol * abs(seed_ratio) + 0.005
        return Finding(f"{what}: {num:g} / {den:g} = {r:.4g}", CONFIRMED if ok else ARITHMETIC,
                       where, "consistent with the stated ratio; the figures themselves are "
                       "not measurable here" if ok else f"the stated ratio is {seed_ratio:g}")
    return extract


def not_measurable(reason: str, measured: str = "—", where: str = "—"
                   ) -> Callable[[Sources], Finding]:
    return lambda src: Finding(measured, NOT_MEASURABLE, where, reason)


def computed(fn: Callable[[Sources], tuple[str, str, str, str]]) -> Callable[[Sources], Finding]:
    """Extractor from a function returning (measured, verdict, where, note)."""
    return lambda src: Finding(*fn(src))


# --------------------------------------------------------------------------------------------
# Rows the studies' metrics give directly.


def norm_speed(src: Sources) -> Finding:
    """The op timing of benchmarks/norm_speed.py: confirmed when RMSNorm's forward takes
    5-25 % less time than LayerNorm's (mean over widths; "~15 %" on a shared CPU cannot be
    pinned closer); the forward + backward ratio is reported beside it."""
    res = src.results("norm_speed")
    rows = res["rows"]
    parts = [f"d={r['d']}: fwd {r['rms_over_ln_fwd']:.2f}x, fwd+bwd {r['rms_over_ln_fwd_bwd']:.2f}x"
             for r in rows]
    saving = 1 - sum(r["rms_over_ln_fwd"] for r in rows) / len(rows)
    saving_fb = 1 - sum(r["rms_over_ln_fwd_bwd"] for r in rows) / len(rows)
    verdict = CONFIRMED if 0.05 <= saving <= 0.25 else REFUTED
    return Finding("RMSNorm / LayerNorm time: " + "; ".join(parts), verdict,
                   res.get("where", ""), f"mean saving: forward {saving:.0%}, forward + backward "
                   f"{saving_fb:.0%} (claim: 15 %; verdict on the forward op, 5-25 %); jitted "
                   "XLA ops timed side by side on a CPU loaded by other jobs")


def ffn_hidden_rank(src: Sources) -> Finding:
    zero = metric(src, "ffn", "ffn_zero_fraction", "relu_4d")
    er_h = metric(src, "ffn", "ffn_erank_hidden", "relu_4d")
    er_o = metric(src, "ffn", "ffn_erank_out", "relu_4d")
    d = 128
    ok = abs(er_o / d - 1) <= 0.2 and abs(er_h / d - 2) <= 0.4
    return Finding(f"ReLU 4d (d={d}): zeros {zero:.1%}; effective rank hidden {er_h:.0f} "
                   f"({er_h / d:.2f}d), output {er_o:.0f} ({er_o / d:.2f}d)",
                   CONFIRMED if ok else REFUTED, where_of(src, "ffn"),
                   "the '(1/2)(1/2)4d = d' model predicts hidden ~2d and output ~d; "
                   "effective rank = exp(entropy of the normalised singular values)")


def ffn_width(src: Sources) -> Finding:
    vals = {v: metric(src, "ffn", "val_loss", v) for v in ("relu_1d", "relu_2d", "relu_4d",
                                                           "relu_8d")}
    row = src.claim_row("ffn", "4d is the best width")
    return Finding("val loss " + ", ".join(f"{k[5:]} {v:.3f}" for k, v in vals.items()),
                   study_verdict(row["verdict"]), str(row.get("where", "")),
                   "at equal steps; the wider FFN has more parameters (8d: ~2x the FFN of 4d)")


def head_similarity(src: Sources) -> Finding:
    vals = {v: metric(src, "heads", "head_similarity", v) for v in ("mha", "gqa", "mqa")}
    ent = {v: metric(src, "heads", "attn_entropy", v) for v in ("single", "mha", "gqa", "mqa")}
    row = src.claim_row("heads", "MQA's shared K/V")
    return Finding("head similarity " + ", ".join(f"{k} {v:.3f}" for k, v in vals.items())
                   + "; attention entropy (nats) " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                              ent.items()),
                   study_verdict(row["verdict"]), str(row.get("where", "")),
                   "cosine similarity of different heads' attention maps in a layer, mean over "
                   "layers; one seed")


def depth_divergence(src: Sources) -> Finding:
    res = src.results("norm_depth")
    sc = res["aggregates"]["scalars"]
    parts = []
    for v in sc:
        if "diverged" in sc[v]:
            parts.append(f"{v} {sc[v]['diverged']['mean']:.2f}")
    row = src.claim_row("norm_depth", "Post-Norm is hard to train")
    row2 = src.claim_row("norm_depth", "Pre-Norm trains stably")
    v1, v2 = study_verdict(row["verdict"]), study_verdict(row2["verdict"])
    return Finding("divergence rate: " + ", ".join(parts),
                   CONFIRMED if (v1, v2) == (CONFIRMED, CONFIRMED) else REFUTED,
                   str(row.get("where", "")),
                   "diverged = NaN/inf or final val loss above the unigram cross-entropy; "
                   "w = 20 warmup steps, nw = none; no gradient clipping")


def depth_gradients(src: Sources) -> Finding:
    """Per-layer gradient norms of the 24-layer runs: top / bottom block at init and after
    training, and the smallest / largest block norm after training. Confirmed when every
    Pre-Norm run's spread (max / min over blocks) is smaller than every Post-Norm run's, at
    init and after training."""
    res = src.results("norm_depth")
    series = res["aggregates"]["series"]
    rows = next(v["rows"] for v in series.values() if v["rows"] and "grad_norm_init" in
                v["rows"][0])
    spread: dict[str, dict[str, float]] = {}
    for v in ("pre24_w", "pre24_nw", "post24_w", "post24_nw"):
        for when in ("init", "final"):
            vals = [r[f"grad_norm_{when}"]["mean"] for r in rows
                    if r["variant"] == v and f"grad_norm_{when}" in r]
            if not vals:
                raise Missing(f"grad_norm_{when} of {v} not in {STUDIES['norm_depth'][0]}",
                              STUDIES["norm_depth"][1])
            spread.setdefault(v, {})[when] = max(vals) / max(min(vals), 1e-30)
    ok = all(max(spread[p][w] for p in ("pre24_w", "pre24_nw"))
             < min(spread[q][w] for q in ("post24_w", "post24_nw")) for w in ("init", "final"))
    text = "; ".join(f"{v}: max/min over blocks {spread[v]['init']:.3g} at init, "
                     f"{spread[v]['final']:.3g} after" for v in spread)
    return Finding(text, CONFIRMED if ok else REFUTED, where_of(src, "norm_depth"),
                   "gradient L2 norm per block on one training batch; a large max/min is an "
                   "uneven (exploding or vanishing) gradient across depth")


def moe_stand_in(keyword: str, reason: str) -> Callable[[Sources], Finding]:
    """A hardware claim the MoE study can only approach with a stand-in (fused vs explicit
    dispatch on XLA:CPU): its figure is reported, the verdict stays ``not measurable here``."""
    base = moe_row(keyword, reason)

    def extract(src: Sources) -> Finding:
        f = base(src)
        if f.verdict == NOT_MEASURABLE:
            return f
        return Finding(f"{f.measured} (stand-in: 1 - implicit / explicit collective bytes, "
                       "XLA:CPU)", NOT_MEASURABLE, f.where,
                       f"{reason}; the closest analogue here, sharding-annotated (implicit) "
                       "against explicit all_to_all dispatch, is reported, not judged")
    return extract


def moe_row(keyword: str, fallback_reason: str) -> Callable[[Sources], Finding]:
    """A row of the MoE study (another helper's): its claims-table row mentioning
    ``keyword``, else the reason it cannot be measured."""
    def extract(src: Sources) -> Finding:
        try:
            row = src.claim_row("moe", keyword)
        except Missing as err:
            if "not found" in str(err):
                raise
            return Finding("—", NOT_MEASURABLE, "—", fallback_reason)
        return Finding(fmt(row.get("measured")), study_verdict(row.get("verdict", "")),
                       str(row.get("where", "")), str(row.get("note") or ""))
    return extract


# --------------------------------------------------------------------------------------------
# The ledger.

A = "tfm-jax ablate attention"
CLAIMS: list[Claim] = [
    # ---------------------------------------------------------------- Ch1.1 normalization
    Claim("Ch1.1.2", "BatchNorm: padding pollutes the statistics of variable-length batches "
          "(same model, padding in the statistics or not)", "qualitative (❌ for BN)",
          from_study("norm", "same trained model"), "tfm-jax ablate norm", "norm"),
    Claim("Ch1.1.2", "... so BatchNorm with padding in its statistics trains worse (unmasked vs "
          "masked BN, validation loss)", "qualitative (❌ for BN)",
          from_study("norm", "unmasked BN trains worse"), "tfm-jax ablate norm", "norm"),
    Claim("Ch1.1.2", "BatchNorm: train/inference mismatch (batch vs running statistics)",
          "qualitative", from_study("norm", "train/inference mismatch", note=(
              "batch statistics in a causal LM also mix positions, so train mode sees "
              "statistics of future tokens: the running-statistics loss (inference) is far "
              "above the train-mode loss")), "tfm-jax ablate norm", "norm"),
    Claim("Ch1.1.2", "LayerNorm: identical logic in training and inference", "qualitative (✅)",
          from_study("norm", "LayerNorm is consistent"), "tfm-jax ablate norm", "norm"),
    Claim("Ch1.1.2", "BatchNorm at batch size 1: noisy statistics", "qualitative",
          from_study("norm", "batch size 1"), "tfm-jax ablate norm", "norm"),
    Claim("Ch1.1.2", "LayerNorm does not depend on the batch size", "qualitative (✅)",
          from_study("norm", "LayerNorm does not depend"), "tfm-jax ablate norm", "norm"),
    Claim("Ch1.1", "LayerNorm wins over BatchNorm for NLP's variable-length sequences",
          "qualitative", from_study("norm", "LayerNorm trains better"),
          "tfm-jax ablate norm", "norm"),
    Claim("Ch1.1.3", "Post-Norm: hard to train deep, depends on warmup; Pre-Norm: very stable",
          "qualitative", depth_divergence, "tfm-jax ablate norm_depth", "norm_depth"),
    Claim("Ch1.1.3", "Post-Norm depends on warmup (loss without vs with warmup, 24 layers)",
          "qualitative", from_study("norm_depth", "depends on warmup"),
          "tfm-jax ablate norm_depth", "norm_depth"),
    Claim("Ch1.1.3", "Pre-Norm: gradients flow more smoothly (per-layer gradient norms, 24 "
          "layers)", "qualitative", depth_gradients, "tfm-jax ablate norm_depth", "norm_depth"),
    Claim("Ch1.1.4", "RMSNorm drops the mean subtraction: ~15 % less compute (the op)", "-15 %",
          norm_speed, STUDIES["norm_speed"][1], "norm_speed"),
    Claim("Ch1.1.4", "... end to end (training step time, RMSNorm vs LayerNorm)", "-15 %",
          from_study("norm", "RMSNorm cuts compute"), "tfm-jax ablate norm", "norm"),
    Claim("Ch1.1.4", "RMSNorm: accuracy loss negligible", "negligible",
          from_study("norm", "RMSNorm loses no accuracy"), "tfm-jax ablate norm", "norm"),
    # ---------------------------------------------------------------- Ch1.2 FFN
    Claim("Ch1.2.2", "ReLU zeroes ≈50 % of the FFN neurons", "≈50 %",
          from_study("ffn", "ReLU zeroes", measured=lambda m: f"{float(m):.1%}", note=(
              "trained ReLU FFN, mean over layers; ~50 % holds only at initialisation "
              "(symmetric pre-activations); the trained layers are sparser")),
          "tfm-jax ablate ffn", "ffn"),
    Claim("Ch1.2.2", "4d conserves information: (1/2)·(1/2)·4d = d effective dimensions",
          "hidden 2d, output d", ffn_hidden_rank, "tfm-jax ablate ffn", "ffn"),
    Claim("Ch1.2.2", "4d is the optimum width under information conservation", "4d optimal",
          ffn_width, "tfm-jax ablate ffn", "ffn"),
    Claim("Ch1.2.3", "FFN is a key-value memory (values promote keys' next tokens)",
          "qualitative (Geva et al.)", from_study("ffn", "key-value memory"),
          "tfm-jax ablate ffn  (tables: studies/ffn_study/ffn_memory_<variant>.md)",
          "ffn"),
    Claim("Ch1.2.4", "SwiGLU: gating improves expressiveness, converges faster (vs ReLU, equal "
          "parameters)", "qualitative", from_study("ffn", "SwiGLU at (2/3)*4d beats"),
          "tfm-jax ablate ffn", "ffn"),
    Claim("Ch1.2.4", "hidden (2/3)·4d keeps SwiGLU's parameters ≈ ReLU-FFN's", "≈ equal",
          from_study("ffn", "has the parameters", measured=lambda m: f"ratio {float(m):.4f}"),
          "tfm-jax ablate ffn", "ffn"),
    Claim("Ch1.2.4", "Llama: d=4096 -> hidden = (2/3)·4d = 14336", "14336", llama_ffn_hidden,
          "python -c \"from tfm_jax.config import ffn_hidden_size as f; "
          "print(f(4096,'swiglu'), f(4096,'swiglu',4.0,1.3,1024))\""),
    # ---------------------------------------------------------------- Ch1.3 MHA
    Claim("Ch1.3", "MHA raises throughput 2.1× vs an equivalent single head (H100)", "2.1×",
          from_study("attention", "2.1x faster", note="CPU measures the shape only; the H100 "
                     "figure is not measurable here (no GPU lent)"), A, "attention"),
    Claim("Ch1.3.2", "MHA computes more than a single head (Q/K/V projections)", "more FLOPs",
          from_study("attention", "needs more compute", note="equal FLOPs and parameters at "
                     "equal d_model: the claim is wrong by construction"), A, "attention"),
    Claim("Ch1.3.2", "heads learn different subspaces: no attention collapse", "qualitative",
          from_study("heads", "heads learn different patterns"), "tfm-jax ablate heads", "heads"),
    Claim("Ch1.3.2", "multiple heads generalize better", "qualitative",
          from_study("attention", "generalize better"), A, "attention"),
    Claim("Ch1.3.2", "multiple heads converge faster", "qualitative",
          from_study("attention", "converge faster"), A, "attention"),
    Claim("Ch1.3.2", "multiple heads give a smoother loss curve", "qualitative",
          from_study("attention", "smoother loss"), A, "attention"),
    # ---------------------------------------------------------------- Ch1.4 GQA / MQA
    Claim("Ch1.4.1", "GQA cuts the KV cache 4× (Llama-3: 32 -> 8 K/V heads)", "4×",
          from_study("attention", "GQA cuts the KV cache"), "tfm-jax kv-cache --config llama3-8b",
          "attention"),
    Claim("Ch1.4.1", "MQA: KV cache 2·L·d_k (h× smaller than MHA)", "32× (Llama-3)",
          from_study("attention", "MQA cuts the KV cache"), "tfm-jax kv-cache --config llama3-8b",
          "attention"),
    Claim("Ch1.4.2", "Llama-3-8B seq 4k: KV cache MHA 640 MB", "640 MB",
          kv_table_finding("MHA", 640), "tfm-jax kv-cache --config llama3-8b"),
    Claim("Ch1.4.2", "... GQA (g=8) 160 MB", "160 MB", kv_table_finding("GQA", 160),
          "tfm-jax kv-cache --config llama3-8b"),
    Claim("Ch1.4.2", "... MQA 20 MB", "20 MB", kv_table_finding("MQA", 20),
          "tfm-jax kv-cache --config llama3-8b"),
    Claim("Ch1.4.2", "memory in all: MHA 14.2 GB, GQA 11.8 GB, MQA 10.9 GB", "14.2 / 11.8 / 10.9 GB",
          llama_weights, "tfm-jax config show --config llama3-8b"),
    Claim("Ch1.4.2", "decode throughput GQA 2460 vs MHA 1820 tok/s", "1.35×",
          ratio_finding(2460, 1820, 1.35, "seed's GQA/MHA"), 'python -c "print(2460 / 1820)"'),
    Claim("Ch1.4.2", "... measured shape: GQA decodes faster than MHA (seq 4k, batch 1)", "1.35×",
          from_study("attention", "decode throughput GQA 2460", note="CPU, d128 model: the "
                     "shape of the claim, not the H100 figure"), A, "attention"),
    Claim("Ch1.4.2", "MQA decodes 1.47× faster than MHA (2680 vs 1820 tok/s)", "1.47×",
          from_study("attention", "MQA decodes 1.47x"), A, "attention"),
    Claim("Ch1.4", "GQA costs only +0.12 PPL vs MHA", "+0.12",
          from_study("attention", "GQA costs only", note="byte-level PPL of a 0.9 M-parameter "
                     "model is not Llama-3-8B's token PPL: the absolute figure is not "
                     "comparable"), A, "attention"),
    Claim("Ch1.4.2", "MQA costs +0.35 PPL vs MHA", "+0.35",
          from_study("attention", "MQA costs +0.35"), A, "attention"),
    Claim("Ch1.4.3", "GQA > MQA: MQA's shared K/V collapse head diversity (quality)",
          "qualitative", from_study("attention", "GQA keeps more quality"), A, "attention"),
    Claim("Ch1.4.3", "... head diversity: MQA heads more alike than MHA's", "qualitative",
          head_similarity, "tfm-jax ablate heads", "heads"),
    # ---------------------------------------------------------------- Ch2.1 quantization terms
    Claim("Ch2.1.2", "FP32 -> INT8 is quantization: outputs in {-128..127}", "definition",
          not_measurable("a definition, not a measurable quantity (tfm_jax.quant.qdq "
                         "implements both INT8 and FP8 with scales; tests check the code sets)")),
    Claim("Ch2.1.2", "BF16 -> FP8 is not quantization (float set, no integer codebook)",
          "definition", not_measurable("terminology: FP8 is a finite set of 256 codes (254 "
                                       "finite values for e4m3fn) -- a codebook that is not "
                                       "uniform; whether to call it quantization is a naming "
                                       "choice, not a testable claim")),
    # ---------------------------------------------------------------- Ch2.2 FP8 scaling
    Claim("Ch2.2.1", "E4M3 max representable value 448", "448", fp8_max,
          "python -c \"import ml_dtypes, numpy; print(numpy.finfo(ml_dtypes.float8_e4m3fn).max)\""),
    Claim("Ch2.2", "scale = FP8_MAX/amax compresses; reversed it overflows (inf)",
          "overflow when reversed",
          from_study("quant", "scale = FP8_MAX/amax", verdict=REFUTED,
                     note="the direction is right; reversed, small tensors underflow (flush to "
                     "0); overflow needs amax > FP8_MAX, and e4m3fn has no inf (NaN)"),
          STUDIES["quant"][1], "quant"),
    Claim("Ch2.2.2", "log-scale (power-of-two) scales avoid floating-point error",
          "qualitative", from_study("quant", "log-scale", verdict=REFUTED),
          STUDIES["quant"][1], "quant"),
    Claim("Ch2.2.2 / 2.4.2", "EMA smoothing of the scale (β=0.999) prevents jitter", "β=0.999",
          from_study("quant", "EMA smoothing", verdict=REFUTED,
                     note="it smooths, and so lags: with a drifting amax β=0.999 saturates "
                     "~7.5 % of values; delayed (amax history) scaling does not"),
          STUDIES["quant"][1], "quant"),
    Claim("Ch2.2.2", "per-channel scales: QKV accuracy up; FFN fine per tensor", "qualitative",
          from_study("quant", "per-channel", verdict=REFUTED),
          STUDIES["quant"][1], "quant"),
    # ---------------------------------------------------------------- Ch2.3 static vs dynamic
    Claim("Ch2.3.1", "dynamic scaling: < 0.5 PPL loss (H100)", "< 0.5 PPL",
          from_study("quant", "dynamic scaling loses", verdict=CONFIRMED),
          STUDIES["quant"][1], "quant"),
    Claim("Ch2.3.1", "dynamic scaling: ≈2 % latency overhead (amax)", "≈2 %",
          from_study("quant", "≈2 % latency", verdict=REFUTED,
                     note="shape-dependent: 1.8 % only for a 4096x2048x2048 GEMM, 4-24 % for "
                     "the small ones"), STUDIES["quant"][1], "quant"),
    Claim("Ch2.3.2", "static scaling: distribution shift collapses accuracy", "qualitative",
          from_study("quant", "distribution shift", verdict=CONFIRMED),
          STUDIES["quant"][1], "quant"),
    Claim("Ch2.3.2", "static FP8 on HPU: throughput ↑3.2× (MLPerf)", "3.2×",
          not_measurable("needs Gaudi hardware and FP8 GEMMs; the static recipe computes no "
                         "amax at runtime by construction (tfm_jax.quant, fp8_static)")),
    Claim("Ch2.3.2", "Llama-2-7B static FP8 3872 qps vs A100 BF16 1186 qps", "3.26×",
          ratio_finding(3872, 1186, 3.2, "seed's qps", "arithmetic on the seed's numbers",
                        rel_tol=0.03),
          'python -c "print(3872 / 1186)"'),
    # ---------------------------------------------------------------- Ch2.4 FP8 training
    Claim("Ch2.4", "HPU is the only platform with FP8 weight storage + dynamic scale updates",
          "only HPU",
          not_measurable("a market claim; as software it is not unique: tfm-jax trains with FP8 "
                         "weight storage and delayed scaling on any backend "
                         "(studies/fp8_training)")),
    Claim("Ch2.4.3", "FP8 weight storage cuts memory 7.4 % (46.2 -> 42.8 GB)", "-7.4 %",
          from_study("fp8_training", "cuts memory by 7.4%",
                     measured=lambda m: f"{float(m):+.1%} persistent state (fp32 baseline)"),
          "tfm-jax ablate fp8_training", "fp8_training"),
    Claim("Ch2.4.3", "... 42.8 / 46.2 = -7.4 % (the seed's own numbers)", "-7.4 %",
          ratio_finding(42.8, 46.2, 0.926, "seed's memory"), 'python -c "print(42.8 / 46.2)"'),
    Claim("Ch2.4.3", "FP8 training throughput +5.5 % (1280 -> 1350 samples/s)", "+5.5 %",
          from_study("fp8_training", "5.5% faster", verdict=NOT_MEASURABLE,
                     measured=lambda m: f"{float(m):+.0%} (step_ms fp32 / fp8 - 1, emulated "
                     "FP8 with FP8 weight storage, CPU)",
                     note="the CPU has no FP8 GEMM, so its step time says nothing about an "
                     "HPU's FP8 GEMMs; the GPU check is benchmarks/device_check.sh (no GPU was "
                     "lent to this session)"),
          "tfm-jax ablate fp8_training", "fp8_training"),
    Claim("Ch2.4.3", "0/10 crashes with FP8 training", "0/10",
          from_study("fp8_training", "0/10 crashes"), "tfm-jax ablate fp8_training",
          "fp8_training"),
    Claim("Ch2.4.3", "final loss 2.79 (FP8) vs 2.78 (BF16)", "+0.36 %",
          from_study("fp8_error_sources", "final loss 2.79",
                     measured=lambda m: f"{float(m):+.2%} (fp8_delayed in a bf16 model vs "
                     "the bf16 model, means over the same seeds)"),
          "tfm-jax ablate fp8_error_sources", "fp8_error_sources"),
    # ---------------------------------------------------------------- Ch3.1 MoE
    Claim("Ch3.1.1", "All-to-All is MoE's communication semantics: dispatch and combine, twice "
          "per layer", "2 all_to_all_v per layer",
          moe_row("sends all_to_all twice", "checked as code: the explicit shard_map + "
                  "all_to_all path equals the dense reference (tests/unit/layers/test_moe.py)"),
          "tfm-jax ablate moe", "moe"),
    Claim("Ch3.1.1", "... the same semantics whatever the implementation (dispatch strategies "
          "give the same loss)", "qualitative",
          moe_row("dispatch strategies are one function", "all_to_all, implicit and dense "
                  "dispatch agree in outputs and gradients (tests/unit/layers/test_moe.py)"),
          "tfm-jax ablate moe", "moe"),
    Claim("Ch3.1.2", "a fused kernel implements it implicitly: only the TP all-reduce is left",
          "no explicit all-to-all",
          moe_row("needs only the TP all-reduce", "HPU's fused kernel is not available here; "
                  "the implicit (sharding-annotated) path equals the explicit one "
                  "(tests/unit/layers/test_moe.py)"),
          "tfm-jax ablate moe", "moe"),
    Claim("Ch3.1.3", "HPU MoE communication overhead 40 % below GPU + NCCL (MLPerf v4.0)",
          "-40 %",
          moe_stand_in("cuts communication by 40", "needs Gaudi (HPU-Link) and GPU clusters; "
                       "one CPU host emulates devices and its collectives are memory copies"),
          "tfm-jax ablate moe", "moe"),
]


# --------------------------------------------------------------------------------------------
# Building the table.


def evaluate(claim: Claim, src: Sources) -> dict[str, str]:
    """One ledger row for ``claim``: a missing study becomes a ``results missing`` row
    naming the command that produces it."""
    row = {"section": claim.section, "claim": claim.quote, "seed": claim.seed_figure,
           "command": claim.command}
    try:
        f = claim.extract(src)
    except Missing as err:
        f = Finding("—", MISSING, "—", f"{err}; run: {err.command}")
    if f.verdict not in VERDICTS:
        raise ValueError(f"claim {claim.quote!r}: verdict {f.verdict!r} is not one of {VERDICTS}")
    row.update(measured=f.measured, verdict=f.verdict, where=f.where, note=f.note)
    return row


def ledger(root: pathlib.Path | str) -> list[dict[str, str]]:
    src = Sources(root)
    return [evaluate(c, src) for c in CLAIMS]


def _cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def markdown(rows: list[dict[str, str]]) -> str:
    counts = {v: sum(r["verdict"] == v for r in rows) for v in VERDICTS}
    lines = [
        "# Claims ledger",
        "",
        "Every quantitative or testable claim of [the seed document](docs/seed.md) "
        "([`docs/seed/000_35fc7c8d407409d4.txt`](docs/seed/000_35fc7c8d407409d4.txt), Chinese; "
        "quoted short in English), the "
        "seed's figure, what this project measured, and a verdict. Written by `tfm-jax claims` "
        "from the studies' results under `studies/` and arithmetic it does itself "
        "(`tfm_jax/ablate/claims.py`: the ledger as data). Small models on CPU reproduce the *shape* "
        "of a claim; the `where` column says on what.",
        "",
        "Verdicts: " + ", ".join(f"{v} {n}" for v, n in counts.items()) + f" ({len(rows)} rows).",
        "",
        "| # | section | claim | seed | measured | verdict | where | reproduce |",
        "|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for i, r in enumerate(rows, 1):
        lines.append(f"| {i} | {r['section']} | {_cell(r['claim'])} | {_cell(r['seed'])} | "
                     f"{_cell(r['measured'])} | **{r['verdict']}** | {_cell(r['where'])} | "
                     f"`{_cell(r['command'])}` |")
        if r["note"]:
            notes.append(f"{i}. {r['note']}")
    if notes:
        lines += ["", "## Notes", "", *notes]
    return "\n".join(lines) + "\n"


def write(root: pathlib.Path | str, out: Optional[pathlib.Path | str] = None) -> pathlib.Path:
    root = pathlib.Path(root)
    path = pathlib.Path(out) if out else root / "CLAIMS.md"
    path.write_text(markdown(ledger(root)))
    return path
