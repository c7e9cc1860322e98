"""Aggregates over seeds, the claims table and ``results.md`` of an ablation (no jax).

* :func:`aggregate` -- per variant and scalar metric: n, mean, sample std (``ddof=1``; None for
  one seed), min, max over the seeds that finished; per measurement series the same per
  (variant, key).
* Claims: ``metric`` and ``check`` are small arithmetic expressions, parsed with :mod:`ast` and
  evaluated over a whitelist (numbers, strings, ``+ - * / // % **``, comparisons, ``and/or/not``,
  ``x if c else y``, ``metric[variant]`` = the mean over seeds, and the functions ``abs min max
  round log exp sqrt``, ``std('metric', 'variant')`` (sample std over seeds), ``sem(...)``
  (standard error of the mean, std / sqrt(n)), ``value('metric', 'variant', key=...)`` for a
  series row). Nothing else (no attributes, no other calls) is accepted.
"""

from __future__ import annotations

import ast
import math
import pathlib
import re
from typing import Any, Optional

FUNCTIONS = {"abs": abs, "min": min, "max": max, "round": round, "log": math.log,
             "exp": math.exp, "sqrt": math.sqrt}
_SPECIAL = ("std", "sem", "value")
_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
           ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b,
           ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b,
           ast.Pow: lambda a, b: math.pow(a, b)}     # in floats: overflows, never grows
MAX_EXPRESSION_CHARS = 1000


def _binop(op: type, a: Any, b: Any) -> Any:
    """Arithmetic on numbers only (text is for variant names): ``'a' * 10**9`` or ``7**7**8``
    would otherwise build a gigabyte string or an unbounded integer."""
    for x in (a, b):
        if not isinstance(x, (int, float)):
            raise ValueError(f"arithmetic on {type(x).__name__} {x!r}: claim expressions "
                             "compute with numbers only")
    try:
        return _BINOPS[op](a, b)
    except OverflowError:
        raise ValueError("a power in the expression overflows") from None
_CMPOPS = {ast.Lt: lambda a, b: a < b, ast.LtE: lambda a, b: a <= b,
           ast.Gt: lambda a, b: a > b, ast.GtE: lambda a, b: a >= b,
           ast.Eq: lambda a, b: a == b, ast.NotEq: lambda a, b: a != b}


class NotMeasured(LookupError):
    """An expression needs a metric no finished run measured."""


# --------------------------------------------------------------------------------------------
# Aggregation.


