"""Verdicts from statistics declared before the run (no jax).

A claim declares its ``kind`` and ``margin`` in the experiment file; its metric is evaluated
once per seed (runs at the same seed share data order and, where shapes allow, the
initialization, so the per-seed values are *paired* differences when the metric compares two
variants). From those n values:

* :func:`t_interval` -- the two-sided 95 % t interval of the mean,
  ``mean ± t(0.975, n-1) · sd / sqrt(n)`` (Student t quantiles from :mod:`scipy.stats`).
* :func:`decide` -- ``consistent`` / ``inconsistent`` / ``inconclusive`` by kind:

  ========================  =========================================  ===========================
  kind                      consistent when the interval ...           inconsistent when ...
  ========================  =========================================  ===========================
  superiority (greater)     lies above ``expected``                    lies below ``expected``
  superiority (less)        lies below ``expected``                    lies above ``expected``
  equivalence / point       lies inside ``expected ± margin``          lies outside it entirely
  non_inferiority (less)    lies below ``expected + margin``           lies above ``expected + margin``
  non_inferiority (greater) lies above ``expected - margin``           lies below ``expected - margin``
  ========================  =========================================  ===========================

  Anything else is inconclusive: the data allow both answers at this scale. (Non-inferiority
  is the one-sided TOST test at 2.5 %; equivalence is TOST's two one-sided tests, each at
  2.5 %, which the 95 % interval inside the margin implies.)
* :func:`mde` -- the minimum detectable effect: the smallest true effect a paired test with n
  seeds finds with 80 % power at the 5 % level, ``(t(0.975, n-1) + t(0.8, n-1)) · sd /
  sqrt(n)``; :func:`seeds_needed` inverts it for a declared margin (``tfm-jax ablate
  --dry-run``).
* Timing claims decide only where the spread of the repeats (sample sd) is below the effect
  (the interval's distance from the threshold); otherwise inconclusive.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Optional, Sequence

CONSISTENT, INCONSISTENT, INCONCLUSIVE = "consistent", "inconsistent", "inconclusive"
KINDS = ("superiority", "equivalence", "non_inferiority", "point")
DIRECTIONS = ("greater", "less")
LEVEL = 0.95
POWER = 0.8
MIN_TIMING_REPEATS = 3


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom."""
    from scipy import stats

    return float(stats.t.ppf(p, df))


@dataclasses.dataclass(frozen=True)
class Interval:
    """A t interval of the mean of ``n`` values (``lo == hi == mean`` when the values are
    exact: one value of a deterministic metric, or n equal values)."""

    n: int
    mean: float
    sd: Optional[float]          # sample sd (ddof=1); None for n == 1
    lo: float
    hi: float

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2


