"""Verdicts from declared claims (tfm_jax.ablate.verdict, report.judge_claim) against textbook
cases, the t formula in numpy and scipy's paired t test."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from tfm_jax.ablate import report, verdict as V
from tfm_jax.ablate.spec import ExperimentError, load_experiment

# Cushny & Peebles' sleep data (Student 1908): extra hours of sleep, paired by patient. Its
# paired t interval is the textbook one: mean 1.58, 95 % CI [0.7001, 2.4599].
SLEEP_A = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
SLEEP_B = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]


def test_t_quantiles_are_the_table_values():
    assert V.t_quantile(0.975, 1) == pytest.approx(12.706, abs=1e-3)
    assert V.t_quantile(0.975, 2) == pytest.approx(4.303, abs=1e-3)
    assert V.t_quantile(0.975, 9) == pytest.approx(2.262, abs=1e-3)


def test_paired_interval_textbook_and_formula():
    d = np.array(SLEEP_B) - np.array(SLEEP_A)
    iv = V.t_interval(d)
    assert (iv.mean, iv.lo, iv.hi) == pytest.approx((1.58, 0.7001142, 2.4598858), abs=1e-6)
    half = sps.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    assert iv.half_width == pytest.approx(half)
    want = sps.ttest_rel(SLEEP_B, SLEEP_A).confidence_interval(0.95)
    assert (iv.lo, iv.hi) == pytest.approx((want.low, want.high))
    assert V.t_interval([3.0]) is None
    assert V.t_interval([3.0], exact=True).lo == 3.0


def test_mde_has_the_declared_power_and_seeds_needed_inverts_it():
    sd, n = 1.3, 10
    m = V.mde(sd, n)
    assert m == pytest.approx((sps.t.ppf(0.975, 9) + sps.t.ppf(0.8, 9)) * sd / math.sqrt(n))
    # power of the two-sided paired t test at that true effect (noncentral t): ~80 %
    crit = sps.t.ppf(0.975, n - 1)
    power = sps.nct.sf(crit, n - 1, m / (sd / math.sqrt(n)))
    assert 0.77 < power < 0.83
    k = V.seeds_needed(sd, 1.0)
    assert V.mde(sd, k) <= 1.0 < V.mde(sd, k - 1)
    assert V.mde(sd, 1) == math.inf


def iv(values):
    return V.t_interval(values)


@pytest.mark.parametrize("values, kw, want", [
    # row 25's shape: +0.028 with a spread that leaves both signs possible -> inconclusive
    ([0.07, -0.01, 0.023], dict(kind="superiority", direction="greater"), V.INCONCLUSIVE),
    ([0.5, 0.6, 0.55], dict(kind="superiority", direction="greater"), V.CONSISTENT),
    ([-0.5, -0.6, -0.55], dict(kind="superiority", direction="greater"), V.INCONSISTENT),
    ([-0.5, -0.6, -0.55], dict(kind="superiority", direction="less"), V.CONSISTENT),
    # equivalence: the whole interval inside the margin
    ([0.01, -0.01, 0.0, 0.005], dict(kind="equivalence", margin=0.05), V.CONSISTENT),
    ([0.04, 0.01, 0.06], dict(kind="equivalence", margin=0.05), V.INCONCLUSIVE),
    ([0.3, 0.31, 0.29], dict(kind="equivalence", margin=0.05), V.INCONSISTENT),
    # row 57's shape: gaps +1.63 / -1.21 / +0.27 % within a 1 % margin -> inconclusive
    ([1.63, -1.21, 0.27], dict(kind="non_inferiority", direction="less", margin=1.0),
     V.INCONCLUSIVE),
    ([0.1, 0.2, 0.15], dict(kind="non_inferiority", direction="less", margin=1.0),
     V.CONSISTENT),
    # the seed's exact FP8 recipe: +8.02 % with a small spread -> inconsistent with 1 %
    ([7.3, 8.1, 8.7], dict(kind="non_inferiority", direction="less", margin=1.0),
     V.INCONSISTENT),
    ([0.99, 1.01, 1.0], dict(kind="non_inferiority", direction="greater", margin=0.1,
                             expected=1.0), V.CONSISTENT),
    # point value with tolerance: GQA +0.149 ± 0.067 vs the seed's 0.12 +- 0.1
    ([0.08, 0.15, 0.217], dict(kind="point", expected=0.12, margin=0.1), V.INCONCLUSIVE),
    ([0.12, 0.121, 0.119], dict(kind="point", expected=0.12, margin=0.01), V.CONSISTENT),
    ([0.5, 0.51, 0.49], dict(kind="point", expected=0.12, margin=0.1), V.INCONSISTENT),
])
def test_decide(values, kw, want):
    assert V.decide(iv=iv(values), **kw)[0] == want


def test_decide_one_seed_and_timing_spread():
    assert V.decide("superiority", None, direction="greater")[0] == V.INCONCLUSIVE
    # consistent as a difference, but the repeats' spread (sd 0.5) exceeds the effect (0.3)
    noisy = iv([0.3 + x for x in (-0.5, 0.5, 0.0, -0.45, 0.45, 0.0) * 4])
    assert V.decide("superiority", noisy, direction="greater")[0] == V.CONSISTENT
    verdict, why = V.decide("superiority", noisy, direction="greater", timing=True)
    assert verdict == V.INCONCLUSIVE and "spread" in why
    assert V.decide("superiority", iv([1.0, 1.1]), direction="greater",
                    timing=True)[0] == V.INCONCLUSIVE     # two repeats only


def _runs(a, b):
    return ([{"variant": "a", "seed": s, "status": "ok", "metrics": {"loss": x}}
             for s, x in enumerate(a)]
            + [{"variant": "b", "seed": s, "status": "ok", "metrics": {"loss": x}}
               for s, x in enumerate(b)])


def test_judge_claim_pairs_by_seed():
    """Large seed-to-seed spread, small consistent gap: the paired interval decides, the two
    means' overlap would not."""
    a = [2.0, 2.5, 3.0, 2.2, 2.8]
    b = [x + d for x, d in zip(a, (0.05, 0.06, 0.04, 0.05, 0.055))]
    runs = _runs(a, b)
    agg = report.aggregate(runs, ["a", "b"])
    claim = {"claim": "b is worse", "metric": "loss[b] - loss[a]", "kind": "superiority",
             "direction": "greater"}
    row = report.judge_claim(claim, agg, "here", runs)
    want = sps.ttest_rel(b, a).confidence_interval(0.95)
    assert row["interval"] == pytest.approx([want.low, want.high])
    assert row["verdict"] == "consistent" and row["n"] == 5
    assert row["mde"] == pytest.approx(V.mde(np.std(np.subtract(b, a), ddof=1), 5))
    # unpaired (Welch) over the same data: the interval straddles 0
    welch = sps.ttest_ind(b, a, equal_var=False).confidence_interval(0.95)
    assert welch.low < 0 < welch.high