def stats(values: list[float]) -> dict[str, Any]:
    """n, mean, sample std (ddof=1; None when n < 2), min, max and the values."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"n": n, "mean": mean, "std": std, "min": min(values), "max": max(values),
            "values": list(values)}


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def aggregate(runs: list[dict[str, Any]], variants: list[str]) -> dict[str, Any]:
    """``{"scalars": {variant: {metric: stats}}, "series": {name: {"by": [...], "rows":
    [{"variant": v, **keys, value: stats}]}}}`` over runs with ``status == "ok"``."""
    scalars: dict[str, dict[str, Any]] = {}
    series: dict[str, dict[str, Any]] = {}
    for v in variants:
        ok = [r for r in runs if r["variant"] == v and r["status"] == "ok"]
        names: list[str] = []
        for r in ok:
            names += [k for k in r.get("metrics", {}) if k not in names]
        scalars[v] = {m: stats([r["metrics"][m] for r in ok if _num(r["metrics"].get(m))])
                      for m in names
                      if any(_num(r["metrics"].get(m)) for r in ok)}
        for r in ok:
            for name, s in r.get("series", {}).items():
                entry = series.setdefault(name, {"by": list(s["by"]), "groups": {}})
                for row in s["rows"]:
                    key = (v,) + tuple(row.get(b) for b in entry["by"])
                    g = entry["groups"].setdefault(key, {})
                    for field, val in row.items():
                        if field not in entry["by"] and _num(val):
                            g.setdefault(field, []).append(val)
    out_series = {}
    for name, entry in series.items():
        rows = []
        for key, g in entry["groups"].items():
            row = {"variant": key[0], **dict(zip(entry["by"], key[1:]))}
            row.update({f: stats(vals) for f, vals in g.items()})
            rows.append(row)
        out_series[name] = {"by": entry["by"], "rows": rows}
    return {"scalars": scalars, "series": out_series,
            "paired": paired_deltas(runs, variants) if variants else {}}


PAIRED_METRICS = ("val_loss", "final_train_loss")


def paired_deltas(runs: list[dict[str, Any]], variants: list[str],
                  metrics: tuple[str, ...] = PAIRED_METRICS) -> dict[str, Any]:
    """Each variant against the first (the baseline), paired by seed: for every seed where both
    runs finished, ``100 * (variant - baseline) / baseline``. Runs at the same seed share the
    data order and (where shapes allow) the initialization, so the paired difference is far
    tighter than the difference of the two means when the seed spread is large.
    ``{"baseline": v0, "metrics": {metric: {variant: stats of the % differences}}}``."""
    base = variants[0]

    def by_seed(v: str, m: str) -> dict[Any, float]:
        return {r["seed"]: r["metrics"][m] for r in runs
                if r["variant"] == v and r["status"] == "ok"
                and _num(r.get("metrics", {}).get(m))}

    out: dict[str, dict[str, Any]] = {}
    for m in metrics:
        b = by_seed(base, m)
        for v in variants[1:]:
            o = by_seed(v, m)
            diffs = [100.0 * (o[s] - b[s]) / b[s] for s in sorted(b, key=str)
                     if s in o and b[s] != 0]
            if diffs:
                out.setdefault(m, {})[v] = stats(diffs)
    return {"baseline": base, "metrics": out}


# --------------------------------------------------------------------------------------------
# Expressions.


def parse_expression(text: str) -> ast.Expression:
    """Parse and whitelist-check an expression; ValueError says what is not allowed."""
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression of {len(text):,} characters: at most "
                         f"{MAX_EXPRESSION_CHARS} (a claim is one short formula)")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as err:
        raise ValueError(f"expression {text!r} is not valid: {err.msg}") from None
    for node in ast.walk(tree):
        ok = isinstance(node, (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Compare, ast.BoolOp,
                               ast.IfExp, ast.Constant, ast.Name, ast.Subscript, ast.Call,
                               ast.keyword, ast.Load, ast.operator, ast.unaryop, ast.cmpop,
                               ast.boolop))
        if isinstance(node, ast.BinOp):
            ok = type(node.op) in _BINOPS
        if isinstance(node, ast.Compare):
            ok = all(type(op) in _CMPOPS for op in node.ops)
        if isinstance(node, ast.UnaryOp):
            ok = isinstance(node.op, (ast.USub, ast.UAdd, ast.Not))
        if isinstance(node, ast.Call):
            ok = isinstance(node.func, ast.Name) and node.func.id in (*FUNCTIONS, *_SPECIAL)
        if isinstance(node, ast.Subscript):
            ok = isinstance(node.value, ast.Name) and (
                isinstance(node.slice, ast.Name) or (isinstance(node.slice, ast.Constant)
                                                     and isinstance(node.slice.value, str)))
        if isinstance(node, ast.Constant):
            ok = isinstance(node.value, (int, float, str)) and not isinstance(node.value, bool)
        if not ok:
            raise ValueError(
                f"expression {text!r}: {type(node).__name__} is not allowed (use numbers, "
                "+ - * / ** , comparisons, metric[variant], abs/min/max/round/log/exp/sqrt, "
                "std/sem('metric', 'variant'), value('metric', 'variant', key=...))")
    return tree


def parse_check(text: str) -> tuple[str, float, bool]:
    """A comparator check: ``'<='`` -> ("<=", 0, False); ``'~10%'`` -> ("~", 0.1, True);
    ``'~0.05'`` -> ("~", 0.05, False)."""
    s = text.strip()
    if s in ("<", "<=", ">", ">=", "=="):
        return s, 0.0, False
    m = re.fullmatch(r"~\s*([0-9.eE+-]+)\s*(%?)", s)
    if not m:
        raise ValueError(f"check {text!r}: use <, <=, >, >=, ==, ~X% or ~X, or an expression")
    try:
        tol = float(m.group(1))
    except ValueError:
        raise ValueError(f"check {text!r}: {m.group(1)!r} is not a number") from None
    pct = bool(m.group(2))
    return "~", tol / 100 if pct else tol, pct


class _Evaluator:
    def __init__(self, agg: dict[str, Any], names: Optional[dict[str, Any]] = None):
        self.scalars = agg.get("scalars", {})
        self.series = agg.get("series", {})
        self.names = names or {}

    def scalar(self, metric: str, variant: str, field: str = "mean") -> float:
        if variant not in self.scalars:
            raise NotMeasured(f"variant {variant!r} has no finished runs")
        s = self.scalars[variant].get(metric)
        if s is None:
            raise NotMeasured(f"{metric}[{variant}] was not measured")
        if s[field] is None:
            raise NotMeasured(f"{field} of {metric}[{variant}] needs two or more seeds")
        return s[field]

    def value(self, metric: str, variant: str, **where: Any) -> float:
        for entry in self.series.values():
            for row in entry["rows"]:
                if (row["variant"] == variant and metric in row
                        and all(row.get(k) == v for k, v in where.items())):
                    return row[metric]["mean"]
        if not where:
            return self.scalar(metric, variant)
        raise NotMeasured(f"value({metric!r}, {variant!r}, "
                          f"{', '.join(f'{k}={v!r}' for k, v in where.items())}) was not measured")

    def eval(self, node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return self.eval(node.body)
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            if node.id in self.names:
                return self.names[node.id]
            raise ValueError(f"unknown name {node.id!r}: write metric[variant], e.g. "
                             f"perplexity[{next(iter(self.scalars), 'mha')}]")
        if isinstance(node, ast.Subscript):
            variant = node.slice.id if isinstance(node.slice, ast.Name) else node.slice.value
            return self.scalar(node.value.id, variant)
        if isinstance(node, ast.BinOp):
            return _binop(type(node.op), self.eval(node.left), self.eval(node.right))
        if isinstance(node, ast.UnaryOp):
            x = self.eval(node.operand)
            return -x if isinstance(node.op, ast.USub) else (+x if isinstance(node.op, ast.UAdd)
                                                              else not x)
        if isinstance(node, ast.Compare):
            left = self.eval(node.left)
            for op, comp in zip(node.ops, node.comparators):
                right = self.eval(comp)
                if not _CMPOPS[type(op)](left, right):
                    return False
                left = right
            return True
        if isinstance(node, ast.BoolOp):
            vals = [self.eval(v) for v in node.values]
            return all(vals) if isinstance(node.op, ast.And) else any(vals)
        if isinstance(node, ast.IfExp):
            return self.eval(node.body) if self.eval(node.test) else self.eval(node.orelse)
        if isinstance(node, ast.Call):
            args = [self.eval(a) for a in node.args]
            kwargs = {k.arg: self.eval(k.value) for k in node.keywords}
            if node.func.id == "std":
                return self.scalar(*args, field="std")
            if node.func.id == "sem":
                return self.scalar(*args, field="std") / math.sqrt(self.scalar(*args, field="n"))
            if node.func.id == "value":
                return self.value(*args, **kwargs)
            return FUNCTIONS[node.func.id](*args, **kwargs)
        raise ValueError(f"cannot evaluate {type(node).__name__}")


def evaluate(text: str, agg: dict[str, Any], names: Optional[dict[str, Any]] = None) -> Any:
    """Evaluate an expression over aggregates (``metric[variant]`` = mean over seeds)."""
    return _Evaluator(agg, names).eval(parse_expression(text))


def per_seed_values(metric: str, runs: list[dict[str, Any]], variants: list[str]
                    ) -> list[tuple[Any, float]]:
    """``metric`` evaluated on each seed's runs alone: ``[(seed, value)]`` for the seeds where
    every variant it names finished (a difference of two variants is then a paired
    difference). Raises NotMeasured when no seed has it."""
    seeds = sorted({r["seed"] for r in runs if r.get("status") == "ok"}, key=str)
    out, last = [], None
    for s in seeds:
        agg = aggregate([r for r in runs if r["seed"] == s], variants)
        try:
            out.append((s, float(evaluate(metric, agg))))
        except NotMeasured as err:
            last = err
    if not out:
        raise last or NotMeasured(f"{metric}: no finished runs")
    return out


def device_matches(device: Optional[str], device_kind: Optional[str]) -> bool:
    """Whether a results file's device kind (``NVIDIA H100 80GB HBM3``, ``cpu``) is the
    hardware a claim names (``H100``, ``HPU``/``Gaudi``, ``GPU``)."""
    if not device:
        return True
    kind = (device_kind or "").lower()
    want = device.lower()
    aliases = {"hpu": ("hpu", "gaudi"), "gaudi": ("hpu", "gaudi"),
               "gpu": ("nvidia", "gpu", "h100", "h200", "a100", "cuda", "rocm")}
    return any(a in kind for a in aliases.get(want, (want,)))


def judge_claim(claim: dict[str, Any], agg: dict[str, Any], where: str,
                runs: Optional[list[dict[str, Any]]] = None,
                device_kind: Optional[str] = None) -> dict[str, Any]:
    """One row of the claims table: claim, source, claimed, measured, verdict, where, note,
    and for a declared claim (``kind``) the per-seed values, the 95 % t interval, n, sd, the
    minimum detectable effect and the reason of the verdict.

    Verdicts: ``consistent`` / ``inconsistent`` / ``inconclusive`` (a declared claim, decided by
    :func:`tfm_jax.ablate.verdict.decide` from the per-seed values of ``runs``), ``not
    measurable here`` (the claim names hardware the results were not measured on; the measured
    figure is then a stand-in, its own verdict in ``stand_in_verdict``), ``reported`` (no
    declared kind: the figure, unjudged), ``not measured`` (a metric it needs is missing),
    ``error: ...`` (the expression failed)."""
    from tfm_jax.ablate import verdict as V

    row = {"claim": claim["claim"], "source": claim.get("source", ""),
           "claimed": claim.get("expected"), "measured": None,
           "where": claim.get("where") or where, "note": claim.get("note")}
    metric, kind = claim.get("metric"), claim.get("kind")
    if metric is None:
        row["verdict"] = "not measured" if claim.get("check") else "reported"
        return row
    try:
        if kind is None or runs is None:
            row["measured"] = evaluate(metric, agg)
            row["verdict"] = "reported"
            if claim.get("check") or kind:
                row["why"] = ("no per-run data: not judged" if kind else
                              "no declared kind: reported, not judged")
            return row
        pairs = per_seed_values(metric, runs, list(agg.get("scalars", {})) or
                                sorted({r["variant"] for r in runs}))
        values = [v for _, v in pairs]
        if claim.get("deterministic") and max(values) - min(values) > 1e-9 * max(
                1.0, max(abs(v) for v in values)):
            raise ValueError(f"declared deterministic, but the seeds differ: {values}")
        iv = V.t_interval(values[:1] if claim.get("deterministic") else values,
                          exact=bool(claim.get("deterministic")))
        expected = float(claim["expected"]) if isinstance(claim.get("expected"),
                                                          (int, float)) else 0.0
        verdict, why = V.decide(kind, iv, expected=expected, margin=V.margin_value(claim.get("margin"), claim.get("expected"),
                                                       f"claim {claim['claim'][:60]!r}"),
                                direction=claim.get("direction"),
                                timing=bool(claim.get("timing")))
        row.update(measured=sum(values) / len(values), values=values,
                   seeds=[s for s, _ in pairs], n=len(values),
                   interval=[iv.lo, iv.hi] if iv else None, sd=iv.sd if iv else None,
                   mde=V.mde(iv.sd, iv.n) if iv and iv.sd is not None else None,
                   kind=kind, why=why)
        if not device_matches(claim.get("device"), device_kind):
            row["stand_in_verdict"] = verdict
            verdict = "not measurable here"
            on = device_kind or "another device"
            row["why"] = (f"a claim about {claim['device']} measured on {on}: the figure is a "
                          f"stand-in ({row['stand_in_verdict']} as such), not the verdict")
        row["verdict"] = verdict
    except NotMeasured as err:
        if not device_matches(claim.get("device"), device_kind):
            row["verdict"] = "not measurable here"
            row["why"] = (f"a claim about {claim['device']}; the results are from "
                          f"{device_kind or 'another device'} and keep no per-run stand-in "
                          f"({err})")
            return row
        row["verdict"] = "not measured"
        row["note"] = (f"{row['note']} [{err}]" if row["note"] else str(err))
    except (ValueError, TypeError, ZeroDivisionError, ArithmeticError) as err:
        row["verdict"] = f"error: {err}"
    return row


def scale_of(configs: list[Any]) -> str:
    """``d128 L4/12/24, 300 steps, byte-level`` over the given runs' configs."""
    def vals(get) -> str:
        seen: list[Any] = []
        for c in configs:
            v = get(c)
            if v not in seen:
                seen.append(v)
        return "/".join(str(v) for v in sorted(seen, key=lambda x: (str(type(x)), x)))

    tok = vals(lambda c: "byte-level" if c.data.tokenizer == "byte" else
               f"tokenizer {pathlib.Path(c.data.tokenizer).name}")
    return (f"d{vals(lambda c: c.model.d_model)} L{vals(lambda c: c.model.n_layers)}, "
            f"{vals(lambda c: c.train.steps)} steps, {tok}")


