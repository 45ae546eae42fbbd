"""Per-cell statistics of a spatial probe (method.md §3), and curves against position for
continuous shifts.

Input: a tidy table with one row per (item, placement) and columns ``id``, ``cell`` (row-major
0..n·m−1), ``correct`` (bool) and ``p_correct`` (float); the number of cells comes from the
``n_cells`` column that :func:`analyses.evaluate.score_probe` writes (the probe's grid), from
the ``n_cells`` argument, or is the paper's 9.
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy import stats

from interp.errors import SpatialBiasError

N_CELLS = 9
"""Cells of the paper's 3×3 grid: the default when a table does not say its grid."""


def table_grid(df: pd.DataFrame, n_cells: int | None = None) -> tuple[int, int] | None:
    """(rows, cols) from a table's ``grid`` column ("4x4"), if it has one and it is unique."""
    from probes.format import parse_grid
    if "grid" not in df.columns or df.empty:
        return None
    grids = df["grid"].dropna().unique()
    if len(grids) != 1:
        raise SpatialBiasError(f"the table mixes grids {sorted(map(str, grids))}; compute metrics per grid")
    g = parse_grid(str(grids[0]))
    if n_cells is not None and g[0] * g[1] != n_cells:
        raise SpatialBiasError(f"n_cells={n_cells} does not match the table's {grids[0]} grid")
    return g


def table_cells(df: pd.DataFrame, n_cells: int | None = None) -> int:
    """The number of grid cells of a scored table: ``n_cells`` if given, else its ``n_cells``
    column (which must be unique), else :data:`N_CELLS`."""
    if n_cells is None and "n_cells" in df.columns and not df.empty:
        vals = df["n_cells"].unique()
        if len(vals) != 1:
            raise SpatialBiasError(f"the table mixes grids with {sorted(int(v) for v in vals)} cells; "
                                   "compute metrics per grid")
        n_cells = int(vals[0])
    n_cells = N_CELLS if n_cells is None else int(n_cells)
    if len(df) and (df["cell"].min() < 0 or df["cell"].max() >= n_cells):
        raise SpatialBiasError(f"cell indices {int(df['cell'].min())}..{int(df['cell'].max())} do not fit "
                               f"{n_cells} cells; pass n_cells or score the probe with score_probe")
    return n_cells


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


def cell_metrics(df: pd.DataFrame, seed: int = 0, n_resamples: int = 2000, n_cells: int | None = None) -> dict:
    """Summary of one condition: per-cell accuracy / p(correct) with bootstrap 95% intervals,
    overall accuracy, range (max − min), std (population, across cells), coefficient of
    variation, chi-square homogeneity, and consistency (share of items scored the same —
    all right or all wrong — at every position they appear in).

    Per-cell lists have ``n_cells`` entries (:func:`table_cells`; NaN for a cell no row
    falls in); ``grid`` is [rows, cols] when the table says its grid, else [3, 3] for 9 cells.
    """
    rng = np.random.default_rng(seed)
    n_cells = table_cells(df, n_cells)
    grid = table_grid(df, n_cells) or ((3, 3) if n_cells == N_CELLS else (1, n_cells))
    by = df.groupby("cell")
    cells = range(n_cells)
    acc = np.array([by.get_group(k)["correct"].mean() if k in by.groups else np.nan for k in cells])
    pc = np.array([by.get_group(k)["p_correct"].mean() if k in by.groups else np.nan for k in cells])
    n = np.array([len(by.get_group(k)) if k in by.groups else 0 for k in cells])
    hits = np.array([by.get_group(k)["correct"].sum() if k in by.groups else 0 for k in cells])
    ci = [bootstrap_ci(by.get_group(k)["correct"].to_numpy(), rng, n_resamples) if k in by.groups
          else (np.nan, np.nan) for k in cells]
    present = n > 0
    chi2, chi2_p = chi2_homogeneity(hits[present], n[present])
    mean = float(np.nanmean(acc))
    (range_lo, range_hi), (mean_lo, mean_hi) = _item_intervals(df, n_cells, rng, n_resamples)
    per_item = df.groupby("id")["correct"].agg(["min", "max"])
    return {
        "cell_accuracy": _list(acc), "cell_p_correct": _list(pc), "cell_n": n.tolist(),
        "cell_ci_low": _list([c[0] for c in ci]), "cell_ci_high": _list([c[1] for c in ci]),
        "mean_accuracy": mean, "mean_p_correct": float(np.nanmean(pc)),
        "range": float(np.nanmax(acc) - np.nanmin(acc)), "std": float(np.nanstd(acc)),
        "cv": float(np.nanstd(acc) / mean) if mean else float("nan"),
        "chi2": chi2, "chi2_p": chi2_p,
        "consistency": float((per_item["min"] == per_item["max"]).mean()),
        "range_ci": [range_lo, range_hi], "mean_accuracy_ci": [mean_lo, mean_hi],
        "grid": [int(grid[0]), int(grid[1])],
    }


