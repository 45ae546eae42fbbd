"""Per-cell statistics of a spatial probe (method.md §3).

Input: a tidy table with one row per (item, cell) and columns ``id``, ``cell`` (0..8 row-major),
``correct`` (bool) and ``p_correct`` (float).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

N_CELLS = 9


def chi2_homogeneity(correct_counts: np.ndarray, totals: np.ndarray) -> tuple[float, float]:
    """Chi-square test that every cell has the same accuracy (a cells × {right, wrong} table).

    Returns (statistic, p). A table with an all-zero column (every answer right, or every
    answer wrong) is perfectly homogeneous: (0.0, 1.0).
    """
    table = np.stack([correct_counts, totals - correct_counts], 1).astype(float)
    if (table.sum(0) == 0).any():
        return 0.0, 1.0
    res = stats.chi2_contingency(table, correction=False)
    return float(res.statistic), float(res.pvalue)


def bootstrap_ci(x: np.ndarray, rng: np.random.Generator, n_resamples: int = 2000,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``x`` (scipy.stats.bootstrap)."""
    x = np.asarray(x, float)
    if len(x) < 2 or np.all(x == x[0]):
        v = float(x.mean()) if len(x) else float("nan")
        return v, v
    res = stats.bootstrap((x,), np.mean, n_resamples=n_resamples, confidence_level=level,
                          method="percentile", rng=rng)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def cell_metrics(df: pd.DataFrame, seed: int = 0, n_resamples: int = 2000) -> dict:
    """Summary of one condition: per-cell accuracy / p(correct) with bootstrap 95% intervals,
    overall accuracy, range (max − min), std (population, across cells), coefficient of
    variation, chi-square homogeneity, and consistency (share of items scored the same —
    all right or all wrong — at every position they appear in)."""
    rng = np.random.default_rng(seed)
    by = df.groupby("cell")
    cells = range(N_CELLS)
    acc = np.array([by.get_group(k)["correct"].mean() if k in by.groups else np.nan for k in cells])
    pc = np.array([by.get_group(k)["p_correct"].mean() if k in by.groups else np.nan for k in cells])
    n = np.array([len(by.get_group(k)) if k in by.groups else 0 for k in cells])
    hits = np.array([by.get_group(k)["correct"].sum() if k in by.groups else 0 for k in cells])
    ci = [bootstrap_ci(by.get_group(k)["correct"].to_numpy(), rng, n_resamples) if k in by.groups
          else (np.nan, np.nan) for k in cells]
    present = n > 0
    chi2, chi2_p = chi2_homogeneity(hits[present], n[present])
    mean = float(np.nanmean(acc))
    per_item = df.groupby("id")["correct"].agg(["min", "max"])
    return {
        "cell_accuracy": _list(acc), "cell_p_correct": _list(pc), "cell_n": n.tolist(),
        "cell_ci_low": _list([c[0] for c in ci]), "cell_ci_high": _list([c[1] for c in ci]),
        "mean_accuracy": mean, "mean_p_correct": float(np.nanmean(pc)),
        "range": float(np.nanmax(acc) - np.nanmin(acc)), "std": float(np.nanstd(acc)),
        "cv": float(np.nanstd(acc) / mean) if mean else float("nan"),
        "chi2": chi2, "chi2_p": chi2_p,
        "consistency": float((per_item["min"] == per_item["max"]).mean()),
    }


def _list(a) -> list[float]:
    return [float(x) for x in a]