def seed_plan(exp: Any, runs: Optional[list[dict[str, Any]]] = None,
              sd: Optional[float] = None) -> list[str]:
    """Lines of ``--dry-run``: per declared claim, the per-seed sd (from the pilot's runs, or
    the stated ``sd``), the minimum detectable effect at the experiment's seeds and the seeds
    its margin needs (superiority: to detect the pilot's effect)."""
    from tfm_jax.ablate import verdict as V

    n = len(exp.seeds)
    out = [f"seeds needed (paired 95 % t test, 80 % power; {n} seed(s) declared):"]
    for c in exp.claims:
        if c.kind is None:
            continue
        if c.deterministic:
            out.append(f"  {c.claim[:70]}: deterministic, one seed decides")
            continue
        s, effect = sd, None
        if runs is not None:
            try:
                vals = [v for _, v in per_seed_values(c.metric, runs, list(exp.variants))]
            except (NotMeasured, ValueError, TypeError, ZeroDivisionError) as err:
                out.append(f"  {c.claim[:70]}: pilot lacks it ({err})")
                continue
            iv = V.t_interval(vals)
            if iv is None or iv.sd is None:
                out.append(f"  {c.claim[:70]}: pilot has {len(vals)} seed(s); needs two")
                continue
            s = iv.sd
            effect = abs(iv.mean - float(c.expected or 0))
        if s is None:
            continue
        margin = c.margin_value() if c.kind != "superiority" else effect
        what = "margin" if c.kind != "superiority" else "effect"
        need = V.seeds_needed(s, margin) if margin else None
        out.append(f"  {c.claim[:70]}: sd {s:.3g}, min. detectable effect at {n} seeds "
                   f"{V.mde(s, n):.3g}; "
                   + (f"{need} seeds for {what} {margin:.3g}" if need else
                      f"more than 10,000 seeds for {what} {margin:.3g}" if margin else
                      "no margin or effect to size against"))
    return out


