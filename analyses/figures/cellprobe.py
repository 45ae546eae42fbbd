"""Cell-identity probes: how well the target's cell decodes from its own tokens at every site,
against the shuffled-label control and chance, beside activation patching's restoration at the
same sites.

Role: figures of cellprobe rows. May import: ``analyses.figures.common``, ``analyses.figures.lens``."""
from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

from analyses.figures.common import (MAX_WIDTH_IN, UNIT, Labels, _pick, _suptitle, _t, intervention_order,
                                     seed_mean, select, styled)
from analyses.figures.lens import depth, depth_axis
from spatialbias.errors import SpatialBiasError


def _band(ax, d: pd.DataFrame, metric: str, x: dict, **style) -> None:
    r = d[d.metric == metric]
    a = seed_mean(r, ["site"]).assign(x=lambda t: t.site.map(x)).dropna(subset=["x"]).sort_values("x")
    ci = r.groupby("site")[["ci_low", "ci_high"]].mean().reindex(a.site)
    ax.plot(a.x, a.value, marker="o", ms=2.5, lw=1.2, **style)
    ax.fill_between(a.x, ci.ci_low, ci.ci_high, color=style.get("color"), alpha=0.2, lw=0)


@styled
def cellprobe_accuracy(df: pd.DataFrame, model: Labels = None, probe: Labels = None, intervention: Labels = None):
    """Left: accuracy of a linear probe decoding the target's cell from its own tokens at each site
    (vision blocks "v", projector, LM input "in", LM blocks), against the shuffled-label control
    and chance: where position is present. Right, when the run patched: the share of the gap that
    patching that site restores (the target's tokens on LM sites): where position is used.

    Cell-identity probes: one row of panels per intervention of one (model, probe); bands are the
    bootstrap 95% intervals over items; accuracy is drawn on 0–1."""
    d, m, p = _pick(df, "cellprobe_accuracy", "cellprobe", None, model, probe, intervention)
    acc = d[d.metric == "cellprobe_accuracy"]
    if acc.empty:
        raise SpatialBiasError(f"cellprobe_accuracy: no cellprobe_accuracy rows for model {m!r}, probe {p!r}")
    sites = sorted(set(acc.site.dropna()), key=depth)
    x = {s: k for k, s in enumerate(sites)}
    order = [i for i in intervention_order(d) if i in set(acc.intervention)]
    pt = select(df, m, p, order, "patching", "restoration_denoise")
    pt = pt[pt.site.isin(sites)]  # the target's tokens on LM sites, every token on the vision side
    pt = pt[pt.group == pt.site.map(lambda s: "target" if s.startswith("lm.") else "all")]
    ncol = 2 if not pt.empty else 1
    fig, axes = plt.subplots(len(order), ncol, figsize=(MAX_WIDTH_IN if ncol == 2 else 5.2, 2.5 * len(order) + 0.9),
                             squeeze=False, layout="constrained")
    chance = d[d.metric == "cellprobe_chance"].value
    for row, iv in zip(axes, order):
        a, ax = d[d.intervention == iv], row[0]
        _band(ax, a, "cellprobe_accuracy", x, color="#1f77b4", label="probe accuracy")
        _band(ax, a, "cellprobe_control", x, color="#7f7f7f", label="shuffled-label control", ls="--")
        if len(chance):
            ax.axhline(float(chance.mean()), color="black", lw=0.6, ls=":", label="chance")
        ax.set_ylim(*UNIT)
        ax.set_ylabel("accuracy")
        ax.set_title(f"{_t(iv)} · cell decoded (present)")
        depth_axis(ax, sites, "site depth")
        if ncol == 2:
            ax2 = row[1]
            _band(ax2, pt[pt.intervention == iv], "restoration_denoise", x, color="#d62728", label="restoration")
            ax2.axhline(0, color="black", lw=0.5)
            ax2.set_ylabel("restoration")
            ax2.set_title("patching restores (used)")
            depth_axis(ax2, sites, "site depth")
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside lower center", ncol=3)
    _suptitle(fig, f"cell-identity probes · {_t(m)} · {_t(p)}")
    return fig
