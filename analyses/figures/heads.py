"""Attention heads: every head's estimated share of the best → worst gap, the top heads measured
exactly, and the cumulative curve of the top k.

Role: figures of heads rows. May import: ``analyses.figures.common``."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analyses.figures.common import (ANNOT_PT, MAX_WIDTH_IN, Labels, _pick, _suptitle, _t, intervention_order,
                                     seed_mean, styled)

BARS = (("head_share_estimate", "estimate (attribution)", "#9ecae1"),
        ("head_restoration", "exact patch", "#08519c"),
        ("head_path_restoration", "path image → head → answer", "#fd8d3c"))
CURVES = (("head_cumulative_restoration", "top k patched (exact)", "#08519c", "o"),
          ("head_cumulative_estimate", "top k estimate", "#9ecae1", "s"),
          ("head_knockout_removed", "top k knocked out: gap removed", "#d62728", "^"))


def _head(group) -> int:
    return int(str(group).split()[-1])


def _k(group) -> int:
    return int(str(group).split()[-1])


def _mean(d: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Value and interval bounds averaged over seeds, per ``keys``."""
    return d.groupby(keys, dropna=False)[["value", "ci_low", "ci_high"]].mean().reset_index()


def _ci(ax, x, r, colour, horizontal=False):
    lo, hi = r.value - r.ci_low, r.ci_high - r.value
    err = np.vstack([lo.to_numpy(), hi.to_numpy()])
    err = np.where(np.isfinite(err), np.maximum(err, 0), 0)
    if horizontal:
        ax.errorbar(r.value, x, xerr=err, fmt="none", ecolor="black", elinewidth=0.7, capsize=1.5)
    else:
        ax.errorbar(x, r.value, yerr=err, fmt="none", ecolor=colour, elinewidth=0.7, capsize=1.5)


@styled
def head_shares(df: pd.DataFrame, model: Labels = None, probe: Labels = None, intervention: Labels = None):
    """Left: every attention head's estimated share of the best → worst gap (attribution patching;
    rows are layers, columns heads); middle: the top heads (ranked on half of the items) measured
    exactly on the other half — patched from the clean run, and only the path image tokens → head
    → answer position — beside their estimate; right: what the top k heads restore when patched
    together and what knocking them out removes, against k. Bars and bands: 95% intervals.

    One row per intervention of one (model, probe); "not read" when the gap is too small to divide by."""
    metrics = [m for m, *_ in BARS] + [m for m, *_ in CURVES] + ["head_rank", "gap"]
    d, m, p = _pick(df, "head_shares", "heads", metrics, model, probe, intervention)
    order = [iv for iv in intervention_order(d) if (d[d.intervention == iv].metric == "head_rank").any()]
    est = seed_mean(d[d.metric == "head_share_estimate"], ["intervention", "layer", "group"])
    lim = float(np.nanmax(np.abs(est.value))) if len(est) and np.isfinite(est.value).any() else 1.0
    fig = plt.figure(figsize=(MAX_WIDTH_IN, 2.7 * len(order) + 0.8), layout="constrained")
    gs = fig.add_gridspec(len(order), 4, width_ratios=[1, 0.05, 1.05, 1.05])
    mesh = None
    for row, iv in enumerate(order):
        e = est[est.intervention == iv]
        L, H = int(e.layer.max()) + 1, int(e.group.map(_head).max()) + 1
        grid = np.full((L, H), np.nan)
        grid[e.layer.astype(int).to_numpy(), e.group.map(_head).to_numpy()] = e.value.to_numpy()
        ax = fig.add_subplot(gs[row, 0])
        mesh = ax.pcolormesh(np.ma.masked_invalid(grid), cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_ylim(L, 0)
        if L * H <= 64:
            for (i, j), v in np.ndenumerate(grid):
                if np.isfinite(v):
                    ax.text(j + 0.5, i + 0.5, f"{v:.0%}", ha="center", va="center", fontsize=ANNOT_PT,
                            color="white" if abs(v) > 0.6 * lim else "black")
        step_h, step_l = max(1, H // 8), max(1, L // 8)
        ax.set_xticks(np.arange(0, H, step_h) + 0.5, [str(h) for h in range(0, H, step_h)])
        ax.set_yticks(np.arange(0, L, step_l) + 0.5, [str(x) for x in range(0, L, step_l)])
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        gap = d[(d.intervention == iv) & (d.metric == "gap")]
        g = f" · gap {gap.value.mean():.2f}" if len(gap) else ""
        ax.set_title(f"{_t(iv)}{g}\nestimated share per head")
        if row == 0:
            cb = fig.colorbar(mesh, cax=fig.add_subplot(gs[:, 1]))
            cb.set_label("share of the gap")
        tops = seed_mean(d[(d.intervention == iv) & (d.metric == "head_rank")], ["layer", "group"]).sort_values("value")
        keys = list(zip(tops.layer.astype(int), tops.group))
        ax2 = fig.add_subplot(gs[row, 2])
        width = 0.8 / len(BARS)
        for j, (metric, label, colour) in enumerate(BARS):
            r = _mean(d[(d.intervention == iv) & (d.metric == metric)], ["layer", "group"])
            r = r.set_index(["layer", "group"]).reindex([(float(a), b) for a, b in keys])
            y = np.arange(len(keys)) + (j - 1) * width
            ax2.barh(y, r.value.fillna(0), height=width, color=colour, label=label)
            _ci(ax2, y, r, colour, horizontal=True)
        ax2.set_yticks(range(len(keys)), [f"L{a}H{_head(b)}" for a, b in keys])
        ax2.set_ylim(len(keys) - 0.5, -0.5)
        ax2.axvline(0, color="black", lw=0.5)
        ax2.set_xlabel("share of the gap")
        ax2.set_title("top heads (held-out items)")
        ax3 = fig.add_subplot(gs[row, 3])
        for metric, label, colour, marker in CURVES:
            r = _mean(d[(d.intervention == iv) & (d.metric == metric)], ["group"])
            r = r.assign(k=r.group.map(_k)).sort_values("k")
            ax3.plot(r.k, r.value, color=colour, marker=marker, ms=3, lw=1.2, label=label)
            ax3.fill_between(r.k, r.ci_low, r.ci_high, color=colour, alpha=0.2, lw=0)
        ax3.axhline(0, color="black", lw=0.5)
        ax3.axhline(1, color="grey", lw=0.5, ls=":")
        ax3.set_xlabel("top k heads")
        ax3.set_ylabel("share of the gap")
        ax3.set_title("cumulative")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for _, _, c in BARS] + \
              [plt.Line2D([], [], color=c, marker=mk, ms=3) for _, _, c, mk in CURVES]
    fig.legend(handles, [lab for _, lab, _ in BARS] + [lab for _, lab, _, _ in CURVES], loc="outside lower center",
               ncol=3)
    _suptitle(fig, f"attention heads carrying the best → worst gap · {_t(m)} · {_t(p)}")
    return fig