def _item_intervals(df: pd.DataFrame, n_cells: int, rng: np.random.Generator, n_resamples: int
                    ) -> tuple[tuple[float, float], tuple[float, float]]:
    """Percentile 95% intervals of the range across cells and of the mean accuracy, with items
    resampled (an item keeps all its placements, so cells stay paired as in the probe)."""
    wide = df.pivot_table(index="id", columns="cell", values="correct", aggfunc="mean")
    wide = wide.reindex(columns=range(n_cells)).to_numpy(float)  # (items, cells), NaN where absent
    n = len(wide)
    if n < 2:
        return (float("nan"), float("nan")), (float("nan"), float("nan"))
    ranges, means = [], []
    for start in range(0, n_resamples, 200):  # bounded memory: (200, items, cells) at a time
        idx = rng.integers(0, n, (min(200, n_resamples - start), n))
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an item-less cell in a resample
            per_cell = np.nanmean(wide[idx], axis=1)  # (R, cells)
            ranges.append(np.nanmax(per_cell, 1) - np.nanmin(per_cell, 1))
            means.append(np.nanmean(per_cell, 1))
    r, m = np.concatenate(ranges), np.concatenate(means)
    return tuple(float(x) for x in np.nanpercentile(r, [2.5, 97.5])), \
        tuple(float(x) for x in np.nanpercentile(m, [2.5, 97.5]))


def shift_curve(df: pd.DataFrame, key: str = "correct", seed: int = 0, n_resamples: int = 2000,
                level: float = 0.95) -> pd.DataFrame:
    """A metric against the target's position for a continuous-shift probe.

    ``df``: one condition's scored rows with an ``offset`` column (pixels along the path;
    :func:`analyses.evaluate.score_probe` writes it for shift rows) and ``key`` (``correct``,
    ``p_correct`` or ``logit_diff``). Returns one row per offset, sorted: ``offset``, ``n``,
    ``mean``, ``ci_low``, ``ci_high`` (percentile bootstrap of the mean over items), ``cell``
    (the grid cell holding the box centre at that offset).
    """
    if "offset" not in df.columns or df["offset"].isna().all():
        raise SpatialBiasError("the table has no 'offset' column; a position curve needs a shift probe "
                               "(spatialbias probe build --kind shift)")
    rng = np.random.default_rng(seed)
    out = []
    for off, g in df.dropna(subset=["offset"]).groupby("offset", sort=True):
        x = g[key].to_numpy(dtype=float)
        lo, hi = bootstrap_ci(x, rng, n_resamples, level)
        out.append({"offset": int(off), "n": len(x), "mean": float(x.mean()), "ci_low": lo, "ci_high": hi,
                    "cell": int(g["cell"].mode().iloc[0])})
    return pd.DataFrame(out)


def _list(a) -> list[float]:
    return [float(x) for x in a]


def item_bootstrap(arrays: dict[str, np.ndarray], fn, rng: np.random.Generator, n_resamples: int = 2000,
                   level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of ``fn(**means)`` where the items are resampled jointly:
    ``arrays`` maps a name to per-item values (N,) of the same items; ``fn`` takes the resampled
    means (arrays of n_resamples) by name, vectorised (e.g. a ratio of means). NaN when there are
    fewer than two items; resamples where ``fn`` is not finite (a zero gap) are dropped."""
    vals = {k: np.asarray(v, float) for k, v in arrays.items()}
    n = len(next(iter(vals.values())))
    if n < 2:
        return float("nan"), float("nan")
    idx = rng.integers(0, n, (n_resamples, n))
    with np.errstate(divide="ignore", invalid="ignore"):
        stat = np.asarray(fn(**{k: v[idx].mean(1) for k, v in vals.items()}), float)
    stat = stat[np.isfinite(stat)]
    if not len(stat):
        return float("nan"), float("nan")
    lo, hi = np.percentile(stat, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)
