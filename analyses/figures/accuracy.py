"""Accuracy maps: per-cell accuracy and p(correct) on the probe's grid, range against mean
accuracy, the conditions table.

Role: figures of eval rows. May import: ``analyses.figures.common``."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analyses.figures.common import (CONDITION_KEYS, Labels, _grid, _heat, _label_points, _panels,
                                     _pick, _pm, _seeds_note, _t, _wide, family_colours, family_sorted, grid_shape,
                                     intervention_order, seed_mean, select)
from spatialbias.errors import SpatialBiasError

TABLE_METRICS = ("mean_accuracy", "mean_p_correct", "range", "std", "cv", "chi2_p", "consistency", "n_rows")
"""Eval scalars of the conditions table, in column order."""


def cell_heatmaps(df: pd.DataFrame, model: Labels = None, probe: Labels = None, intervention: Labels = None,
                  metric: str = "accuracy"):
    """Per-cell ``metric`` (``accuracy`` or ``p_correct``) as an n×m grid heatmap, one panel per
    intervention of one (model, probe), on a shared colour scale; the seed spread is written
    under each mean. Titles give the condition's mean accuracy and range."""
    d, m, p = _pick(df, "cell_heatmaps", "eval", [metric, "mean_accuracy", "range"], model, probe, intervention)
    cells = d[(d.metric == metric) & d.cell.notna()]
    if cells.empty:
        raise SpatialBiasError(f"cell_heatmaps: no per-cell {metric!r} rows for model {m!r}, probe {p!r}")
    agg = seed_mean(cells, ["intervention", "cell"])
    scal = seed_mean(d[d.cell.isna()], ["intervention", "metric"]).set_index(["intervention", "metric"])
    shape = grid_shape(df, p, int(agg.cell.max()) + 1)
    order = [i for i in intervention_order(d) if i in set(agg.intervention)]
    lo, hi = float(agg.value.min()), float(agg.value.max())
    if lo == hi:
        lo, hi = lo - 0.05, hi + 0.05
    nr, nc = _panels(len(order))
    fig, axes = plt.subplots(nr, nc + 1, figsize=(0.75 * shape[1] * nc + 1.2, (0.75 * shape[0] + 0.9) * nr),
                             gridspec_kw={"width_ratios": [1] * nc + [0.06]}, squeeze=False)
    for k, ax in enumerate(axes[:, :nc].flat):
        if k >= len(order):
            ax.axis("off")
            continue
        iv = order[k]
        a = agg[agg.intervention == iv]
        grid = _grid(a.value, a.cell, shape)
        sd = _grid(a.sd, a.cell, shape)
        annot = np.array([_pm(v, s) for v, s in zip(grid.flat, sd.flat)], dtype=object).reshape(shape)
        _heat(ax, grid, annot, lo, hi, "viridis", 6, cax=axes[0, nc] if k == 0 else None)
        ma = scal.value.get((iv, "mean_accuracy"), np.nan)
        rg = scal.value.get((iv, "range"), np.nan)
        ax.set_title(f"{_t(iv)}\nmean {ma:.3f} · range {rg:.3f}", fontsize=8)
    for ax in axes[1:, nc]:
        ax.axis("off")
    fig.suptitle(f"{metric} per grid cell ({shape[0]}×{shape[1]}) · {_t(m)} · {_t(p)} · {_seeds_note(cells)}",
                 fontsize=9)
    fig.tight_layout()
    return fig


def _condition_scalars(d: pd.DataFrame) -> pd.DataFrame:
    """One row per condition (model, probe, intervention; family, λ) with the seed mean of
    mean_accuracy and range and their seed sd (``mean_accuracy_sd``, ``range_sd``)."""
    s = d[(d.analysis == "eval") & d.metric.isin(["mean_accuracy", "range", "lambda_mean"]) & d.cell.isna()]
    w = _wide(seed_mean(s, CONDITION_KEYS + ["metric"]), CONDITION_KEYS)
    for c in ("mean_accuracy", "range", "lambda_mean"):
        for col in (c, c + "_sd"):
            if col not in w.columns:
                w[col] = np.nan
    return w.dropna(subset=["mean_accuracy", "range"], how="all")


