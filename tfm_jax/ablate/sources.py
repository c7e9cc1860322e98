"""The studies' committed results as the claims ledger reads them (no jax).

:class:`Sources` reads ``studies/<study>/results.json`` and re-decides a claim from the per-run data under the
claim's declaration in the current experiment file (:meth:`Sources.judge`, by
:func:`tfm_jax.ablate.report.judge_claim`); :func:`from_study` turns that into a ledger
:class:`Finding`. The ledger's verdict words are defined here.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from typing import Any, Callable, Optional

from tfm_jax.ablate import verdict as V

CONSISTENT, INCONSISTENT, INCONCLUSIVE = V.CONSISTENT, V.INCONSISTENT, V.INCONCLUSIVE
ARITHMETIC, NOT_MEASURABLE = "arithmetic error", "not measurable here"
BY_CONSTRUCTION, DEFINITION, MISSING = "by construction", "definition", "results missing"
VERDICTS = (CONSISTENT, INCONSISTENT, INCONCLUSIVE, ARITHMETIC, NOT_MEASURABLE,
            BY_CONSTRUCTION, DEFINITION, MISSING)
# what a row rests on (the headline counts keep them apart)
BASES = ("measurement", "arithmetic", "construction")

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
              "python -m experiments.scripts.quant_study --run-dir runs/tiny-300 --out "
              "runs/quant-study --overhead-json runs/quant-overhead.json  (the run and the overhead "
              "file: docs/low-precision.md)"),
    "fp8_training": ("studies/fp8_training/results.json", "tfm-jax ablate fp8_training"),
    "fp8_training_long": ("studies/fp8_training_long/results.json",
                          "tfm-jax ablate fp8_training_long  (copy to "
                          "studies/fp8_training_long/)"),
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


# --------------------------------------------------------------------------------------------
# Reading the studies' results.


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
            else:
                raise Missing(f"{rel} not found", command)
        return self._cache[study]

    def claim_row(self, study: str, contains: str) -> dict[str, Any]:
        """The study's committed claims-table row whose claim text contains ``contains``."""
        rows = [r for r in self.results(study).get("claims", [])
                if contains.lower() in str(r.get("claim", "")).lower()]
        if not rows:
            raise Missing(f"no claim containing {contains!r} in {STUDIES[study][0]}",
                          STUDIES[study][1])
        return rows[0]

    def declaration(self, study: str, contains: str) -> dict[str, Any]:
        """The claim's declaration in the study's current experiment file."""
        from tfm_jax.ablate.spec import load_experiment

        name = self.results(study).get("experiment", {}).get("name", study)
        key = ("exp", name)
        if key not in self._cache:
            self._cache[key] = load_experiment(name)
        hits = [c for c in self._cache[key].claims if contains.lower() in c.claim.lower()]
        if not hits:
            raise ValueError(f"experiments/{name}.yaml has no claim containing {contains!r}")
        return hits[0].model_dump()

    def device_kind(self, study: str) -> str:
        res = self.results(study)
        kind = res.get("provenance", {}).get("device", {}).get("device_kind")
        return kind or str(res.get("where", "")).split(" ", 1)[0] or "unknown"

    def where(self, study: str) -> str:
        """``d64 L4/12/24, 100 steps, byte-level, CPU x1, 2 seeds`` from ALL the variants'
        configs (the current experiment file composed at the committed seeds)."""
        from tfm_jax.ablate.report import scale_of

        key = ("where", study)
        if key not in self._cache:
            res = self.results(study)
            exp = res.get("experiment", {})
            seeds = sorted({r["seed"] for r in res.get("runs", []) if r.get("status") == "ok"})
            scale = ""
            try:
                self.declaration(study, "")
                spec = self._cache[("exp", exp.get("name", study))]
                scale = scale_of([spec.config(v, seeds[0] if seeds else 0)
                                  for v in exp.get("variants", []) if v in spec.variants])
            except Exception:  # noqa: BLE001 -- an old study whose file changed: no scale
                scale = ""
            w = str(res.get("where", ""))
            dev = w.split(" ", 1)[0].upper() if w else "?"
            n = re.search(r"(\d+) device", w)
            parts = [p for p in (scale, f"{dev} x{n.group(1) if n else 1}",
                                 f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''}") if p]
            self._cache[key] = ", ".join(parts)
        return self._cache[key]

    def judge(self, study: str, contains: str) -> dict[str, Any]:
        """The claim re-decided from the study's per-run data under its current declaration
        (:func:`tfm_jax.ablate.report.judge_claim`)."""
        from tfm_jax.ablate.report import aggregate, judge_claim

        res = self.results(study)
        decl = self.declaration(study, contains)
        runs = res.get("runs") or []
        variants = list(res.get("experiment", {}).get("variants") or [])
        agg = res.get("aggregates") or aggregate(runs, variants)
        return judge_claim(decl, agg, self.where(study), runs if runs else None,
                           self.device_kind(study))


def fmt(x: Any) -> str:
    """A measured value for the table: 4 significant digits, text as is."""
    if isinstance(x, bool) or x is None:
        return str(x)
    if isinstance(x, (int, float)):
        if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
            return f"{x:.3g}"
        return f"{x:.4g}"
    return str(x)


def interval_text(row: dict[str, Any], scale: Callable[[float], str] = fmt) -> str:
    """``+0.0277 [−0.07, +0.13] (95 % t, n 3; MDE 0.2)`` of a judged study row."""
    m = row.get("measured")
    if m is None:
        return "—"
    iv, n = row.get("interval"), row.get("n")
    if not iv or not n:
        return scale(m)
    if n == 1 or iv[0] == iv[1]:
        return f"{scale(m)} (n {n})"
    mde = row.get("mde")
    return (f"{scale(m)} [{scale(iv[0])}, {scale(iv[1])}] (95 % t, n {n}"
            + (f"; min. detectable {scale(mde)}" if mde is not None else "") + ")")


def study_verdict(row: dict[str, Any], command: str) -> str:
    """A judged study row's verdict in the ledger's words (missing data raise Missing)."""
    v = str(row.get("verdict", ""))
    if v in (CONSISTENT, INCONSISTENT, INCONCLUSIVE, NOT_MEASURABLE):
        return v
    if v in ("not measured", "reported", ""):
        raise Missing(f"{row.get('claim')!r}: {v or 'no verdict'} "
                      f"({row.get('note') or row.get('why') or 'no per-run data'})", command)
    raise ValueError(f"claim {row.get('claim')!r}: {v}")


def from_study(study: str, contains: str, *, measured: Optional[Callable[[Any], str]] = None,
               note: str = "") -> Callable[[Sources], Finding]:
    """Extractor re-deciding one claim of a study (``contains``: part of its claim text in
    the experiment file) from the committed per-run data; ``measured`` formats a value
    (default :func:`fmt`); ``note`` is put before the verdict's reason."""
    def extract(src: Sources) -> Finding:
        row = src.judge(study, contains)
        v = study_verdict(row, STUDIES[study][1])
        text = interval_text(row, measured or fmt)
        if v == NOT_MEASURABLE and row.get("measured") is not None:
            text = f"stand-in: {text} ({row.get('stand_in_verdict')} as a stand-in)"
        elif v == NOT_MEASURABLE:
            text = "—"
        extra = [note, str(row.get("note") or "") if not note else "", row.get("why") or ""]
        return Finding(text, v, row["where"], "; ".join(x for x in extra if x))
    return extract


def metric(src: Sources, study: str, name: str, variant: str) -> float:
    """Mean over seeds of a scalar metric of an ablation study."""
    res = src.results(study)
    try:
        return float(res["aggregates"]["scalars"][variant][name]["mean"])
    except (KeyError, TypeError):
        raise Missing(f"{name}[{variant}] not in {STUDIES[study][0]}", STUDIES[study][1]) from None


def where_of(src: Sources, study: str) -> str:
    return src.where(study)
