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

from spatialbias.errors import SpatialBiasError

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

    Whether the cells differ, and by how much (docs/statistics.md has the simulations):

    * ``paired_test`` / ``paired_stat`` / ``paired_df`` / ``paired_p`` — the primary test:
      Cochran's Q on the items × cells table of ``correct`` (an item's placements are paired),
      p from χ²(df) or, with few informative items or incomplete items, from within-item
      permutations (:func:`paired_test`);
    * ``chi2`` / ``chi2_p`` — secondary: a cells × {right, wrong} χ² that treats the placements
      as independent (far too conservative when items differ in difficulty);
    * ``range`` — the raw max − min of the cell accuracies, biased upward by noise;
      ``range_debiased`` — median-unbiased estimate of the true range; ``range_ci`` (and the
      same ``range_debiased_ci``) — its 95 % test-inversion interval, whose lower end is 0 when
      the observed range is within what noise alone gives (:func:`inverted_interval`);
    * ``spread`` / ``spread_ci`` — the same for Cohen's h between the best and worst cell
      (:func:`cohen_h_range`), a range on the variance-stabilised arcsine scale, so a ceiling
      (or a floor) does not shrink it as it shrinks the raw range.
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
    wide = item_matrix(df, n_cells)
    boot = item_resamples(wide, rng, n_resamples)
    mean_lo, mean_hi = _percentile_ci(np.nanmean(boot, 1) if len(boot) else boot)
    rng_est, rng_lo, rng_hi = inverted_interval(acc, boot - acc, cell_range)
    h_est, h_lo, h_hi = inverted_interval(acc, boot - acc, cohen_h_range)
    q, q_df, q_p, q_name = paired_test(wide, rng, n_resamples)
    per_item = df.groupby("id")["correct"].agg(["min", "max"])
    return {
        "cell_accuracy": _list(acc), "cell_p_correct": _list(pc), "cell_n": n.tolist(),
        "cell_ci_low": _list([c[0] for c in ci]), "cell_ci_high": _list([c[1] for c in ci]),
        "mean_accuracy": mean, "mean_p_correct": float(np.nanmean(pc)),
        "range": float(np.nanmax(acc) - np.nanmin(acc)), "std": float(np.nanstd(acc)),
        "cv": float(np.nanstd(acc) / mean) if mean else float("nan"),
        "chi2": chi2, "chi2_p": chi2_p,
        "consistency": float((per_item["min"] == per_item["max"]).mean()),
        "range_ci": [rng_lo, rng_hi], "mean_accuracy_ci": [mean_lo, mean_hi],
        "range_debiased": rng_est, "range_debiased_ci": [rng_lo, rng_hi],
        "spread": h_est, "spread_ci": [h_lo, h_hi],
        "paired_test": q_name, "paired_stat": q, "paired_df": q_df, "paired_p": q_p,
        "grid": [int(grid[0]), int(grid[1])],
    }


def item_matrix(df: pd.DataFrame, n_cells: int) -> np.ndarray:
    """``correct`` as an (items, cells) float array: 1.0 right, 0.0 wrong, NaN where an item has
    no placement in a cell (several rows of one item and cell are averaged)."""
    wide = df.pivot_table(index="id", columns="cell", values="correct", aggfunc="mean")
    return wide.reindex(columns=range(n_cells)).to_numpy(float)


def item_resamples(wide: np.ndarray, rng: np.random.Generator, n_resamples: int) -> np.ndarray:
    """Per-cell means (n_resamples, cells) of item-bootstrap resamples of ``wide`` (items, cells):
    an item keeps all its placements, so cells stay paired as in the probe. NaN where a
    resample has no item in a cell; an empty (0, cells) array with fewer than two items."""
    n = len(wide)
    if n < 2:
        return np.empty((0, wide.shape[1]))
    out = []
    for start in range(0, n_resamples, 200):  # bounded memory: (200, items, cells) at a time
        idx = rng.integers(0, n, (min(200, n_resamples - start), n))
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an item-less cell in a resample
            out.append(np.nanmean(wide[idx], axis=1))
    return np.concatenate(out)


