"""Paired comparison of two segmentation methods on the same test volumes: the statistics of the experiment table.

The unit of analysis is the TEST VOLUME. Seeds are repeated trainings of the same method, not new patients, so the
rows ``(seed, volume)`` of one method are not independent: treating 6 volumes x 3 seeds as 18 pairs makes a nominal
95 % interval cover 70-84 % of the time. Here every method's score of a volume is first averaged over its seeds,
then each volume gives ONE paired difference ``arm - reference``, and every statistic is over those n differences:

- the mean and a Student-t interval, ``mean ± t_{(1+c)/2, n-1} sd / sqrt(n)``;
- an EXACT two-sided Wilcoxon signed-rank p-value (:func:`wilcoxon_exact`): zero differences (``|d| <``
  :data:`TIE_TOLERANCE`) are dropped as in Wilcoxon's original test and counted; tied ``|d|`` get average ranks and
  the p-value is that of the exact permutation distribution of the signed-rank sum given those ranks (equal to
  ``scipy.stats.wilcoxon(d, method="exact")`` when there are no ties and no zeros);
- wins / ties / losses: volumes with ``d >= tol`` / ``|d| < tol`` / ``d <= -tol`` (tol = :data:`TIE_TOLERANCE`);
- a percentile bootstrap interval (:func:`bootstrap_weights`, :data:`BOOTSTRAP_RESAMPLES` resamples, fixed seed
  :data:`BOOTSTRAP_SEED`) of the mean difference and of the share of the teacher-student gap closed,
  ``(mean arm - mean reference) / (mean teacher - mean reference)`` over the same resampled volumes. With K-fold
  cross-validation the bootstrap is hierarchical (stratified by the training run): K folds are drawn with
  replacement, then within every drawn fold its volumes are drawn with replacement, so the fold-to-fold variation
  of the trained networks is part of the interval.

The per-seed mean differences (one number per seed: mean over volumes of ``arm_s - reference_s``) are listed apart
(:func:`per_seed_differences`): they show the seed-to-seed spread but are not the test.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = [
    "BOOTSTRAP_RESAMPLES",
    "BOOTSTRAP_SEED",
    "TIE_TOLERANCE",
    "VolumeComparison",
    "bootstrap_weights",
    "compare_volumes",
    "per_seed_differences",
    "per_volume",
    "t_interval",
    "wilcoxon_exact",
]

#: |difference| below this is a tie (no winner; dropped from the Wilcoxon test, as zero differences)
TIE_TOLERANCE = 1e-6

#: bootstrap resamples of every interval
BOOTSTRAP_RESAMPLES = 4000

#: seed of the bootstrap's generator (the same resampled volumes for every arm of a table)
BOOTSTRAP_SEED = 20240601

#: up to this many non-zero differences the exact Wilcoxon distribution is computed (O(n^3) work); above, the
#: normal approximation with tie correction (``scipy.stats.wilcoxon(method="approx")``)
WILCOXON_EXACT_MAX = 500


def per_volume(frame: pd.DataFrame, column: str, volume: Sequence[str] = ("fold", "case")) -> pd.Series:
    """One method's score of every volume: the mean over its seeds (NaN values, e.g. undefined RVD, left out).

    Args:
        frame: rows of ONE method (``seed`` + the ``volume`` columns + ``column``).
        column: the metric.
        volume: columns that identify a volume (those absent from ``frame`` are ignored).

    Returns:
        the per-volume means, indexed by the volume columns (volumes with no defined value dropped).

    Raises:
        ValueError: ``column`` missing.
    """
    if column not in frame.columns:
        raise ValueError(f"no column {column!r}; columns: {sorted(frame.columns)}")
    keys = [k for k in volume if k in frame.columns]
    if not keys:
        raise ValueError(f"none of the volume columns {list(volume)} present; columns: {sorted(frame.columns)}")
    return frame.groupby(keys)[column].mean().dropna()


def t_interval(d: np.ndarray, confidence: float = 0.95) -> tuple[float, float, float, float]:
    """Mean, sample sd and the Student-t interval ``mean ± t_{(1+c)/2, n-1} sd / sqrt(n)`` of independent values.

    Returns:
        ``(mean, sd, low, high)``; mean NaN without values, sd and the interval NaN with fewer than 2.
    """
    d = np.asarray(d, dtype=np.float64)
    d = d[~np.isnan(d)]
    n = d.size
    mean = float(d.mean()) if n else math.nan
    sd = float(d.std(ddof=1)) if n > 1 else math.nan
    if n < 2:
        return mean, sd, math.nan, math.nan
    from scipy import stats

    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return mean, sd, mean - half, mean + half


def wilcoxon_exact(d: Sequence[float] | np.ndarray, tol: float = TIE_TOLERANCE) -> tuple[float, int, int]:
    """Two-sided Wilcoxon signed-rank p-value of paired differences, exact.

    Differences with ``|d| < tol`` are zeros: dropped (Wilcoxon's own rule) and counted. The others are ranked by
    ``|d|`` (rounded to 1e-12 so floating-point noise does not split ties; tied values get their average rank);
    ``W+`` is the rank sum of the positive ones. Under the null every sign assignment of the ranks is equally
    likely (2^n); the p-value is ``P(|W+ - T/2| >= |w+ - T/2|)`` with ``T`` the sum of the ranks, computed by
    dynamic programming over the doubled (integer) ranks, exact for ties too. Above :data:`WILCOXON_EXACT_MAX`
    non-zero differences the normal approximation is used instead.

    Args:
        d: paired differences (NaN dropped).
        tol: zero tolerance.

    Returns:
        ``(p, n used, n zeros)``; p is NaN when no difference is non-zero.
    """
    x = np.asarray(d, dtype=np.float64)
    x = x[~np.isnan(x)]
    zero = np.abs(x) < tol
    nz = x[~zero]
    n = int(nz.size)
    if n == 0:
        return math.nan, 0, int(zero.sum())
    from scipy import stats

    if n > WILCOXON_EXACT_MAX:
        return float(stats.wilcoxon(nz, method="approx").pvalue), n, int(zero.sum())
    ranks2 = np.rint(2 * stats.rankdata(np.round(np.abs(nz), 12))).astype(np.int64)  # doubled: integers with ties
    total = int(ranks2.sum())
    w2 = int(ranks2[nz > 0].sum())
    prob = np.zeros(total + 1)
    prob[0] = 1.0
    top = 0
    for r in ranks2:  # distribution of the doubled W+ after adding each rank with sign + or - (prob 1/2 each)
        nxt = 0.5 * prob
        nxt[r : top + r + 1] += 0.5 * prob[: top + 1]
        prob, top = nxt, top + int(r)
    sums = np.arange(total + 1)
    extreme = np.abs(2 * sums - total) >= abs(2 * w2 - total)
    return float(min(1.0, prob[extreme].sum())), n, int(zero.sum())


def bootstrap_weights(groups: Sequence[object] | np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """How often each volume is drawn in each bootstrap resample, hierarchical over groups (folds).

    Stage 1 draws as many groups as there are, with replacement; stage 2 draws, within every drawn group, as many of
    its volumes as it holds, with replacement. With one group this is the ordinary bootstrap over volumes. A
    resampled mean is ``weights @ values / weights.sum(1)``.

    Args:
        groups: the group (fold) of every volume, length n.
        resamples: number of resamples (B).
        seed: generator seed.

    Returns:
        ``(B, n)`` integer counts.

    Raises:
        ValueError: no volume or ``resamples < 1``.
    """
    g = np.asarray(groups)
    if g.size == 0:
        raise ValueError("bootstrap_weights: no volume to resample.")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}.")
    rng = np.random.default_rng(seed)
    labels = list(dict.fromkeys(g.tolist()))
    k = len(labels)
    drawn = rng.multinomial(k, np.full(k, 1.0 / k), size=resamples)  # (B, K): times each group is drawn
    weights = np.zeros((resamples, g.size), dtype=np.int64)
    for j, label in enumerate(labels):
        members = np.flatnonzero(g == label)
        m = members.size
        # drawing m volumes c times from the group = one multinomial with c * m trials
        weights[:, members] = rng.multinomial(drawn[:, j] * m, np.full(m, 1.0 / m))
    return weights


def per_seed_differences(arm: pd.DataFrame, reference: pd.DataFrame, column: str, volume: Sequence[str] = ("fold", "case")) -> dict[int, float]:
    """Per seed both methods ran: the mean over volumes of ``arm - reference`` (same seed, same volume).

    Returns:
        ``{seed: mean difference}`` in seed order (seeds without common defined volumes left out).
    """
    keys = [k for k in volume if k in arm.columns and k in reference.columns]
    merged = arm[["seed", *keys, column]].merge(reference[["seed", *keys, column]], on=["seed", *keys], suffixes=("_a", "_b"))
    merged = merged.dropna(subset=[f"{column}_a", f"{column}_b"])
    diff = (merged[f"{column}_a"] - merged[f"{column}_b"]).groupby(merged["seed"]).mean()
    return {int(s): float(v) for s, v in diff.sort_index().items()}


@dataclass(frozen=True)
class VolumeComparison:
    """An arm against the reference over test volumes (every value per volume, each volume averaged over seeds).

    Attributes:
        n: volumes both methods define.
        mean, sd, ci_low, ci_high: mean and sd of the per-volume differences, Student-t interval.
        wilcoxon_p: exact two-sided Wilcoxon signed-rank p (NaN when every difference is a tie).
        wins, ties, losses: volumes with difference >= tol, |difference| < tol, <= -tol.
        boot_low, boot_high: percentile bootstrap interval of the mean difference.
        gap_closed: ``(mean arm - mean reference) / (mean teacher - mean reference)`` over the volumes all three
            define (NaN without a teacher or when the teacher is not better).
        gap_low, gap_high: its percentile bootstrap interval (NaN when more than ``(1 - confidence) / 2`` of the
            resamples have the teacher not better than the reference: the ratio is unbounded there).
        gap_undefined: share of the resamples where the teacher was not better.
    """

    n: int
    mean: float
    sd: float
    ci_low: float
    ci_high: float
    wilcoxon_p: float
    wins: int
    ties: int
    losses: int
    boot_low: float
    boot_high: float
    gap_closed: float = math.nan
    gap_low: float = math.nan
    gap_high: float = math.nan
    gap_undefined: float = math.nan


def compare_volumes(
    arm: pd.Series,
    reference: pd.Series,
    teacher: pd.Series | None = None,
    *,
    confidence: float = 0.95,
    tol: float = TIE_TOLERANCE,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    group_level: str | None = "fold",
) -> VolumeComparison:
    """Every statistic of one arm against the reference, over the volumes both define.

    Args:
        arm: per-volume scores of the arm (:func:`per_volume`), indexed by volume.
        reference: the same for the reference (the student without KD).
        teacher: the same for the teacher (for the gap closed; None: no gap).
        confidence: coverage of the t and bootstrap intervals.
        tol: tie tolerance (:data:`TIE_TOLERANCE`).
        resamples: bootstrap resamples.
        seed: bootstrap seed.
        group_level: index level holding the fold (the bootstrap's first stage); absent or None: one group.

    Returns:
        the :class:`VolumeComparison`; every value NaN (counts 0) without common volumes.
    """
    both = pd.concat({"a": arm, "r": reference}, axis=1, join="inner").dropna()
    n = len(both)
    nan = math.nan
    if n == 0:
        return VolumeComparison(0, nan, nan, nan, nan, nan, 0, 0, 0, nan, nan)
    d = (both["a"] - both["r"]).to_numpy(np.float64)
    mean, sd, lo, hi = t_interval(d, confidence)
    p, _, _ = wilcoxon_exact(d, tol)
    wins, losses = int((d >= tol).sum()), int((d <= -tol).sum())
    names = list(both.index.names)
    groups = both.index.get_level_values(group_level).to_numpy() if group_level in names else np.zeros(n)
    w = bootstrap_weights(groups, resamples, seed)
    total = w.sum(1)
    alpha = (1 - confidence) / 2
    boot = (w @ d) / total
    b_lo, b_hi = (float(v) for v in np.percentile(boot, [100 * alpha, 100 * (1 - alpha)]))
    gap = g_lo = g_hi = g_undef = nan
    if teacher is not None:
        three = both.join(teacher.rename("t"), how="inner").dropna()
        if len(three):
            a3, r3, t3 = (three[c].to_numpy(np.float64) for c in ("a", "r", "t"))
            denominator = t3.mean() - r3.mean()
            if denominator > 0:
                gap = float((a3.mean() - r3.mean()) / denominator)
            g3 = three.index.get_level_values(group_level).to_numpy() if group_level in names else np.zeros(len(three))
            w3 = w if len(three) == n else bootstrap_weights(g3, resamples, seed)
            num, den = w3 @ (a3 - r3), w3 @ (t3 - r3)
            ok = den > 0
            g_undef = float(1 - ok.mean())
            if g_undef <= alpha and ok.any():
                g_lo, g_hi = (float(v) for v in np.percentile(num[ok] / den[ok], [100 * alpha, 100 * (1 - alpha)]))
    return VolumeComparison(n, mean, sd, lo, hi, p, wins, n - wins - losses, losses, b_lo, b_hi, gap, g_lo, g_hi, g_undef)