# --------------------------------------------------------------------------------------------
# Formatting and results.md.


def _decimals(x: float) -> int:
    """Decimals that show ~4 significant digits of ``x`` (0 for |x| >= 1000)."""
    if x == 0 or not math.isfinite(x):
        return 4
    return max(0, min(6, 3 - math.floor(math.log10(abs(x)))))


def fmt(x: Any, decimals: Optional[int] = None) -> str:
    if x is None:
        return "–"
    if isinstance(x, str):
        return x
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, int):
        return f"{x:,}"
    d = _decimals(x) if decimals is None else decimals
    return f"{x:,.{d}f}"


def fmt_stats(s: Optional[dict[str, Any]]) -> str:
    """``mean ± std`` with the std at the mean's decimals (``mean`` alone for one seed)."""
    if not s:
        return "–"
    mean, std = s["mean"], s["std"]
    if not std:                      # one seed, or the same value for every seed
        integral = all(float(v).is_integer() for v in s["values"])
        return fmt(int(mean)) if integral and abs(mean) >= 1000 else fmt(s["values"][0])
    d = _decimals(mean)
    return fmt(mean, d) + f" ± {fmt(std, d)}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    esc = lambda c: str(c).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def scalars_table(results: dict[str, Any]) -> str:
    """The Markdown table of every scalar metric (rows) per variant (columns), mean ± std over
    seeds -- the "Results" table of ``results.md`` (also shown by the notebooks)."""
    variants = results["experiment"]["variants"]
    scalars = results["aggregates"]["scalars"]
    metrics: list[str] = []
    for v in variants:
        metrics += [m for m in scalars.get(v, {}) if m not in metrics]
    rows = [[m] + [fmt_stats(scalars.get(v, {}).get(m)) for v in variants] for m in metrics]
    return _table(["metric"] + variants, rows)


