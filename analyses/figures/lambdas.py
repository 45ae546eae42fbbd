"""λ curves: AGCI's mean accuracy and range against λ, fixed and adaptive.

Role: figures of eval rows of AGCI conditions. May import: ``analyses.figures.common``,
``analyses.figures.accuracy``."""
from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

from analyses.figures.common import (MAX_WIDTH_IN, UNIT, Labels, _suptitle, _t, family_colours, select, styled)
from spatialbias.errors import SpatialBiasError
from analyses.figures.accuracy import _condition_scalars


def agci_variant(label: str) -> str:
    """The AGCI line a fixed-λ condition belongs to: its label without the λ ('agci-pooled:0.5' →
    'agci-pooled')."""
    return str(label).split(":")[0]


def adaptive_rule(label: str) -> str:
    """The adaptive-AGCI rule of a label without its scale ('agci-adaptive:cos_spread:0.5' →
    'agci-adaptive:cos_spread'; extras such as ':pooled' are kept)."""
    parts = str(label).split(":")
    return ":".join(parts[:2] + parts[3:])


@styled
def lambda_curves(df: pd.DataFrame, model: Labels = None, probe: Labels = None):
    """How AGCI's strength λ trades mean accuracy (left) against the range of accuracy across cells
    (right): fixed λ as lines, adaptive AGCI as marked points, baseline and BaPA as horizontal
    reference lines. A good λ lowers the range without lowering accuracy; accuracy spans 0–1.

    One row of panels per (model, probe): fixed-λ AGCI as lines (one per variant, e.g. agci and
    agci-pooled), adaptive AGCI as marked points at the mean λ its rule chose over the probe
    (``lambda_mean``; at its scale where that was not recorded); error bars are the seed sd;
    one legend for the figure, under the panels."""
    d = select(df, model, probe, analysis="eval")
    w = _condition_scalars(d)
    if not w.family.isin(["agci", "agci-adaptive"]).any():
        raise SpatialBiasError("lambda_curves: no AGCI (fixed λ or adaptive) eval rows in the selection")
    pairs = sorted(set(zip(w[w.family.isin(["agci", "agci-adaptive"])].model,
                           w[w.family.isin(["agci", "agci-adaptive"])].probe)))
    colours = family_colours(w.family)
    fig, axes = plt.subplots(len(pairs), 2, figsize=(MAX_WIDTH_IN, 3.0 * len(pairs) + 1.0), squeeze=False,
                             layout="constrained")
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
            if key == "mean_accuracy":
                ax.set_ylim(*UNIT)
            else:
                ax.set_ylim(bottom=0)
            ax.set_xlabel("λ (adaptive: mean λ chosen, else scale)")
            ax.set_ylabel(name)
            ax.set_title(f"{_t(m)} · {_t(p)}")
            ax.grid(alpha=0.3)
    handles = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=min(3, len(handles)))
    n = d["seed"].nunique()
    _suptitle(fig, "AGCI: fixed λ vs adaptive" + (f" (mean of {n} seeds, bars: sd)" if n > 1 else ""))
    return fig
