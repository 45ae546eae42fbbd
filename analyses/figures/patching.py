"""Patching: activation-patching restoration per site × token group, position-id patching per
layer window, attention knockout.

Role: figures of the causal rows. May import: ``analyses.figures.common``."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analyses.figures.common import (GROUP_ORDER, MAX_WIDTH_IN, Labels, _colourbar, _first_col, _heat, _heat_figure,
                                     _panels,
                                     _pick, _pm, _seeds_note, _suptitle, _t, family_colours, intervention_order,
                                     seed_mean, styled)
from spatialbias.errors import SpatialBiasError


def _logit_note(d: pd.DataFrame, iv: str) -> str:
    s = d[(d.intervention == iv) & d.metric.isin(["logit_diff_clean", "logit_diff_corrupt", "clean_cell",
                                                   "corrupt_cell"])]
    v = s.groupby("metric")["value"].mean()
    if {"logit_diff_clean", "logit_diff_corrupt"} <= set(v.index):
        cells = (f" (cell {v['clean_cell']:.0f} → {v['corrupt_cell']:.0f})"
                 if {"clean_cell", "corrupt_cell"} <= set(v.index) else "")
        return f"\nclean {v['logit_diff_clean']:.2f} · corrupt {v['logit_diff_corrupt']:.2f}" + (
            f"\n{cells.strip()}" if cells else "")
    return ""


@styled
def restoration_heatmaps(df: pd.DataFrame, model: Labels = None, probe: Labels = None, intervention: Labels = None,
                         direction: str = "denoise"):
    """Each panel is one condition; a square is the share of the clean − corrupt logit difference
    restored by patching one site (row) at one token group (column): 1 means that activation alone
    carries the target's position, 0 that it carries none. One shared scale, −0.2 to 1.2; values
    beyond it keep the end colours and are printed.

    Activation patching: normalised restoration per site (rows, forward order) × token group
    (columns), one panel per intervention of one (model, probe); ``direction`` is ``denoise``
    (clean → corrupt) or ``noise`` (corrupt → clean). Seed spread under each mean; titles give
    the clean and corrupt logit differences and the two cells."""
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
    lines = 2 if agg.sd.notna().any() else 1
    label_w = 0.055 * max(len(str(s)) for s in sites) + 0.25  # site names and the axis label
    cell_w = 0.45 if len(sites) > 16 else 0.4  # tall maps get their colour bar on top: room for wider cells
    fig, axes, cax = _heat_figure(len(order), cell_w * len(groups) + 0.2, (0.13 * lines + 0.08) * len(sites) + 1.2,
                                  head_h=0.4, label_w=label_w)
    mesh = None
    for k, ax in enumerate(axes):
        a = agg[agg.intervention == order[k]]
        piv = a.pivot_table(index="site", columns="group", values="value", dropna=False).reindex(index=sites,
                                                                                                  columns=groups)
        sd = a.pivot_table(index="site", columns="group", values="sd", dropna=False).reindex(index=sites,
                                                                                              columns=groups)
        annot = np.array([_pm(v, s) for v, s in zip(piv.to_numpy().flat, sd.to_numpy().flat)],
                         dtype=object).reshape(piv.shape)
        mesh = _heat(ax, piv.to_numpy(float), annot, -0.2, 1.2, "RdBu_r", square=False, xlabels=groups,
                     ylabels=sites if _first_col(ax) else None)
        ax.set_title(_t(order[k]) + _logit_note(d, order[k]))
        ax.set_xlabel("token group")
        ax.set_ylabel("site" if _first_col(ax) else "")
    _colourbar(mesh, cax, "restoration", extend="both")
    _suptitle(fig, f"activation patching ({direction}): restoration · {_t(m)} · {_t(p)} · {_seeds_note(r)}")
    return fig


@styled
def position_restoration(df: pd.DataFrame, model: Labels = None, probe: Labels = None, intervention: Labels = None):
    """The share of the clean − corrupt gap restored by giving the target's image tokens their clean
    position ids, in all layers at once ("all") and one layer at a time: a bar at 1 (dashed line)
    means the position ids alone carry the bias; 0, that they carry none.

    Position-id patching: bars per intervention, error bars = seed sd; the legend is under the
    axes."""
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
    fig, ax = plt.subplots(figsize=(min(MAX_WIDTH_IN, max(5.0, 1.2 + 0.18 * len(wheres) * (len(order) + 1))), 3.6),
                           layout="constrained")
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
    ax.set_xlim(-0.6, len(wheres) - 0.4)
    ax.set_xlabel("layers with the clean position ids")
    ax.set_ylabel("restoration")
    fig.legend(loc="outside lower center", ncol=min(4, len(order)))
    _suptitle(fig, f"position-id patching · {_t(m)} · {_t(p)} · {_seeds_note(r)}")
    return fig


@styled
def knockout_drops(df: pd.DataFrame, model: Labels = None, probe: Labels = None, intervention: Labels = None):
    """How much the answer's logit difference drops when the question tokens cannot attend to the
    target's cell, a distractor cell or any image token, per layer and in all layers: a tall
    target-cell bar marks where the answer reads the target. Panels share the y scale.

    Attention knockout: one panel per intervention, error bars the bootstrap 95% interval over
    items; the legend is under the panels."""
    d, m, p = _pick(df, "knockout_drops", "knockout", "knockout_drop", model, probe, intervention)
    d = d.assign(where=d.layer.map(lambda x: "all" if pd.isna(x) else str(int(x))))
    order = [i for i in intervention_order(d) if i in set(d.intervention)]
    wheres = sorted((w for w in set(d["where"]) if w != "all"), key=int) + ["all"]
    blocked = list(dict.fromkeys(d.group))
    panel_w = min(MAX_WIDTH_IN - 0.6, 0.9 + 0.12 * len(wheres) * (len(blocked) + 1))
    nr, nc = _panels(len(order), panel_w, MAX_WIDTH_IN - 0.6)
    fig, axes = plt.subplots(nr, nc, figsize=(panel_w * nc + 0.6, 2.8 * nr + 0.9), squeeze=False, sharey=True,
                             layout="constrained")
    width = 0.8 / max(1, len(blocked))
    for ax in axes.flat[len(order):]:
        ax.axis("off")
    for ax, iv in zip(axes.flat, order):
        a = seed_mean(d[d.intervention == iv], ["where", "group"])
        ci = d[d.intervention == iv].groupby(["where", "group"])[["ci_low", "ci_high"]].mean()
        for k, b in enumerate(blocked):
            v = a[a.group == b].set_index("where").reindex(wheres)
            c = ci.xs(b, level="group").reindex(wheres) if b in ci.index.get_level_values("group") else None
            err = None if c is None else np.abs(np.stack([v.value - c.ci_low, c.ci_high - v.value]))
            ax.bar(np.arange(len(wheres)) - 0.4 + width * (k + 0.5), v.value, width, yerr=err, capsize=2,
                   color=f"C{k}", label=_t(b), edgecolor="black", lw=0.4)
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xticks(range(len(wheres)), wheres)
        ax.set_xlim(-0.6, len(wheres) - 0.4)
        ax.set_xlabel("knocked-out layer(s)")
        ax.set_title(_t(iv))
    for row in axes:
        row[0].set_ylabel("drop in logit difference")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels))
    _suptitle(fig, f"attention knockout from the question tokens · {_t(m)} · {_t(p)}")
    return fig
