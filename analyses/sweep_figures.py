"""Figures from a sweep's tidy results table (``DIR/results.parquet``), one call each.

Every public figure function takes the results DataFrame plus optional filters and returns a
matplotlib Figure; nothing here touches a model. From a notebook::

    import pandas as pd
    from analyses import sweep_figures as sf
    df = pd.read_parquet("out/sweep/results.parquet")
    sf.range_vs_accuracy(df)
    sf.cell_heatmaps(df, model="organism", probe="shapes")

Seeds are aggregated: each value is the mean over seeds; with more than one seed the spread
(standard deviation across seeds, ddof=1) is drawn as error bars or written beside the mean.
Filters (``model``, ``probe``, ``intervention``) take a label or a list of labels.
"""
from __future__ import annotations

import math
import re
from typing import Iterable, Optional, Union

import numpy as np
import pandas as pd

from analyses import figures  # noqa: F401  (sets the Agg backend and the fixed SVG hash salt)
from interp.errors import SpatialBiasError

import matplotlib  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402  (after analyses.figures chose the backend)

Labels = Optional[Union[str, Iterable[str]]]

#: Columns every results table has (the sweep's schema).
COLUMNS = ("condition_id", "model", "probe", "intervention", "family", "lambda", "analysis", "seed", "metric",
           "cell", "layer", "site", "group", "value")
#: Families in display order, each with a fixed colour so every figure agrees.
FAMILY_ORDER = ("baseline", "bapa", "agci", "agci-adaptive", "positions")
FAMILY_COLOURS = {"baseline": "#4d4d4d", "bapa": "#1f77b4", "agci": "#d62728", "agci-adaptive": "#ff7f0e",
                  "positions": "#2ca02c"}
