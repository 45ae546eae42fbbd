"""Cell pairs: the diagnosis' components for the best cell against the worst few, or for every
pair of cells.

Role: figures of pairs rows. May import: ``analyses.figures.common``."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analyses.figures.common import MAX_WIDTH_IN, Labels, _pick, _suptitle, _t, intervention_order, styled

BARS = (("pair_position_restoration", "P: LM position ids", "#1f77b4"),
        ("pair_moved", "V: vision side (content + its code)", "#ff7f0e"),
        ("pair_vision_position", "Q: vision position code", "#2ca02c"),
        ("pair_joint", "J: joint (1 − J: token order)", "#7f7f7f"))


def _mean(d: pd.DataFrame) -> pd.DataFrame:
    return d.groupby("group", sort=False)[["value", "ci_low", "ci_high"]].mean()


@styled
def pair_components(df: pd.DataFrame, model: Labels = None, probe: Labels = None, intervention: Labels = None):
    """Per cell pair (clean → corrupt, the pairs ordered as measured): the share of that pair's gap
    each component of the diagnosis restores — P the LM's position ids, V the target's tokens moved
    with their vision-side code, Q the vision tower's position code alone, J content and ids
    together — with 95% intervals; under each pair its gap. Whether best → worst is typical of the
    model's pairs or an extreme one.

    One panel per intervention of one (model, probe); a missing bar is n/a (P under BaPA, Q without a
    patchable vision position code) or not read (the pair's gap is too small to divide by)."""
    d, m, p = _pick(df, "pair_components", "pairs", [b[0] for b in BARS] + ["pair_gap"], model, probe, intervention)
    order = [iv for iv in intervention_order(d) if (d[d.intervention == iv].metric == "pair_gap").any()]
    n_pairs = max(d[d.metric == "pair_gap"].groupby("intervention").group.nunique())
    rotate = n_pairs > 8
    fig, axes = plt.subplots(len(order), 1, figsize=(MAX_WIDTH_IN, (2.9 if rotate else 2.4) * len(order) + 0.7),
                             squeeze=False, layout="constrained")
    for ax, iv in zip(axes[:, 0], order):
        di = d[d.intervention == iv]
        gap = _mean(di[di.metric == "pair_gap"])
        groups = list(gap.index)
        x = np.arange(len(groups))
        width = 0.8 / len(BARS)
        for j, (metric, label, colour) in enumerate(BARS):
            r = _mean(di[di.metric == metric]).reindex(groups)
            if r.value.notna().any():
                xs = x + (j - 1.5) * width
                ax.bar(xs, r.value.fillna(0), width=width, color=colour, label=label)
                err = np.vstack([(r.value - r.ci_low).to_numpy(), (r.ci_high - r.value).to_numpy()])
                ax.errorbar(xs, r.value, yerr=np.where(np.isfinite(err), np.maximum(err, 0), 0), fmt="none",
                            ecolor="black", elinewidth=0.6, capsize=1.2)
        shares = di[di.metric.isin([b[0] for b in BARS])].groupby("group").value.apply(lambda v: v.notna().any())
        for k, g in enumerate(groups):
            if not shares.get(g, False):
                ax.text(k, 0.05, "not read", ha="center", va="bottom", rotation=90 if rotate else 0, color="#444")
        ax.axhline(0, color="black", lw=0.5)
        ax.axhline(1, color="grey", lw=0.5, ls=":")
        labels = [f"{_t(g)}\ngap {v:.2f}" for g, v in zip(groups, gap.value)] if not rotate else \
                 [f"{_t(g)}  ({v:.1f})" for g, v in zip(groups, gap.value)]
        ax.set_xticks(x, labels, rotation=90 if rotate else 0)
        ax.set_xlim(-0.6, len(groups) - 0.4)
        ax.set_ylabel("share of the pair's gap")
        ax.set_title(f"{_t(iv)}" + (" · pair (gap)" if rotate else ""))
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for _, _, c in BARS]
    fig.legend(handles, [lab for _, lab, _ in BARS], loc="outside lower center", ncol=2)
    _suptitle(fig, f"the diagnosis' components per cell pair · {_t(m)} · {_t(p)}")
    return fig