def t_interval(values: Sequence[float], level: float = LEVEL, *,
               exact: bool = False) -> Optional[Interval]:
    """The two-sided ``level`` t interval of the mean; None for one value (no interval)
    unless ``exact`` (a deterministic metric: the value is its own interval)."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return None
    mean = sum(xs) / n
    if n == 1:
        return Interval(1, mean, None, mean, mean) if exact else None
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return Interval(n, mean, sd, mean - half, mean + half)


def mde(sd: float, n: int, *, level: float = LEVEL, power: float = POWER) -> float:
    """Minimum detectable effect of a paired t test over ``n`` seeds (two-sided ``level``,
    ``power``): ``(t(1-a/2, n-1) + t(power, n-1)) · sd / sqrt(n)``; inf for n < 2."""
    if n < 2:
        return math.inf
    return (t_quantile(0.5 + level / 2, n - 1) + t_quantile(power, n - 1)) * sd / math.sqrt(n)


def seeds_needed(sd: float, margin: float, *, level: float = LEVEL, power: float = POWER,
                 limit: int = 10_000) -> Optional[int]:
    """The fewest seeds whose :func:`mde` is at most ``margin`` (None past ``limit``)."""
    if margin <= 0:
        raise ValueError(f"margin {margin} must be > 0")
    if sd == 0:
        return 2
    for n in range(2, limit + 1):
        if mde(sd, n, level=level, power=power) <= margin:
            return n
    return None


def margin_value(margin: Any, expected: Any, name: str = "claim") -> Optional[float]:
    """A declared margin as a number: a number, a numeric string, or ``"X%"`` of
    ``|expected|``; ValueError (naming ``name``) otherwise or when not > 0."""
    if margin is None:
        return None
    m = margin
    if isinstance(m, str):
        hit = re.fullmatch(r"\s*([0-9.eE+-]+)\s*(%?)\s*", m)
        try:
            num = float(hit.group(1)) if hit else None
        except ValueError:
            num = None
        if num is None:
            raise ValueError(f"{name}: margin {margin!r}: a number, or 'X%' of a non-zero "
                             "numeric expected")
        if hit.group(2):
            if not isinstance(expected, (int, float)) or not expected:
                raise ValueError(f"{name}: margin {margin!r}: 'X%' needs a non-zero numeric "
                                 "expected")
            num = num / 100 * abs(float(expected))
        m = num
    if not m > 0:
        raise ValueError(f"{name}: margin {margin!r} must be > 0")
    return float(m)


def decide(kind: str, iv: Optional[Interval], *, expected: float = 0.0,
           margin: Optional[float] = None, direction: Optional[str] = None,
           timing: bool = False) -> tuple[str, str]:
    """(verdict, reason) for ``kind`` from the interval ``iv`` (see the module table)."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}: one of {', '.join(KINDS)}")
    if iv is None:
        return INCONCLUSIVE, "one seed: no interval (declare more seeds)"
    if kind in ("equivalence", "point"):
        if margin is None:
            raise ValueError(f"kind {kind} needs a margin")
        lo_b, hi_b = expected - margin, expected + margin
        if lo_b < iv.lo and iv.hi < hi_b:
            verdict = CONSISTENT
        elif iv.lo > hi_b or iv.hi < lo_b:
            verdict = INCONSISTENT
        else:
            verdict = INCONCLUSIVE
        threshold = hi_b if iv.mean >= expected else lo_b
        why = f"interval vs [{lo_b:.4g}, {hi_b:.4g}]"
    else:
        if direction not in DIRECTIONS:
            raise ValueError(f"kind {kind} needs direction greater or less")
        shift = 0.0 if kind == "superiority" else (margin or 0.0)
        threshold = expected + shift if direction == "less" else expected - shift
        above, below = iv.lo > threshold, iv.hi < threshold
        good, bad = (above, below) if direction == "greater" else (below, above)
        verdict = CONSISTENT if good else INCONSISTENT if bad else INCONCLUSIVE
        why = f"interval vs {'>' if direction == 'greater' else '<'} {threshold:.4g}"
    if timing and verdict != INCONCLUSIVE:
        effect = abs(iv.mean - threshold)
        if iv.n < MIN_TIMING_REPEATS:
            return INCONCLUSIVE, (f"timing from {iv.n} repeat(s): needs {MIN_TIMING_REPEATS} "
                                  "or more interleaved repeats")
        if iv.sd is not None and iv.sd > effect:
            return INCONCLUSIVE, (f"timing spread (sd {iv.sd:.3g}) exceeds the effect "
                                  f"({effect:.3g})")
    return verdict, why


def describe(iv: Optional[Interval], level: float = LEVEL) -> str:
    """``+0.028 [−0.07, +0.13] (95 % t, n 3)`` for the measured column."""
    if iv is None:
        return "–"
    if iv.n == 1 or iv.lo == iv.hi:
        return f"{iv.mean:.4g} (n {iv.n})"
    return (f"{iv.mean:+.4g} [{iv.lo:+.4g}, {iv.hi:+.4g}] "
            f"({round(level * 100)} % t, n {iv.n})")


__all__ = ["CONSISTENT", "DIRECTIONS", "INCONCLUSIVE", "INCONSISTENT", "Interval", "KINDS",
           "LEVEL", "decide", "describe", "mde", "seeds_needed", "t_interval", "t_quantile",
           "welch_interval"]


def welch_interval(m1: float, s1: float, n1: int, m2: float, s2: float, n2: int,
                   level: float = LEVEL) -> Interval:
    """The Welch t interval of ``mean1 - mean2`` from summary statistics (unpaired: for
    results that kept only each variant's mean and sd; wider than the paired interval when
    seeds share data order)."""
    v1, v2 = s1 ** 2 / n1, s2 ** 2 / n2
    se = math.sqrt(v1 + v2)
    df = (v1 + v2) ** 2 / (v1 ** 2 / (n1 - 1) + v2 ** 2 / (n2 - 1)) if se > 0 else n1 + n2 - 2
    half = t_quantile(0.5 + level / 2, df) * se
    d = m1 - m2
    return Interval(min(n1, n2), d, se * math.sqrt(min(n1, n2)), d - half, d + half)