def _percentile_ci(x: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Equal-tailed percentile interval of the finite values of ``x`` (R,); NaN when none."""
    x = x[np.isfinite(x)]
    if not len(x):
        return float("nan"), float("nan")
    lo, hi = np.percentile(x, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


# ------------------------------------------------------------------------------------------------
# the paired homogeneity test (docs/statistics.md)

MIN_ASYMPTOTIC_ITEMS = 50
"""Informative items (right in some cells, wrong in others) from which Cochran's Q is read
against χ²; with fewer, or when some item lacks a cell, the p is the within-item permutation p."""


def _q_parts(wide: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The informative items of ``wide`` (items, cells) and the pieces of Cochran's Q.

    Returns (y, expected, V): ``y`` (M, cells) the M informative items (NaN where absent),
    ``expected`` (M, cells) each item's share of right answers at its present cells (0 where
    absent), ``V`` (cells, cells) the permutation covariance of the cell totals (the
    Cochran–Mantel–Haenszel variance with one stratum per item)."""
    present = np.isfinite(wide)
    n = present.sum(1)
    t = np.nansum(wide, 1)
    keep = (n >= 2) & (t > 0) & (t < n)
    y, a, n, t = wide[keep], present[keep].astype(float), n[keep].astype(float), t[keep]
    expected = a * (t / n)[:, None]
    w = t * (n - t) / (n ** 2 * (n - 1))  # (M,)
    V = np.diag((w * n) @ a) - np.einsum("i,ij,ik->jk", w, a, a)
    return y, expected, V


def cochran_q(wide: np.ndarray) -> tuple[float, int]:
    """Cochran's Q of the binary ``wide`` (items, cells; NaN where an item lacks a cell) and its
    degrees of freedom: Q = dᵀ V⁺ d with d the cell totals minus their expectation given each
    item's number of right answers. With every item in every cell this is Cochran's (1950) Q,
    (k−1)(kΣC_j² − T²)/(kT − ΣR_i²); with missing cells it is the Cochran–Mantel–Haenszel
    general-association statistic with one stratum per item. (0.0, 0) without informative items."""
    y, expected, V = _q_parts(wide)
    if not len(y):
        return 0.0, 0
    d = np.nansum(y, 0) - expected.sum(0)
    pinv, rank = _pinv_rank(V)
    return float(d @ pinv @ d), rank


def _pinv_rank(V: np.ndarray) -> tuple[np.ndarray, int]:
    """Pseudo-inverse and rank of the symmetric positive semi-definite ``V`` (k, k)."""
    vals, vecs = np.linalg.eigh(V)
    ok = vals > vals.max() * 1e-10
    return (vecs[:, ok] / vals[ok]) @ vecs[:, ok].T, int(ok.sum())


def permuted_totals(y: np.ndarray, rng: np.random.Generator, n_resamples: int) -> np.ndarray:
    """Cell totals (n_resamples, cells) of ``y`` (items, cells; NaN where absent) after shuffling
    each item's answers among the cells it has (the null: cell labels exchangeable within item)."""
    present = np.isfinite(y)
    slots = np.argsort(~present, axis=1, kind="stable")  # (M, K): an item's present cells first
    out = []
    for start in range(0, n_resamples, 200):
        keys = rng.random((min(200, n_resamples - start),) + y.shape)
        keys[:, ~present] = 2.0  # absent cells sort last and stay put
        order = np.argsort(keys, axis=-1)
        perm = np.empty_like(keys)
        np.put_along_axis(perm, np.broadcast_to(slots, keys.shape), np.take_along_axis(
            np.broadcast_to(y, keys.shape), order, -1), -1)
        out.append(np.nansum(perm, 1))
    return np.concatenate(out)


def paired_test(wide: np.ndarray, rng: np.random.Generator, n_resamples: int = 2000,
                min_items: int = MIN_ASYMPTOTIC_ITEMS) -> tuple[float, int, float, str]:
    """Homogeneity of per-cell accuracy with an item's placements paired: (Q, df, p, name).

    ``wide`` (items, cells), binary with NaN where absent. The p is χ²(df) of :func:`cochran_q`
    (name ``"cochran_q"``) when every item has every cell and at least ``min_items`` items are
    informative; otherwise the within-item permutation p of the same Q from ``n_resamples``
    shuffles, (1 + #{Q* ≥ Q}) / (1 + n_resamples) (name ``"cochran_q_permutation"``). No
    informative item (all right, all wrong, each item constant): (0.0, 0, 1.0, "cochran_q")."""
    q, df = cochran_q(wide)
    y, expected, V = _q_parts(wide)
    if df == 0:
        return 0.0, 0, 1.0, "cochran_q"
    if np.isfinite(wide).all() and len(y) >= min_items:
        return q, df, float(stats.chi2.sf(q, df)), "cochran_q"
    d = permuted_totals(y, rng, n_resamples) - expected.sum(0)  # (R, K)
    pinv, _ = _pinv_rank(V)
    qs = np.einsum("rj,jk,rk->r", d, pinv, d)
    return q, df, float((1 + (qs >= q * (1 - 1e-9)).sum()) / (1 + n_resamples)), "cochran_q_permutation"


# ------------------------------------------------------------------------------------------------
# debiased range / spread with test-inversion intervals (docs/statistics.md)


def cell_range(acc: np.ndarray) -> np.ndarray:
    """max − min over the last axis of ``acc`` (..., cells) → (...)."""
    return np.ptp(acc, axis=-1)


def cohen_h_range(acc: np.ndarray) -> np.ndarray:
    """Cohen's h between the best and the worst cell, 2·asin√max − 2·asin√min, over the last
    axis of ``acc`` (..., cells) → (...): the accuracy range on the variance-stabilised scale."""
    return cell_range(2 * np.arcsin(np.sqrt(np.clip(acc, 0.0, 1.0))))


def inverted_interval(acc: np.ndarray, noise: np.ndarray, stat=cell_range, level: float = 0.95,
                      n_grid: int = 161) -> tuple[float, float, float]:
    """Median-unbiased estimate and test-inversion interval of ``stat`` of the cells' true
    accuracies, for a statistic (range, Cohen's h range) that noise inflates.

    ``acc`` (cells,) observed cell accuracies (NaN cells are left out); ``noise`` (R, cells) the
    item-bootstrap deviations of the cell accuracies from ``acc``; ``stat`` maps (..., cells) to
    (...). Candidate truths are the observed profile's shape scaled to a range t ∈ [0, t_max]
    around the observed mean (a linear gradient when the observed cells tie): μ(t) = mean +
    t·shape. For each t the bootstrap noise is added to μ(t), giving the distribution of the
    observed statistic were μ(t) the truth. The interval is every t whose central ``level``
    band holds the observed value, the estimate the t whose median equals it (0 when the
    observed value is at most the median at t = 0); both are reported as stat(μ(t)). The lower
    end is 0 when the observed value is within the noise-only band. Returns (estimate, lo, hi);
    NaN without resamples."""
    ok = np.isfinite(acc)
    m, e = acc[ok], noise[:, ok]
    e = e[np.isfinite(e).all(1)]
    if len(m) < 2 or not len(e):
        return float("nan"), float("nan"), float("nan")
    dev = m - m.mean()
    r = np.ptp(dev)
    shape = dev / r if r > 0 else np.linspace(-0.5, 0.5, len(m))
    t = np.linspace(0.0, r + 8 * e.std(0).max(), n_grid)  # (G,)
    prof = np.clip(m.mean() + t[:, None] * shape, 0.0, 1.0)  # (G, K)
    sims = stat(np.clip(prof[:, None, :] + e[None], 0.0, 1.0))  # (G, R)
    lo_q, med, hi_q = np.maximum.accumulate(
        np.quantile(sims, [(1 - level) / 2, 0.5, (1 + level) / 2], axis=1), axis=1)
    obs, truth = stat(m), stat(prof)  # the observed value; (G,) the candidates' true values
    t_est, t_lo, t_hi = (np.interp(obs, q, t) for q in (med, hi_q, lo_q))
    return tuple(float(np.interp(x, t, truth)) for x in (t_est, t_lo, t_hi))


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