def test_judge_claim_hardware_and_deterministic():
    runs = _runs([1.0, 1.0], [2.0, 2.0])
    agg = report.aggregate(runs, ["a", "b"])
    claim = {"claim": "b twice a on H100", "metric": "loss[b] / loss[a]", "kind": "point",
             "expected": 2.0, "margin": "5%", "deterministic": True, "device": "H100"}
    row = report.judge_claim(claim, agg, "here", runs, device_kind="cpu")
    assert row["verdict"] == "not measurable here" and row["stand_in_verdict"] == "consistent"
    row = report.judge_claim(claim, agg, "here", runs, device_kind="NVIDIA H100 80GB HBM3")
    assert row["verdict"] == "consistent"
    bad = report.judge_claim(claim, agg, "here", _runs([1.0, 1.1], [2.0, 2.0]), "H100")
    assert bad["verdict"].startswith("error: declared deterministic")


@pytest.mark.parametrize("claim, match", [
    ({"kind": "superiorty"}, r"claim 'c': kind 'superiorty' .*did you mean 'superiority'"),
    ({"kind": "equivalence"}, r"claim 'c': margin: kind equivalence needs a margin"),
    ({"kind": "superiority"}, r"claim 'c': direction: kind superiority needs direction"),
    ({"kind": "point", "margin": 0.1}, r"claim 'c': expected: kind point needs"),
    ({"kind": "point", "expected": 1, "margin": -1}, r"claim 'c': margin -1 must be > 0"),
    ({"kind": "equivalence", "margin": "5%"}, r"claim 'c': margin '5%'"),
])
def test_bad_declarations_name_the_claim(claim, match):
    raw = {"name": "x", "variants": {"a": {}, "b": {}},
           "claims": [{"claim": "c", "metric": "val_loss[a] - val_loss[b]", **claim}]}
    with pytest.raises(ExperimentError, match=match) as err:
        load_experiment("x.yaml", raw)
    assert "claims.0" in str(err.value)


def test_seed_plan_from_a_pilot_and_a_stated_sd():
    raw = {"name": "x", "variants": {"a": {}, "b": {}}, "seeds": [0, 1],
           "claims": [{"claim": "b within 0.1 of a", "metric": "val_loss[b] - val_loss[a]",
                       "kind": "equivalence", "margin": 0.1}]}
    exp = load_experiment("x.yaml", raw)
    d = [0.05, -0.02, 0.03, 0.0]
    runs = _runs([1.0] * 4, [1.0 + x for x in d])
    runs = [{**r, "metrics": {"val_loss": r["metrics"]["loss"]}} for r in runs]
    lines = report.seed_plan(exp, runs)
    sd = np.std(d, ddof=1)
    want = V.seeds_needed(sd, 0.1)
    assert f"sd {sd:.3g}" in lines[1] and f"{want} seeds for margin 0.1" in lines[1]
    assert f"{V.mde(sd, 2):.3g}" in lines[1]
    assert f"{V.seeds_needed(0.2, 0.1)} seeds" in report.seed_plan(exp, sd=0.2)[1]
