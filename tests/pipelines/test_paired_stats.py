"""``pipelines.paired_stats``: the exact Wilcoxon test against an enumeration of sign assignments, the t interval
against a printed t table, and the (hierarchical) bootstrap against its closed-form variance."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from pipelines.paired_stats import (
    bootstrap_weights,
    compare_volumes,
    per_seed_differences,
    per_volume,
    t_interval,
    wilcoxon_exact,
)

#: Student's t quantiles t_{0.975, df}, from a printed t table
T_975 = {2: 4.302653, 3: 3.182446}


def _enumerated_wilcoxon_p(d: np.ndarray) -> float:
    """Two-sided p of the signed-rank sum by enumerating all 2^n sign assignments (zeros dropped, average ranks)."""
    d = d[d != 0]
    a = np.abs(d)
    ranks = np.array([np.sum(a < x) + (np.sum(a == x) + 1) / 2 for x in a])  # average rank of ties, by definition
    total = ranks.sum()
    w_obs = ranks[d > 0].sum()
    w = np.array([ranks[np.array(s, dtype=bool)].sum() for s in itertools.product((0, 1), repeat=len(d))])
    return float(np.mean(np.abs(w - total / 2) >= abs(w_obs - total / 2) - 1e-12))


@pytest.mark.parametrize(
    "d",
    [
        [0.1, -0.2, 0.3, 0.05, 0.4, -0.15],  # no ties
        [0.1, -0.1, 0.3, 0.0, 0.4, -0.2],  # a tie in |d| and a zero
        [0.2, 0.2, 0.2, -0.2, 0.1, 0.0, 0.0],  # many ties, two zeros
        [0.3, 0.1, 0.2],  # all positive: p = 2 / 2^3
    ],
)
def test_wilcoxon_exact_equals_enumeration(d):
    p, n, zeros = wilcoxon_exact(d)
    arr = np.asarray(d)
    assert p == pytest.approx(_enumerated_wilcoxon_p(arr), abs=1e-12)
    assert n == int(np.sum(arr != 0)) and zeros == int(np.sum(arr == 0))


def test_wilcoxon_exact_hand_values_and_scipy():
    # all three positive: W+ = 6 is the most extreme of 8 equally likely sums, two-sided p = 2/8
    assert wilcoxon_exact([0.3, 0.1, 0.2])[0] == pytest.approx(0.25)
    # zeros below the tolerance are dropped and counted; nothing left: p undefined
    p, n, zeros = wilcoxon_exact([1e-9, -5e-7, 0.0])
    assert math.isnan(p) and (n, zeros) == (0, 3)
    from scipy import stats

    rng = np.random.default_rng(3)
    for n in (5, 12, 30):  # no ties: scipy's exact distribution
        d = rng.normal(0.02, 0.1, n)
        assert wilcoxon_exact(d)[0] == pytest.approx(stats.wilcoxon(d, method="exact").pvalue, rel=1e-9)


def test_t_interval_printed_table():
    mean, sd, lo, hi = t_interval(np.array([0.1, 0.05, 0.15]))
    half = T_975[2] * 0.05 / math.sqrt(3)
    assert (mean, sd) == (pytest.approx(0.1), pytest.approx(0.05))
    assert (lo, hi) == (pytest.approx(0.1 - half, abs=1e-6), pytest.approx(0.1 + half, abs=1e-6))
    assert all(math.isnan(v) for v in t_interval(np.array([0.3]))[1:])


def test_bootstrap_weights_one_group_variance():
    """One group: the ordinary bootstrap; the variance of the resampled mean is sigma_hat^2 / n (ddof 0)."""
    x = np.array([0.1, 0.5, 0.2, 0.9, 0.4, 0.3, 0.7, 0.0])
    w = bootstrap_weights(np.zeros(8), resamples=20000, seed=1)
    assert w.shape == (20000, 8) and (w.sum(1) == 8).all()
    means = w @ x / w.sum(1)
    assert means.var() == pytest.approx(x.var() / 8, rel=0.05)
    assert (bootstrap_weights(np.zeros(8), 50, seed=1) == bootstrap_weights(np.zeros(8), 50, seed=1)).all()  # fixed seed


def test_bootstrap_weights_hierarchical_variance():
    """Folds drawn with replacement, then volumes within each drawn fold: with K equal folds of m volumes the
    resampled mean has variance (var of the fold means + mean within-fold variance / m) / K (all ddof 0)."""
    folds = np.repeat([0, 1, 2], 4)
    x = np.array([0.1, 0.2, 0.3, 0.2, 0.6, 0.7, 0.5, 0.6, 0.9, 1.0, 0.8, 0.9])
    w = bootstrap_weights(folds, resamples=40000, seed=2)
    assert (w.sum(1) % 4 == 0).all()  # whole folds are drawn, each with its 4 volumes
    per_fold = x.reshape(3, 4)
    expected = (per_fold.mean(1).var() + per_fold.var(1).mean() / 4) / 3
    assert (w @ x / w.sum(1)).var() == pytest.approx(expected, rel=0.05)
    # ignoring the folds (one group) gives the smaller, wrong variance here
    assert x.var() / 12 < 0.8 * expected


def _frame(values: dict[int, list[float]], folds: list[int] | None = None) -> pd.DataFrame:
    rows = []
    for seed, vs in values.items():
        for i, v in enumerate(vs):
            rows.append({"seed": seed, "fold": (folds or [0] * len(vs))[i], "case": f"c{i}", "dsc_tumor": v})
    return pd.DataFrame(rows)


def test_compare_volumes_four_volumes_two_seeds_by_hand():
    student = _frame({0: [0.2, 0.4, 0.6, 0.5], 1: [0.4, 0.4, 0.2, 0.5]})  # volume means 0.3 0.4 0.4 0.5
    arm = _frame({0: [0.5, 0.3, 0.5, 0.5], 1: [0.5, 0.5, 0.5, 0.5]})  # 0.5 0.4 0.5 0.5
    teacher = _frame({0: [0.9, 0.8, 0.9, 0.7]})
    c = compare_volumes(per_volume(arm, "dsc_tumor"), per_volume(student, "dsc_tumor"), per_volume(teacher, "dsc_tumor"))
    # differences 0.2, 0.0, 0.1, 0.0: mean 0.075, SS 0.0275, sd sqrt(0.0275 / 3)
    sd = math.sqrt(0.0275 / 3)
    assert c.n == 4 and c.mean == pytest.approx(0.075) and c.sd == pytest.approx(sd)
    half = T_975[3] * sd / 2
    assert (c.ci_low, c.ci_high) == (pytest.approx(0.075 - half, abs=1e-6), pytest.approx(0.075 + half, abs=1e-6))
    assert (c.wins, c.ties, c.losses) == (2, 2, 0)  # 0.4 - 0.4 in floating point is a tie
    assert c.wilcoxon_p == pytest.approx(0.5)  # zeros dropped; 0.2, 0.1 both positive: 2 of 4 sign assignments
    assert 0.0 <= c.boot_low <= 0.075 <= c.boot_high <= 0.2
    # gap closed: (0.475 - 0.4) / (0.825 - 0.4) of the per-volume means
    assert c.gap_closed == pytest.approx(0.075 / 0.425)
    assert c.gap_low <= c.gap_closed <= c.gap_high and c.gap_undefined == 0.0
    assert per_seed_differences(arm, student, "dsc_tumor") == {0: pytest.approx(0.025), 1: pytest.approx(0.125)}


def test_compare_volumes_counts_volumes_not_seeds():
    rng = np.random.default_rng(0)
    student = _frame({s: list(rng.uniform(0.2, 0.6, 6)) for s in range(3)}, folds=[0, 0, 0, 1, 1, 1])
    arm = _frame({s: list(rng.uniform(0.2, 0.6, 6)) for s in range(3)}, folds=[0, 0, 0, 1, 1, 1])
    c = compare_volumes(per_volume(arm, "dsc_tumor"), per_volume(student, "dsc_tumor"))
    assert c.n == 6  # 6 volumes x 3 seeds: 6 paired differences, not 18
    d = arm.groupby("case")["dsc_tumor"].mean() - student.groupby("case")["dsc_tumor"].mean()
    assert c.mean == pytest.approx(d.mean()) and c.sd == pytest.approx(d.std(ddof=1))
    assert c.wins + c.ties + c.losses == 6 and math.isnan(c.gap_closed)
