"""Patching: activation-patching restoration per site × token group, position-id patching per
layer window, attention knockout.

Role: figures of the causal rows. May import: ``analyses.figures.common``."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analyses.figures.common import (GROUP_ORDER, Labels, _heat, _panels,
                                     _pick, _pm, _seeds_note, _t, family_colours, intervention_order, seed_mean)
from spatialbias.errors import SpatialBiasError


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


def knockout_drops(df: pd.DataFrame, model: Labels = None, probe: Labels = None, intervention: Labels = None):
    """Attention knockout: drop of the answer logit difference when the question tokens cannot
    attend to the target's cell, a distractor cell or every image token, per knocked-out layer and
    in all layers; one panel per intervention, error bars the bootstrap 95% interval over items."""
    d, m, p = _pick(df, "knockout_drops", "knockout", "knockout_drop", model, probe, intervention)
    d = d.assign(where=d.layer.map(lambda x: "all" if pd.isna(x) else str(int(x))))
    order = [i for i in intervention_order(d) if i in set(d.intervention)]
    wheres = sorted((w for w in set(d["where"]) if w != "all"), key=int) + ["all"]
    blocked = list(dict.fromkeys(d.group))
    fig, axes = plt.subplots(1, len(order), figsize=(3.2 * len(order) + 0.6, 3.0), squeeze=False, sharey=True)
    width = 0.8 / max(1, len(blocked))
    for ax, iv in zip(axes[0], order):
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
        ax.set_xlabel("knocked-out layer(s)")
        ax.set_title(_t(iv), fontsize=9)
    axes[0, 0].set_ylabel("drop in logit difference")
    axes[0, -1].legend(fontsize=7)
    fig.suptitle(f"attention knockout from the question tokens · {_t(m)} · {_t(p)}", fontsize=9)
    fig.tight_layout()
    return fig