def claims_table(results: dict[str, Any]) -> str:
    """The Markdown table of the judged claims (the "Claims" table of ``results.md``)."""
    rows = [[str(i + 1), c["claim"], c["source"], fmt(c["claimed"]), measured_cell(c),
             fmt(c.get("mde")), c["verdict"], c["where"]]
            for i, c in enumerate(results["claims"])]
    return _table(["#", "claim", "source", "claimed", "measured (95 % t interval)",
                   "min. detectable", "verdict", "where measured"], rows)


def measured_cell(c: dict[str, Any]) -> str:
    """``mean [lo, hi] (n k)`` of a judged claim, else the measured value."""
    iv = c.get("interval")
    if iv is None or c.get("n", 1) < 2 or iv[0] == iv[1]:
        return fmt(c.get("measured"))
    return f"{fmt(c['measured'])} [{fmt(iv[0])}, {fmt(iv[1])}] (n {c['n']})"


def provenance_text(prov: Optional[dict[str, Any]]) -> str:
    """``commit 1a2b3c4d (clean), jax 0.10.2, AMD EPYC 9B14 x2 cores, load 1.7 -> 4.0`` of a
    results file's provenance record ('' without one)."""
    if not prov:
        return ""
    git, ver, mach = prov.get("git") or {}, prov.get("versions") or {}, prov.get("machine") or {}
    commit = (git.get("commit") or "")[:8]
    state = {True: "dirty tree", False: "clean"}.get(git.get("dirty"), "tree state unknown")
    parts = [f"commit {commit} ({state})" if commit else "no git checkout",
             f"jax {ver.get('jax')}" if ver.get("jax") else "",
             f"{mach.get('cpu')} x{mach.get('cores')} cores" if mach.get("cpu") else ""]
    ls, le = prov.get("load_start"), prov.get("load_end")
    if ls and le:
        parts.append(f"load {ls[0]:g} -> {le[0]:g}")
    return ", ".join(p for p in parts if p)


