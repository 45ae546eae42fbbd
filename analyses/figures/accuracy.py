"""Accuracy maps: per-cell accuracy and p(correct) on the probe's grid, range against mean
accuracy, the conditions table.

Role: figures of eval rows. May import: ``analyses.figures.common``."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analyses.figures.common import (CBAR_IN, CONDITION_KEYS, MAX_WIDTH_IN, UNIT, Labels, _colourbar, _grid, _heat,
                                     _heat_figure, _label_points, _panels, _pick, _pm, _seeds_note, _suptitle, _t,
                                     _wide, family_colours, family_sorted, grid_shape, intervention_order, seed_mean,
                                     select, styled)
from spatialbias.errors import SpatialBiasError

TABLE_METRICS = ("mean_accuracy", "mean_p_correct", "range", "std", "cv", "chi2_p", "consistency", "n_rows")
"""Eval scalars of the conditions table, in column order."""


@styled
def cell_heatmaps(df: pd.DataFrame, model: Labels = None, probe: Labels = None, intervention: Labels = None,
                  metric: str = "accuracy"):
    """Each panel is one condition and each square one position of the target on the probe's grid,
    coloured by the accuracy (or p(correct)) there: a flat map means the model answers equally well
    wherever the target is. The colour scale is shared by the panels and anchored at 0–1.

    Per-cell ``metric`` (``accuracy`` or ``p_correct``) as an n×m grid heatmap, one panel per
    intervention of one (model, probe); the seed spread is written under each mean. Titles give
    the condition's mean accuracy and range. The scale is 0–1 whatever the data span (an
    accuracy or a probability is never stretched: noise must not look like contrast)."""
    d, m, p = _pick(df, "cell_heatmaps", "eval", [metric, "mean_accuracy", "range"], model, probe, intervention)
    cells = d[(d.metric == metric) & d.cell.notna()]
    if cells.empty:
        raise SpatialBiasError(f"cell_heatmaps: no per-cell {metric!r} rows for model {m!r}, probe {p!r}")
    agg = seed_mean(cells, ["intervention", "cell"])
    scal = seed_mean(d[d.cell.isna()], ["intervention", "metric"]).set_index(["intervention", "metric"])
    shape = grid_shape(df, p, int(agg.cell.max()) + 1)
    order = [i for i in intervention_order(d) if i in set(agg.intervention)]
    lo, hi = UNIT
    two_lines = agg.sd.notna().any()
    cell_in = 0.5 if two_lines else 0.45
    panel_w = max(1.75, cell_in * shape[1] + 0.3)
    fig, axes, cax = _heat_figure(len(order), panel_w, cell_in * shape[0] + 0.6, head_h=0.4)
    mesh = None
    for ax, iv in zip(axes, order):
        a = agg[agg.intervention == iv]
        grid = _grid(a.value, a.cell, shape)
        sd = _grid(a.sd, a.cell, shape)
        annot = np.array([_pm(v, s) for v, s in zip(grid.flat, sd.flat)], dtype=object).reshape(shape)
        mesh = _heat(ax, grid, annot, lo, hi, "viridis")
        ma = scal.value.get((iv, "mean_accuracy"), np.nan)
        rg = scal.value.get((iv, "range"), np.nan)
        ax.set_title(f"{_t(iv)}\nmean {ma:.3f} · range {rg:.3f}")
    _colourbar(mesh, cax, metric.replace("p_correct", "p(correct)"))
    _suptitle(fig, f"{metric} per grid cell ({shape[0]}×{shape[1]}) · {_t(m)} · {_t(p)} · {_seeds_note(cells)}")
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


@styled
def range_vs_accuracy(df: pd.DataFrame, model: Labels = None, probe: Labels = None, intervention: Labels = None):
    """One point per condition: its mean accuracy (x) against the range of accuracy across grid
    cells (y); lower and further right is better, less spatial bias at no loss of accuracy. The
    accuracy axis spans 0–1 and the range axis starts at 0.

    Range across cells (max − min accuracy) against mean accuracy, one point per condition
    (mean over seeds, error bars = seed sd), coloured by family, one panel per (model, probe)."""
    d = select(df, model, probe, intervention, "eval")
    w = _condition_scalars(d)
    if w.empty:
        raise SpatialBiasError("range_vs_accuracy: no eval mean_accuracy/range rows in the selection")
    pairs = sorted(set(zip(w.model, w.probe)))
    colours = family_colours(w.family)
    size = (6.0, 4.6) if len(pairs) == 1 else (MAX_WIDTH_IN / 2, 3.7)
    nr, nc = _panels(len(pairs), size[0])
    fig, axes = plt.subplots(nr, nc, figsize=(size[0] * nc, size[1] * nr + 0.3), squeeze=False)
    for ax, (m, p) in zip(axes.flat, pairs):
        sub = w[(w.model == m) & (w.probe == p)]
        order = intervention_order(sub)
        sub = sub.set_index("intervention").loc[order].reset_index()
        for fam in family_sorted(sub.family):
            f = sub[sub.family == fam]
            ax.errorbar(f.mean_accuracy, f.range, xerr=f.mean_accuracy_sd.fillna(0), yerr=f.range_sd.fillna(0),
                        fmt="o", color=colours[fam], label=_t(fam), ms=5, capsize=2, lw=0.8)
        ax.set_xlim(*UNIT)
        ax.set_ylim(0, max(0.05, float(np.nanmax(sub.range + sub.range_sd.fillna(0)))) * 1.15)
        _label_points(ax, sub.mean_accuracy.to_numpy(float), sub.range.to_numpy(float), list(sub.intervention))
        ax.set_xlabel("mean accuracy")
        ax.set_ylabel("range across cells")
        ax.set_title(f"{_t(m)} · {_t(p)}")
        ax.grid(alpha=0.3)
        ax.legend(title="family", loc="upper left")
    for ax in list(axes.flat)[len(pairs):]:
        ax.axis("off")
    n = d["seed"].nunique()
    _suptitle(fig, "range vs mean accuracy per condition" + (f" (mean of {n} seeds, bars: sd)" if n > 1 else ""))
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


@styled
def shift_curves(details: pd.DataFrame, key: str = "correct", model: Labels = None, probe: Labels = None,
                 intervention: Labels = None, seed: int = 0):
    """The answer's accuracy (or p(correct), or logit difference) as the target slides along a
    continuous path, one line per condition with its bootstrap band: a flat line means the
    target's position does not matter. Accuracy and p(correct) axes span 0–1.

    A metric (``correct``, ``p_correct`` or ``logit_diff``) against the target's offset along a
    continuous shift. ``details``: the eval detail table of a shift probe
    (:func:`analyses.store.read_details`)."""
    from analyses.metrics import shift_curve
    d = select(details, model, probe, intervention)
    if d.empty or "offset" not in d.columns or d["offset"].isna().all():
        raise SpatialBiasError("shift_curves: no scored rows with an offset (a shift probe) in the selection")
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for k, iv in enumerate(intervention_order(d)):
        c = shift_curve(d[d.intervention == iv], key=key, seed=seed)
        ax.plot(c["offset"], c["mean"], "o-", ms=3, color=f"C{k}", label=_t(iv))
        ax.fill_between(c["offset"], c["ci_low"], c["ci_high"], color=f"C{k}", alpha=0.2, lw=0)
    if key in ("correct", "p_correct"):
        ax.set_ylim(UNIT[0] - 0.02, UNIT[1] + 0.02)
    ax.set_xlabel("target offset along the path (px)")
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{key} against the target's position", fontsize=9)
    fig.tight_layout()
    return fig


@styled
def similarity_maps(df: pd.DataFrame, model: Labels = None, probe: Labels = None, pooling: str = "max",
                    key: str = "sim_image"):
    """Cosine similarity between the caption and the image tokens for each position of the target:
    a flat map means the vision side encodes every cell alike. A cosine is not a probability: the
    colour scale spans the data, so read the printed numbers for the size of any difference.

    Caption vs image-token cosine per target cell (the paper's similarity score, ``pooling``
    max or mean), as an n×m map with its colour bar."""
    d, m, p = _pick(df, "similarity_maps", "similarity", f"cell_{key}", model, probe, None)
    d = d[d.group == pooling]
    if d.empty:
        raise SpatialBiasError(f"similarity_maps: no cell_{key} rows with pooling {pooling!r}")
    shape = grid_shape(df, p, int(d.cell.max()) + 1)
    agg = seed_mean(d, ["cell"])
    grid = _grid(agg.value, agg.cell, shape)
    fig, axes, cax = _heat_figure(1, max(2.8, 0.55 * shape[1] + 0.4), 0.55 * shape[0] + 0.9, head_h=0.1)
    annot = np.array([f"{v:.3f}" for v in grid.flat], dtype=object).reshape(shape)
    lo, hi = float(np.nanmin(grid)), float(np.nanmax(grid))
    if lo == hi:
        lo, hi = lo - 0.05, hi + 0.05
    mesh = _heat(axes[0], grid, annot, lo, hi, "viridis")
    _colourbar(mesh, cax, "cosine")
    axes[0].set_title(f"cosine(caption, image tokens), {pooling} pooling\n{_t(m)} · {_t(p)}")
    return fig


@styled
def occlusion_maps(details: pd.DataFrame, model: Labels = None, probe: Labels = None, intervention: Labels = None):
    """Each panel is one position of the target, laid out as the probe's grid; bright pixels are
    where covering the image with a white square changes the answer most. If the bright spot
    follows the target, the model reads the target; the colour scale is shared by the panels.

    Occlusion: per target position, the absolute change of the answer logit difference when a
    white square covers each offset (normalised per image, summed per target position;
    :func:`analyses.occlusion.position_maps`), on one colour scale from 0 with its colour bar."""
    from analyses import occlusion as occ
    d = select(details, model, probe, intervention)
    if d.empty:
        raise SpatialBiasError("occlusion_maps: no occlusion rows in the selection")
    iv = intervention_order(d)[0]
    d = d[d.intervention == iv].assign(condition=iv)
    maps = occ.position_maps(d, iv)
    rows, cols = _occlusion_grid(d)
    side = min(1.6, (MAX_WIDTH_IN - CBAR_IN) / cols)
    fig = plt.figure(figsize=(side * cols + CBAR_IN, (side + 0.25) * rows + 0.5), layout="constrained")
    gs = fig.add_gridspec(rows, cols + 1, width_ratios=[1] * cols + [0.12 / side])
    axes = [fig.add_subplot(gs[divmod(k, cols)]) for k in range(rows * cols)]
    cax = fig.add_subplot(gs[:min(rows, 3), -1])
    vmax = max((float(np.nanmax(mp)) for mp in maps.values()), default=1.0) or 1.0
    image = None
    for k, ax in enumerate(axes):
        ax.set_xticks([])
        ax.set_yticks([])
        if k in maps:
            image = ax.imshow(maps[k], cmap="magma", vmin=0, vmax=vmax, interpolation="nearest")
            ax.set_title(f"target in cell {k}" if side >= 1.2 else f"cell {k}")
        else:
            ax.axis("off")
    if image is not None:
        _colourbar(image, cax, "|Δ logit diff|, per-image max = 1, summed")
    else:
        cax.axis("off")
    _suptitle(fig, f"occlusion: change of the answer logit difference by target position · {_t(iv)}")
    return fig


def _occlusion_grid(d: pd.DataFrame) -> tuple[int, int]:
    """(rows, cols) of the occlusion rows' probe grid: the ``grid`` column ("3x3") when there is
    one, else from ``n_cells`` (9: 3×3; a square count: a square; else one row)."""
    if "grid" in d.columns and d["grid"].notna().any():
        try:
            r, c = (int(x) for x in str(d["grid"].dropna().iloc[0]).lower().split("x"))
            return r, c
        except ValueError:
            pass
    n = int(d["n_cells"].iloc[0]) if "n_cells" in d.columns else 9
    s = int(round(n ** 0.5))
    return (s, s) if s * s == n else (1, n)
