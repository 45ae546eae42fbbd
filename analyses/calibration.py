"""Does :func:`analyses.metrics.cell_metrics` say what it claims? Simulated probes with a known
truth, run through it, give false-positive rates, interval coverage and power (docs/statistics.md).

Role: a check of the statistics, run by hand and by tests/test_calibration.py. May import:
``analyses.metrics``.

The simulated probe: ``n_items`` items × 9 cells; item ``i`` has a logit difficulty
``b_i ~ N(base_logit, item_sd²)`` shared by its nine placements, cell ``j`` a planted logit
effect ``δ_j``; placement (i, j) is right with probability ``expit(b_i + δ_j)``, independently
given ``b_i``. A cell's *population accuracy* is ``E_b[expit(b + δ_j)]`` (the item effect
averaged out, Gauss–Hermite quadrature) and the **true range** of a profile is the max − min of
the nine population accuracies; :func:`plant` scales a shape of ``δ`` to a requested true range.

    python -m analyses.calibration --out docs/statistics.md --seed 0
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
from scipy import optimize, special

from analyses.metrics import cell_metrics, cohen_h_range, paired_test

N_CELLS = 9
BASE_LOGIT = 1.0
"""Mean item logit: population accuracy 0.671 under a flat profile with ``ITEM_SD``."""
ITEM_SD = 1.5
"""SD of the item difficulty (logits): many items are right (or wrong) at every placement."""
SHAPES = ("gradient", "one_cell")
_NODES, _WEIGHTS = np.polynomial.hermite_e.hermegauss(60)  # ∫ f(z) φ(z) dz ≈ Σ w f(z) / √(2π)


def population_accuracy(delta: np.ndarray, base_logit: float = BASE_LOGIT, item_sd: float = ITEM_SD) -> np.ndarray:
    """Accuracy (cells,) of each cell averaged over the item effect, for logit effects ``delta`` (cells,)."""
    p = special.expit(base_logit + item_sd * _NODES[:, None] + np.asarray(delta, float)[None])  # (nodes, cells)
    return _WEIGHTS @ p / np.sqrt(2 * np.pi)


def shape_of(name: str, n_cells: int = N_CELLS) -> np.ndarray:
    """A unit logit profile (cells,) centred at 0: ``gradient`` rises linearly over the cells in
    raster order (cell 0 lowest, cell 8 highest); ``one_cell`` lowers cell 0 alone."""
    if name == "gradient":
        s = np.linspace(0.0, 1.0, n_cells)
    elif name == "one_cell":
        s = np.r_[-1.0, np.zeros(n_cells - 1)]
    else:
        raise ValueError(f"unknown shape {name!r}; choose one of {SHAPES}")
    return s - s.mean()


def plant(true_range: float, shape: str = "gradient", base_logit: float = BASE_LOGIT,
          item_sd: float = ITEM_SD) -> np.ndarray:
    """Logit effects (cells,) of ``shape`` scaled so that the population accuracies have range ``true_range``."""
    s = shape_of(shape)
    if true_range == 0:
        return np.zeros_like(s)
    f = lambda c: np.ptp(population_accuracy(c * s, base_logit, item_sd)) - true_range  # noqa: E731
    return optimize.brentq(f, 0.0, 20.0) * s


def true_values(delta: np.ndarray, base_logit: float = BASE_LOGIT, item_sd: float = ITEM_SD) -> tuple[float, float]:
    """(true range, true Cohen's h range) of the population accuracies of ``delta``."""
    acc = population_accuracy(delta, base_logit, item_sd)
    return float(np.ptp(acc)), float(cohen_h_range(acc))


def simulate(rng: np.random.Generator, n_probes: int, n_items: int, delta: np.ndarray,
             base_logit: float = BASE_LOGIT, item_sd: float = ITEM_SD) -> np.ndarray:
    """Binary answers (n_probes, n_items, cells) of simulated probes (the module's model)."""
    b = rng.normal(base_logit, item_sd, (n_probes, n_items, 1))
    return (rng.random((n_probes, n_items, len(delta))) < special.expit(b + delta)).astype(float)


def tidy(wide: np.ndarray) -> pd.DataFrame:
    """One probe's (items, cells) answers as the tidy table ``cell_metrics`` reads."""
    n, k = wide.shape
    correct = wide.ravel().astype(bool)
    return pd.DataFrame({"id": np.repeat(np.arange(n), k), "cell": np.tile(np.arange(k), n),
                         "correct": correct, "p_correct": correct.astype(float)})


def run_probes(probes: np.ndarray, n_resamples: int = 500, seed: int = 0) -> pd.DataFrame:
    """``cell_metrics`` of each simulated probe (n_probes, items, cells): one row per probe with
    the scalars that calibration reads."""
    keys = ("range", "range_debiased", "spread", "chi2_p", "paired_p")
    out = []
    for i, w in enumerate(probes):
        m = cell_metrics(tidy(w), seed=seed + i, n_resamples=n_resamples)
        out.append({**{k: m[k] for k in keys}, "range_lo": m["range_ci"][0], "range_hi": m["range_ci"][1],
                    "spread_lo": m["spread_ci"][0], "spread_hi": m["spread_ci"][1], "paired_test": m["paired_test"]})
    return pd.DataFrame(out)


def _rate(x: np.ndarray) -> tuple[float, float]:
    """(share, Monte-Carlo binomial SE) of a boolean array."""
    p = float(np.mean(x))
    return p, float(np.sqrt(p * (1 - p) / len(x)))


def calibration(true_ranges=(0.0, 0.05, 0.10, 0.15), n_probes: int = 400, n_items: int = 200,
                shape: str = "gradient", seed: int = 0, n_resamples: int = 500) -> pd.DataFrame:
    """Per planted true range: rejection rates of the paired test and of the χ² at α = 0.05
    and 0.01 (false-positive rates when the range is 0), coverage of ``range_ci`` and
    ``spread_ci`` (the interval holds the true value; under the null the true value is 0),
    how often ``range_ci`` reaches 0, and the mean raw and debiased range; each rate with its
    Monte-Carlo SE (``_se``)."""
    rng = np.random.default_rng(seed)
    rows = []
    for r in true_ranges:
        delta = plant(r, shape)
        tr, th = true_values(delta)
        res = run_probes(simulate(rng, n_probes, n_items, delta), n_resamples, seed)
        row = {"shape": shape, "true_range": round(tr, 4), "true_spread": round(th, 4), "items": n_items,
               "probes": n_probes}
        for name, hit in (("paired_0.05", res.paired_p < 0.05), ("paired_0.01", res.paired_p < 0.01),
                          ("chi2_0.05", res.chi2_p < 0.05), ("chi2_0.01", res.chi2_p < 0.01),
                          ("range_ci_covers", (res.range_lo <= tr + 1e-12) & (tr - 1e-12 <= res.range_hi)),
                          ("spread_ci_covers", (res.spread_lo <= th + 1e-12) & (th - 1e-12 <= res.spread_hi)),
                          ("range_ci_reaches_0", res.range_lo <= 1e-12)):
            row[name], row[f"{name}_se"] = _rate(hit.to_numpy())
        row.update(mean_range=res["range"].mean(), mean_range_debiased=res.range_debiased.mean(),
                   mean_spread=res.spread.mean())
        rows.append(row)
    return pd.DataFrame(rows)


def power(true_ranges=(0.05, 0.10, 0.15), items=(50, 100, 200, 400, 800), n_probes: int = 400,
          alphas=(0.05, 0.01), shape: str = "gradient", seed: int = 0, n_resamples: int = 999) -> pd.DataFrame:
    """Rejection rate of the paired test at each of ``alphas`` (one row per alpha × true range ×
    items, with its Monte-Carlo SE). Runs :func:`analyses.metrics.paired_test` — the function
    ``cell_metrics`` calls for ``paired_p`` — on the simulated (items, cells) arrays directly,
    for speed."""
    rng = np.random.default_rng(seed)
    rows = []
    for r in true_ranges:
        delta = plant(r, shape)
        for n in items:
            p = np.array([paired_test(w, rng, n_resamples)[2] for w in simulate(rng, n_probes, n, delta)])
            for alpha in alphas:
                rate, se = _rate(p < alpha)
                rows.append({"true_range": r, "items": n, "alpha": alpha, "power": rate, "power_se": se,
                             "probes": n_probes})
    return pd.DataFrame(rows)


def items_needed(pw: pd.DataFrame, target: float = 0.8) -> pd.DataFrame:
    """Items for ``target`` power per (alpha, true range): power interpolated linearly against
    log(items) between the two simulated item counts that bracket ``target``; written "≤ n" or
    "> n" when the smallest count already reaches it or the largest does not."""
    out = []
    for (alpha, r), g in pw.sort_values("items").groupby(["alpha", "true_range"], sort=False):
        n, y = g["items"].to_numpy(float), g["power"].to_numpy()
        j = int(np.argmax(y >= target)) if (y >= target).any() else None
        if j is None:
            need = f"> {n[-1]:.0f}"
        elif j == 0:
            need = f"≤ {n[0]:.0f}"
        else:
            need = f"{np.exp(np.interp(target, y[j - 1:j + 1], np.log(n[j - 1:j + 1]))):.0f}"
        out.append({"alpha": alpha, "true_range": r, f"items_for_{target:.0%}_power": need})
    return pd.DataFrame(out)


def markdown_table(df: pd.DataFrame, digits: int = 3) -> str:
    """A DataFrame as a GitHub markdown table (floats to ``digits`` places)."""
    fmt = lambda v: f"{v:.{digits}f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def with_se(df: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """``df`` with each column ``x`` that has an ``x_se`` beside it written "x ± se" (strings)."""
    out = df.copy()
    for c in [c for c in df.columns if f"{c}_se" in df.columns]:
        out[c] = [f"{v:.{digits}f} ± {e:.{digits}f}" for v, e in zip(df[c], df[f"{c}_se"])]
        out = out.drop(columns=f"{c}_se")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the markdown tables here (default: print)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--probes", type=int, default=400, help="simulated probes per calibration row")
    ap.add_argument("--power-probes", type=int, default=400, help="simulated probes per power cell")
    ap.add_argument("--resamples", type=int, default=500, help="bootstrap resamples per cell_metrics call")
    a = ap.parse_args(argv)
    t0 = time.time()
    cal = pd.concat([calibration(n_probes=a.probes, shape=s, seed=a.seed + i, n_resamples=a.resamples)
                     for i, s in enumerate(SHAPES)], ignore_index=True)
    small = calibration((0.0,), n_probes=a.probes, n_items=30, seed=a.seed + 7, n_resamples=a.resamples)
    pw = power(n_probes=a.power_probes, seed=a.seed + 3)
    need = items_needed(pw)
    grid = pw.pivot_table(index=["alpha", "true_range"], columns="items", values="power").reset_index()
    text = "\n\n".join([
        f"<!-- python -m analyses.calibration --seed {a.seed} --probes {a.probes} --power-probes "
        f"{a.power_probes} --resamples {a.resamples}: {time.time() - t0:.0f} s -->",
        "### Calibration (200 items unless stated; rates with Monte-Carlo SE)", markdown_table(with_se(cal)),
        "### Null with 30 items (permutation p)", markdown_table(with_se(small)),
        "### Power of the paired test (gradient profile)", markdown_table(grid.rename(columns=str)),
        "Monte-Carlo SE of each power: √(p(1−p)/probes), at most "
        f"{pw.power_se.max():.3f} ({a.power_probes} probes per cell).",
        "### Items for 80 % power", markdown_table(need)])
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