def markdown(results: dict[str, Any]) -> str:
    """``results.md``: per-variant mean ± std, series tables, claims, runs, plots."""
    exp = results["experiment"]
    variants = exp["variants"]
    agg = results["aggregates"]
    out = [f"# Ablation: {exp['name']}", ""]
    if exp.get("description"):
        out += [exp["description"].strip(), ""]
    out += [f"Command: `{results['command']}`  ", f"Written: {results['written']}  ",
            f"Where: {results['where']}  "]
    prov = provenance_text(results.get("provenance"))
    if prov:
        out.append(f"Provenance: {prov}  ")
    out += [f"Seeds: {', '.join(map(str, exp['seeds']))} (mean ± sample std over the seeds that "
            "finished; n in the runs table)", ""]
    out += ["## Results", "", scalars_table(results), ""]
    paired = agg.get("paired", {})
    if paired.get("metrics"):
        base = paired["baseline"]
        others = [v for v in variants if v != base]
        out += [f"Paired by seed against **{base}**: mean ± standard error of "
                f"100 · (variant − {base}) / {base} over the seeds where both finished (n).", ""]
        rows = []
        for m, per in paired["metrics"].items():
            cells = []
            for v in others:
                st = per.get(v)
                if st is None:
                    cells.append("–")
                    continue
                sem = st["std"] / math.sqrt(st["n"]) if st["std"] is not None else None
                cells.append(f"{st['mean']:+.2f} %" + (f" ± {sem:.2f}" if sem is not None
                                                      else "") + f" (n {st['n']})")
            rows.append([f"Δ% {m}"] + cells)
        out += [_table(["paired"] + others, rows), ""]
    descr = [(v, d) for v, d in ((v, exp["variant_descriptions"].get(v)) for v in variants) if d]
    if descr:
        out += ["Variants: " + "; ".join(f"**{v}**: {' '.join(d.split())}" for v, d in descr), ""]
    for name, s in agg["series"].items():
        fields: list[str] = []
        for r in s["rows"]:
            fields += [k for k in r if k not in s["by"] and k != "variant" and k not in fields]
        keys = sorted({tuple(r.get(b) for b in s["by"]) for r in s["rows"]},
                      key=lambda k: tuple((x is None, x) for x in k))
        for f in fields:
            out += [f"### {name}: {f}", ""]
            body = []
            for k in keys:
                cells = []
                for v in variants:
                    hit = [r for r in s["rows"] if r["variant"] == v
                           and tuple(r.get(b) for b in s["by"]) == k and f in r]
                    cells.append(fmt_stats(hit[0][f]) if hit else "–")
                body.append([fmt(x) for x in k] + cells)
            out += [_table(list(s["by"]) + variants, body), ""]
    if results["claims"]:
        out += ["## Claims", "", claims_table(results), ""]
        notes = [(i + 1, "; ".join(x for x in (c.get("note"), c.get("why")) if x))
                 for i, c in enumerate(results["claims"]) if c.get("note") or c.get("why")]
        if notes:
            out += ["Notes: " + " ".join(f"({i}) {n}" for i, n in notes), ""]
    out += ["## Runs", ""]
    rows = [[r["variant"], str(r["seed"]), r["status"], r.get("outcome", ""),
             fmt(r.get("wall_s")), fmt(r.get("train_s")), fmt(r.get("measure_s")),
             fmt(r.get("metrics", {}).get("val_loss")),
             (r.get("error") or "").splitlines()[0][:160] if r.get("error") else ""]
            for r in results["runs"]]
    out += [_table(["variant", "seed", "status", "outcome", "wall s", "train s", "measure s",
                    "val_loss", "error"], rows), ""]
    if results.get("plots"):
        out += ["## Plots", ""] + [f"![{p}]({p})" for p in results["plots"]] + [""]
    if results.get("warnings"):
        out += ["## Warnings", ""] + [f"- {w}" for w in results["warnings"]] + [""]
    return "\n".join(out)