_EXTRA_COLOURS = ("#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
GROUP_ORDER = ("all", "target", "image", "text", "last")
CONDITION_KEYS = ["model", "probe", "intervention", "family", "lambda"]
#: Eval scalars of the conditions table, in column order.
TABLE_METRICS = ("mean_accuracy", "mean_p_correct", "range", "std", "cv", "chi2_p", "consistency", "n_rows")


# --------------------------------------------------------------------------- selection and aggregation

def _as_list(x: Labels) -> list[str] | None:
    if x is None:
        return None
    return [x] if isinstance(x, str) else list(x)


def select(df: pd.DataFrame, model: Labels = None, probe: Labels = None, intervention: Labels = None,
           analysis: Labels = None, metric: Labels = None) -> pd.DataFrame:
    """Rows matching every given filter (a label or a list of labels; None keeps all)."""
    mask = np.ones(len(df), bool)
    for col, want in (("model", model), ("probe", probe), ("intervention", intervention),
                      ("analysis", analysis), ("metric", metric)):
        want = _as_list(want)
        if want is not None:
            mask &= df[col].isin(want).to_numpy()
    return df[mask]


def intervention_order(df: pd.DataFrame) -> list[str]:
    """Intervention labels in display order: by family (baseline, BaPA, AGCI, adaptive AGCI,
    positions, others), then λ, then label."""
    u = df[["intervention", "family", "lambda"]].drop_duplicates("intervention")
    rank = {f: i for i, f in enumerate(FAMILY_ORDER)}

    def key(r):
        lam = r["lambda"]
        return (rank.get(r["family"], len(rank)), str(r["family"]),
                math.inf if pd.isna(lam) else float(lam), str(r["intervention"]))
    return [r["intervention"] for r in sorted(u.to_dict("records"), key=key)]


def family_sorted(families: Iterable[str]) -> list[str]:
    """Distinct families in display order (:data:`FAMILY_ORDER`, then others by name)."""
    rank = {f: i for i, f in enumerate(FAMILY_ORDER)}
    return sorted(set(families), key=lambda f: (rank.get(f, len(rank)), str(f)))


def family_colours(families: Iterable[str]) -> dict[str, str]:
    """Family → colour; the five known families keep their colour in every figure."""
    out, extra = {}, iter(_EXTRA_COLOURS * 10)
    for f in family_sorted(families):
        out[f] = FAMILY_COLOURS.get(f) or next(extra)
    return out


def seed_mean(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Mean over seeds of ``value`` per ``by`` (rows of one seed are averaged first); adds ``sd``
    (across seeds, ddof=1; NaN with one seed) and ``n_seeds``. Missing keys (NaN λ, null
    cell/layer/site) form their own groups."""
    per_seed = df.groupby(by + ["seed"], dropna=False, sort=True)["value"].mean().reset_index()
    g = per_seed.groupby(by, dropna=False, sort=True)["value"]
    return g.agg(value="mean", sd="std", n_seeds="count").reset_index()


def _wide(agg: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """A :func:`seed_mean` table over ``keys + ['metric']`` as one row per ``keys``: columns
    ``<metric>`` (mean) and ``<metric>_sd``."""
    w = agg.set_index(keys + ["metric"])[["value", "sd"]].unstack("metric")
    w.columns = [m if stat == "value" else f"{m}_sd" for stat, m in w.columns]
    return w.reset_index()


def _one(df: pd.DataFrame, col: str, what: str) -> str:
    vals = sorted(df[col].dropna().unique())
    if len(vals) != 1:
        raise SpatialBiasError(f"{what}: the selection holds {len(vals)} {col}s "
                               f"({', '.join(map(str, vals)) or 'none'}); pass {col}=... to choose one")
    return vals[0]


def _pick(df: pd.DataFrame, what: str, analysis: str, metric: Labels, model, probe, intervention):
    d = select(df, model, probe, intervention, analysis, metric)
    if d.empty:
        raise SpatialBiasError(f"{what}: no {analysis} rows match model={model!r} probe={probe!r} "
                               f"intervention={intervention!r}; check the labels in the results table")
    return d, _one(d, "model", what), _one(d, "probe", what)


def _t(label) -> str:
    """A label safe for matplotlib text (a '$' would start mathtext)."""
    return str(label).replace("$", r"\$")


def _pm(m: float, sd: float, fmt: str = ".2f") -> str:
    if pd.isna(m):
        return ""
    return f"{m:{fmt}}" if pd.isna(sd) else f"{m:{fmt}}\n±{sd:{fmt}}"


def _seeds_note(d: pd.DataFrame) -> str:
    n = d["seed"].nunique()
    return f"mean of {n} seeds (± sd across seeds)" if n > 1 else "1 seed"


def grid_shape(df: pd.DataFrame, probe: str, n_cells: int | None = None) -> tuple[int, int]:
    """(rows, cols) of a probe's grid: the ``grid_rows``/``grid_cols`` scalars when present,
    else 3×3 for 9 cells, a square for a square count, else one row."""
    d = select(df, probe=probe, metric=["grid_rows", "grid_cols"])
    if not d.empty and set(d.metric) == {"grid_rows", "grid_cols"}:
        r = int(d[d.metric == "grid_rows"].value.iloc[0])
        c = int(d[d.metric == "grid_cols"].value.iloc[0])
        return r, c
    if n_cells is None or n_cells == 9:
        return 3, 3
    s = int(round(math.sqrt(n_cells)))
    return (s, s) if s * s == n_cells else (1, n_cells)


def _grid(values: pd.Series, cells: pd.Series, shape: tuple[int, int]) -> np.ndarray:
    g = np.full(shape[0] * shape[1], np.nan)
    for c, v in zip(cells.astype(int), values):
        if 0 <= c < g.size:
            g[c] = v
    return g.reshape(shape)


def _heat(ax, grid: np.ndarray, annot: np.ndarray, vmin: float, vmax: float, cmap: str, fontsize: float,
          cax=None, square: bool = True, xlabels=None, ylabels=None):
    """A small annotated heatmap (row 0 at the top). Like seaborn's, without its full-figure
    redraw per panel (what made many-panel figures slow); NaN cells stay blank."""
    cm = plt.get_cmap(cmap)
    norm = matplotlib.colors.Normalize(vmin, vmax)
    mesh = ax.pcolormesh(np.ma.masked_invalid(np.asarray(grid, float)), cmap=cm, norm=norm)
    ax.set_xlim(0, grid.shape[1])
    ax.set_ylim(grid.shape[0], 0)
    if square:
        ax.set_aspect("equal")
    for (i, j), v in np.ndenumerate(np.asarray(grid, float)):
        if np.isfinite(v) and annot[i, j]:
            r, g, b, _ = cm(norm(v))
            lum = 0.2126 * r + 0.7152 * g + 0.0722 * b
            ax.text(j + 0.5, i + 0.5, annot[i, j], ha="center", va="center", fontsize=fontsize,
                    color="black" if lum > 0.408 else "white")
    ax.set_xticks(np.arange(grid.shape[1]) + 0.5 if xlabels is not None else [],
                  [_t(x) for x in xlabels] if xlabels is not None else [], fontsize=7)
    ax.set_yticks(np.arange(grid.shape[0]) + 0.5 if ylabels is not None else [],
                  [_t(y) for y in ylabels] if ylabels is not None else [], fontsize=7)
    ax.tick_params(length=0)
    for sp in ax.spines.values():
        sp.set_visible(False)
    if cax is not None:
        ax.figure.colorbar(mesh, cax=cax)
    return mesh


def _panels(n: int, per_row: int = 5):
    cols = min(n, per_row)
    return math.ceil(n / cols), cols


# --------------------------------------------------------------------------- eval figures

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


def _label_points(ax, xs: np.ndarray, ys: np.ndarray, labels: list[str], fontsize: float = 6) -> None:
    """Write each label beside its point, moved up or down (greedily, in label order) so that
    labels of coinciding or close points do not overlap."""
    x0, x1 = ax.get_xlim()
    y0, y1 = ax.get_ylim()
    bb = ax.get_position()
    w_pt, h_pt = bb.width * ax.figure.get_figwidth() * 72, bb.height * ax.figure.get_figheight() * 72
    placed: list[tuple[float, float, float, float]] = []
    line = fontsize * 1.25
    for x, y, label in zip(xs, ys, labels):
        if not (np.isfinite(x) and np.isfinite(y)):
            continue
        px, py = (x - x0) / ((x1 - x0) or 1) * w_pt + 3, (y - y0) / ((y1 - y0) or 1) * h_pt
        width = 0.55 * fontsize * len(str(label))
        for k in range(40):
            dy = 3 + (k + 1) // 2 * line * (1 if k % 2 == 0 else -1)
            box = (px, py + dy, px + width, py + dy + line)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
                break
        placed.append(box)
        ax.annotate(_t(label), (x, y), xytext=(3, dy), textcoords="offset points", fontsize=fontsize,
                    arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "grey"} if abs(dy) > line else None)


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


def agci_variant(label: str) -> str:
    """The AGCI line a fixed-λ intervention belongs to: its label without the λ part
    ('agci-pooled λ=0.5' → 'agci-pooled')."""
    return re.sub(r"\s*λ\s*=\s*\S+", "", str(label)).strip() or str(label)


def adaptive_rule(label: str) -> str:
    """The adaptive-AGCI rule of a label without its scale
    ('agci-adaptive cos_spread×0.5' → 'agci-adaptive cos_spread')."""
    return re.sub(r"\s*×\s*\S+$", "", str(label)).strip() or str(label)


def lambda_curves(df: pd.DataFrame, model: Labels = None, probe: Labels = None):
    """Mean accuracy and range across cells against AGCI's λ, one row of panels per (model,
    probe): fixed-λ AGCI as lines (one per variant, e.g. agci and agci-pooled), adaptive AGCI
    as marked points at the mean λ its rule chose over the probe (``lambda_mean``; at its scale
    where that was not recorded), baseline and BaPA as horizontal reference lines; error bars are
    the seed sd."""
    d = select(df, model, probe, analysis="eval")
    w = _condition_scalars(d)
    if not w.family.isin(["agci", "agci-adaptive"]).any():
        raise SpatialBiasError("lambda_curves: no AGCI (fixed λ or adaptive) eval rows in the selection")
    pairs = sorted(set(zip(w[w.family.isin(["agci", "agci-adaptive"])].model,
                           w[w.family.isin(["agci", "agci-adaptive"])].probe)))
    colours = family_colours(w.family)
    fig, axes = plt.subplots(len(pairs), 2, figsize=(9.5, 3.2 * len(pairs)), squeeze=False)
    shapes = ("s", "D", "^", "v", "P", "X", "*")
    rules = sorted(set(w[w.family == "agci-adaptive"].intervention.map(adaptive_rule)))
    markers = {rule: shapes[k % len(shapes)] for k, rule in enumerate(rules)}
    for row, (m, p) in zip(axes, pairs):
        sub = w[(w.model == m) & (w.probe == p)]
        for ax, key, name in ((row[0], "mean_accuracy", "mean accuracy"), (row[1], "range", "range across cells")):
            fixed = sub[(sub.family == "agci") & sub["lambda"].notna()].assign(
                variant=lambda x: x.intervention.map(agci_variant))
            for k, (var, f) in enumerate(sorted(fixed.groupby("variant"), key=lambda t: t[0])):
                f = f.sort_values("lambda")
                ax.errorbar(f["lambda"], f[key], yerr=f[f"{key}_sd"].fillna(0),
                            fmt="os^v"[k % 4] + ("-", "--", ":", "-.")[k % 4], color=colours["agci"], ms=4,
                            capsize=2, lw=1.2, mfc="white" if k else None, label=_t(var) + " (fixed λ)")
            ada = sub[sub.family == "agci-adaptive"].assign(rule=lambda x: x.intervention.map(adaptive_rule))
            for rule, f in sorted(ada.groupby("rule"), key=lambda t: t[0]):
                pts = f[f["lambda"].notna()].sort_values("lambda")
                if not pts.empty:  # one marker per rule, a point per scale
                    chosen = pts["lambda_mean"].notna().all()
                    ax.errorbar(pts["lambda_mean"] if chosen else pts["lambda"], pts[key],
                                yerr=pts[f"{key}_sd"].fillna(0), fmt=markers[rule], ms=7, capsize=2,
                                color=colours["agci-adaptive"], mec="black", mew=0.5,
                                label=_t(rule) + (" (adaptive, at its mean λ)" if chosen else
                                                  " (adaptive, at its scale)"))
                for r in f[f["lambda"].isna()].to_dict("records"):  # no scale recorded: a reference line
                    ax.axhline(r[key], ls=":", color=colours["agci-adaptive"], lw=1, label=_t(r["intervention"]))
            for fam in ("baseline", "bapa"):
                for k, r in enumerate(sub[sub.family == fam].to_dict("records")):
                    ax.axhline(r[key], ls=("-", "--", "-.", ":")[(k + (fam == "bapa")) % 4],
                               color=colours[fam], lw=0.9, label=_t(r["intervention"]))
            ax.set_xlabel("λ (adaptive: mean λ chosen, else scale)")
            ax.set_ylabel(name)
            ax.set_title(f"{_t(m)} · {_t(p)}", fontsize=9)
            ax.grid(alpha=0.3)
        row[1].legend(fontsize=6, loc="best")
    n = d["seed"].nunique()
    fig.suptitle("AGCI: fixed λ vs adaptive" + (f" (mean of {n} seeds, bars: sd)" if n > 1 else ""), fontsize=10)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- causal figures

def _logit_note(d: pd.DataFrame, iv: str) -> str:
    s = d[(d.intervention == iv) & d.metric.isin(["logit_diff_clean", "logit_diff_corrupt", "clean_cell",
                                                   "corrupt_cell"])]
    v = s.groupby("metric")["value"].mean()
    if {"logit_diff_clean", "logit_diff_corrupt"} <= set(v.index):
        cells = (f" (cell {v['clean_cell']:.0f} → {v['corrupt_cell']:.0f})"
                 if {"clean_cell", "corrupt_cell"} <= set(v.index) else "")
        return f"\nclean {v['logit_diff_clean']:.2f} · corrupt {v['logit_diff_corrupt']:.2f}{cells}"
    return ""


def restoration_heatmaps(df: pd.DataFrame, model: Labels = None, probe: Labels = None, intervention: Labels = None,
                         direction: str = "denoise"):
    """Activation patching: normalised restoration per site (rows, forward order) × token group
    (columns), one panel per intervention of one (model, probe); ``direction`` is ``denoise``
    (clean → corrupt) or ``noise`` (corrupt → clean). Seed spread under each mean."""
    if direction not in ("denoise", "noise"):
        raise SpatialBiasError(f"restoration_heatmaps: direction {direction!r}; use 'denoise' or 'noise'")
    metric = f"restoration_{direction}"
    d, m, p = _pick(df, "restoration_heatmaps", "patching", None, model, probe, intervention)
    r = d[d.metric == metric]
    if r.empty:
        raise SpatialBiasError(f"restoration_heatmaps: no {metric} rows for model {m!r}, probe {p!r}")
    sites = list(dict.fromkeys(r.site.dropna()))
    groups = [g for g in GROUP_ORDER if g in set(r.group)] + sorted(set(r.group.dropna()) - set(GROUP_ORDER))
    agg = seed_mean(r, ["intervention", "site", "group"])
    order = [i for i in intervention_order(d) if i in set(agg.intervention)]
    nr, nc = _panels(len(order), 4)
    fig, axes = plt.subplots(nr, nc + 1, figsize=(0.75 * len(groups) * nc + 2.2, (0.36 * len(sites) + 1.3) * nr),
                             gridspec_kw={"width_ratios": [1] * nc + [0.06]}, squeeze=False)
    for k, ax in enumerate(axes[:, :nc].flat):
        if k >= len(order):
            ax.axis("off")
            continue
        a = agg[agg.intervention == order[k]]
        piv = a.pivot_table(index="site", columns="group", values="value", dropna=False).reindex(index=sites,
                                                                                                  columns=groups)
        sd = a.pivot_table(index="site", columns="group", values="sd", dropna=False).reindex(index=sites,
                                                                                              columns=groups)
        annot = np.array([_pm(v, s) for v, s in zip(piv.to_numpy().flat, sd.to_numpy().flat)],
                         dtype=object).reshape(piv.shape)
        _heat(ax, piv.to_numpy(float), annot, -0.2, 1.2, "RdBu_r", 5.5, cax=axes[0, nc] if k == 0 else None,
              square=False, xlabels=groups, ylabels=sites if k % nc == 0 else None)
        ax.set_title(_t(order[k]) + _logit_note(d, order[k]), fontsize=8)
        ax.set_xlabel("token group")
        ax.set_ylabel("site" if k % nc == 0 else "")
    for ax in axes[1:, nc]:
        ax.axis("off")
    fig.suptitle(f"activation patching ({direction}): restoration · {_t(m)} · {_t(p)} · {_seeds_note(r)}",
                 fontsize=9)
    fig.tight_layout()
    return fig


def position_restoration(df: pd.DataFrame, model: Labels = None, probe: Labels = None, intervention: Labels = None):
    """Position-id patching: share of the clean − corrupt gap restored when the target's image
    tokens get their clean position ids, in all layers at once ("all") and layer by layer;
    bars per intervention, error bars = seed sd."""
    d, m, p = _pick(df, "position_restoration", "patching", None, model, probe, intervention)
    r = d[d.metric == "position_restoration"]
    if r.empty:
        raise SpatialBiasError(f"position_restoration: no position_restoration rows for model {m!r}, probe {p!r}")
    r = r.assign(where=r.layer.map(lambda x: "all" if pd.isna(x) else str(int(x))))
    agg = seed_mean(r, ["intervention", "where"])
    wheres = (["all"] if "all" in set(agg["where"]) else []) + sorted(
        (w for w in set(agg["where"]) if w != "all"), key=int)
    order = [i for i in intervention_order(d) if i in set(agg.intervention)]
    colours = family_colours(d.family)
    fam = d.drop_duplicates("intervention").set_index("intervention").family
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(wheres) * max(1, len(order)) ** 0.5, 3.0))
    width = 0.8 / len(order)
    shades = {}
    for k, iv in enumerate(order):
        a = agg[agg.intervention == iv].set_index("where").reindex(wheres)
        n_same = shades.get(fam[iv], 0)
        shades[fam[iv]] = n_same + 1
        ax.bar(np.arange(len(wheres)) - 0.4 + width * (k + 0.5), a.value, width, yerr=a.sd.fillna(0), capsize=2,
               color=colours[fam[iv]], alpha=1 - 0.25 * min(n_same, 3), label=_t(iv), edgecolor="black", lw=0.4)
    ax.axhline(1.0, ls="--", color="grey", lw=0.8)
    ax.axhline(0.0, color="black", lw=0.6)
    ax.set_xticks(range(len(wheres)), wheres)
    ax.set_xlabel("layers with the clean position ids")
    ax.set_ylabel("restoration")
    ax.legend(fontsize=7)
    ax.set_title(f"position-id patching · {_t(m)} · {_t(p)} · {_seeds_note(r)}", fontsize=9)
    fig.tight_layout()
    return fig


def attention_to_target(df: pd.DataFrame, model: Labels = None, probe: Labels = None, intervention: Labels = None):
    """Attention flow: mean attention mass from the last token to the target's cell, drawn at
    the target's placement on the n×m grid; rows are interventions, columns layers, one colour
    scale. A flat map means the model attends to the target equally wherever it is."""
    d, m, p = _pick(df, "attention_to_target", "flow", "attention_to_target", model, probe, intervention)
    d = d[d.cell.notna() & d.layer.notna()]
    if d.empty:
        raise SpatialBiasError(f"attention_to_target: no rows with a cell and a layer for model {m!r}, probe {p!r}")
    agg = seed_mean(d, ["intervention", "layer", "cell"])
    shape = grid_shape(df, p, int(agg.cell.max()) + 1)
    order = [i for i in intervention_order(d) if i in set(agg.intervention)]
    layers = sorted(int(x) for x in agg.layer.unique())
    vmax = float(agg.value.max()) or 1.0
    fig, axes = plt.subplots(len(order), len(layers) + 1,
                             figsize=(0.8 * shape[1] * len(layers) + 1.0, (0.75 * shape[0] + 0.6) * len(order)),
                             gridspec_kw={"width_ratios": [1] * len(layers) + [0.06]}, squeeze=False)
    for i, iv in enumerate(order):
        for j, layer in enumerate(layers):
            a = agg[(agg.intervention == iv) & (agg.layer == layer)]
            grid, sd = _grid(a.value, a.cell, shape), _grid(a.sd, a.cell, shape)
            annot = np.array([_pm(v, s, ".3f") for v, s in zip(grid.flat, sd.flat)], dtype=object).reshape(shape)
            first = i == 0 and j == 0
            _heat(axes[i, j], grid, annot, 0, vmax, "magma", 5.5, cax=axes[0, -1] if first else None)
            axes[i, j].set_title(f"{_t(iv)} · layer {layer}", fontsize=7)
    for ax in axes[1:, -1]:
        ax.axis("off")
    fig.suptitle(f"attention from the last token to the target's cell, by placement · {_t(m)} · {_t(p)} · "
                 f"{_seeds_note(d)}", fontsize=9)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- table

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