def range_vs_accuracy(df: pd.DataFrame, model: Labels = None, probe: Labels = None, intervention: Labels = None):
    """Range across cells (max − min accuracy) against mean accuracy, one point per condition
    (mean over seeds, error bars = seed sd), coloured by family, one panel per (model, probe).
    Lower and further right is better: less spatial bias at no loss of accuracy."""
    d = select(df, model, probe, intervention, "eval")
    w = _condition_scalars(d)
    if w.empty:
        raise SpatialBiasError("range_vs_accuracy: no eval mean_accuracy/range rows in the selection")
    pairs = sorted(set(zip(w.model, w.probe)))
    colours = family_colours(w.family)
    nr, nc = _panels(len(pairs), 3)
    size = (6.0, 4.6) if len(pairs) == 1 else (4.6, 3.7)
    fig, axes = plt.subplots(nr, nc, figsize=(size[0] * nc, size[1] * nr), squeeze=False)
    for ax, (m, p) in zip(axes.flat, pairs):
        sub = w[(w.model == m) & (w.probe == p)]
        order = intervention_order(sub)
        sub = sub.set_index("intervention").loc[order].reset_index()
        for fam in family_sorted(sub.family):
            f = sub[sub.family == fam]
            ax.errorbar(f.mean_accuracy, f.range, xerr=f.mean_accuracy_sd.fillna(0), yerr=f.range_sd.fillna(0),
                        fmt="o", color=colours[fam], label=_t(fam), ms=5, capsize=2, lw=0.8)
        _label_points(ax, sub.mean_accuracy.to_numpy(float), sub.range.to_numpy(float), list(sub.intervention))
        ax.set_xlabel("mean accuracy")
        ax.set_ylabel("range across cells")
        ax.set_title(f"{_t(m)} · {_t(p)}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title="family", title_fontsize=7)
    for ax in list(axes.flat)[len(pairs):]:
        ax.axis("off")
    n = d["seed"].nunique()
    fig.suptitle("range vs mean accuracy per condition" + (f" (mean of {n} seeds, bars: sd)" if n > 1 else ""),
                 fontsize=10)
    fig.tight_layout()
    return fig


def conditions_table(df: pd.DataFrame, model: Labels = None, probe: Labels = None) -> pd.DataFrame:
    """One row per eval condition (model, probe, intervention; family, λ): the seed mean of
    each scalar in :data:`TABLE_METRICS`, its seed sd (``<metric>_sd``) and ``n_seeds``."""
    d = select(df, model, probe, analysis="eval")
    s = d[d.metric.isin(TABLE_METRICS) & d.cell.isna()]
    if s.empty:
        return pd.DataFrame(columns=CONDITION_KEYS + ["n_seeds"])
    out = _wide(seed_mean(s, CONDITION_KEYS + ["metric"]), CONDITION_KEYS)
    seeds = s.groupby(CONDITION_KEYS, dropna=False)["seed"].nunique().rename("n_seeds").reset_index()
    out = out.merge(seeds, on=CONDITION_KEYS, how="left")
    rank = {iv: k for k, iv in enumerate(intervention_order(d))}
    out = out.assign(_r=out.intervention.map(rank)).sort_values(["model", "probe", "_r"]).drop(columns="_r")
    return out.reset_index(drop=True)


def shift_curves(details: pd.DataFrame, key: str = "correct", model: Labels = None, probe: Labels = None,
                 intervention: Labels = None, seed: int = 0):
    """A metric (``correct``, ``p_correct`` or ``logit_diff``) against the target's offset along a
    continuous shift, one line per intervention with its bootstrap band. ``details``: the eval
    detail table of a shift probe (:func:`analyses.store.read_details`)."""
    from analyses.metrics import shift_curve
    d = select(details, model, probe, intervention)
    if d.empty or "offset" not in d.columns or d["offset"].isna().all():
        raise SpatialBiasError("shift_curves: no scored rows with an offset (a shift probe) in the selection")
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for k, iv in enumerate(intervention_order(d)):
        c = shift_curve(d[d.intervention == iv], key=key, seed=seed)
        ax.plot(c["offset"], c["mean"], "o-", ms=3, color=f"C{k}", label=_t(iv))
        ax.fill_between(c["offset"], c["ci_low"], c["ci_high"], color=f"C{k}", alpha=0.2, lw=0)
    ax.set_xlabel("target offset along the path (px)")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{key} against the target's position", fontsize=10)
    fig.tight_layout()
    return fig


def similarity_maps(df: pd.DataFrame, model: Labels = None, probe: Labels = None, pooling: str = "max",
                    key: str = "sim_image"):
    """Caption vs image-token cosine per target cell (the paper's similarity score, ``pooling``
    max or mean), as an n×m map: flat means the vision side encodes every cell alike."""
    d, m, p = _pick(df, "similarity_maps", "similarity", f"cell_{key}", model, probe, None)
    d = d[d.group == pooling]
    if d.empty:
        raise SpatialBiasError(f"similarity_maps: no cell_{key} rows with pooling {pooling!r}")
    shape = grid_shape(df, p, int(d.cell.max()) + 1)
    agg = seed_mean(d, ["cell"])
    grid = _grid(agg.value, agg.cell, shape)
    fig, axes = plt.subplots(1, 2, figsize=(0.8 * shape[1] + 1.6, 0.8 * shape[0] + 0.9),
                             gridspec_kw={"width_ratios": [1, 0.06]})
    annot = np.array([f"{v:.3f}" for v in grid.flat], dtype=object).reshape(shape)
    _heat(axes[0], grid, annot, float(np.nanmin(grid)), float(np.nanmax(grid)), "viridis", 7, cax=axes[1])
    axes[0].set_title(f"cosine(caption, image tokens), {pooling} pooling\n{_t(m)} · {_t(p)}", fontsize=8)
    fig.tight_layout()
    return fig


def occlusion_maps(details: pd.DataFrame, model: Labels = None, probe: Labels = None, intervention: Labels = None):
    """Occlusion: per target position, the mean absolute change of the answer logit difference
    when a white square covers each offset (normalised per image, summed per target position;
    :func:`analyses.occlusion.position_maps`), laid out as the grid, one shared colour scale."""
    from analyses import occlusion as occ
    d = select(details, model, probe, intervention)
    if d.empty:
        raise SpatialBiasError("occlusion_maps: no occlusion rows in the selection")
    iv = intervention_order(d)[0]
    d = d[d.intervention == iv].assign(condition=iv)
    maps = occ.position_maps(d, iv)
    n_cells = int(d["n_cells"].iloc[0]) if "n_cells" in d.columns else 9
    rows, cols = (3, 3) if n_cells == 9 else (1, n_cells)
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols + 0.4, 1.9 * rows + 0.4), squeeze=False)
    vmax = max((float(np.nanmax(mp)) for mp in maps.values()), default=1.0) or 1.0
    for k in range(rows * cols):
        ax = axes[divmod(k, cols)]
        ax.set_xticks([])
        ax.set_yticks([])
        if k in maps:
            ax.imshow(maps[k], cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
            ax.set_title(f"target in cell {k}", fontsize=7)
        else:
            ax.axis("off")
    fig.suptitle(f"occlusion: change of the answer logit difference by target position · {_t(iv)}", fontsize=9)
    fig.tight_layout()
    return fig
