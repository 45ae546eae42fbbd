"""The causal graph of the best → worst gap, drawn: image → vision tower → projector → LM blocks
→ answer, with the vision tower's position code and the LM's position ids as inputs, each edge
labelled with the share of the gap it carries (the diagnosis' components), one panel per condition.

Role: figures of patching rows. May import: ``analyses.figures.common``."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analyses.figures.common import MAX_WIDTH_IN, Labels, _pick, _suptitle, _t, intervention_order, styled

COMPONENTS = {  # name → (metric, site, group, layer-null): the rows a share is read from
    "Q": ("restoration_denoise", "vision.embed", "vision_position"),
    "V": ("restoration_denoise", "lm.input", "moved"),
    "J": ("restoration_denoise", "lm.input", "joint"),
    "P": ("position_restoration", None, None),
}
NODES = {"image": (0.05, 0.35), "vision tower": (0.27, 0.35), "projector": (0.5, 0.35), "LM blocks": (0.73, 0.35),
         "answer": (0.94, 0.35), "vision position code": (0.27, 0.85), "LM position ids": (0.73, 0.85)}
PER_ROW = 3
"""Panels per row: a sweep's conditions wrap onto more rows, each panel as wide as the figure allows."""


def _share(d: pd.DataFrame, iv: str, name: str) -> tuple[float, float, float] | None:
    metric, site, group = COMPONENTS[name]
    x = d[(d.intervention == iv) & (d.metric == metric)]
    x = x[x.site.isna() & x.layer.isna()] if site is None else x[(x.site == site) & (x.group == group)]
    if x.empty:
        return None
    r = x.iloc[0]
    return float(r.value), float(r.ci_low), float(r.ci_high)


def _pct(s, bapa_p: bool = False) -> str:
    if bapa_p:
        return "n/a (one id)"
    if s is None:
        return "n/a"
    if np.isnan(s[0]):
        return "not read"
    return f"{s[0]:.0%} [{s[1]:.0%}, {s[2]:.0%}]"


@styled
def causal_graph(df: pd.DataFrame, model: Labels = None, probe: Labels = None, intervention: Labels = None):
    """Where the best → worst gap flows: each panel is one condition's model drawn as image → vision
    tower → projector → LM blocks → answer, with the vision tower's position code and the LM's
    position ids as inputs; an edge's label is the share of the gap its patch restores (Q: the
    vision position code swapped; V: the target's tokens moved with their vision-side code; P: the
    LM position ids swapped; J: both, so 1 − J is what the token order carries), with its 95 %
    interval. "not read": the gap is too small to divide by; n/a: the patch cannot act there.

    Components of :mod:`analyses.diagnosis` from the patching rows of one (model, probe), one
    panel per intervention; the gap (clean − corrupt answer logit difference) under each title."""
    d, m, p = _pick(df, "causal_graph", "patching", [c[0] for c in COMPONENTS.values()] + ["gap"], model, probe,
                    intervention)
    order = [iv for iv in intervention_order(d)]
    n = len(order)
    cols = min(n, PER_ROW)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(min(MAX_WIDTH_IN, 2.9 * cols), 2.25 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax, iv in zip(axes.flat, order):
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.05)
        ax.axis("off")
        fam = str(d[d.intervention == iv].family.iloc[0])
        s = {k: _share(d, iv, k) for k in COMPONENTS}
        gap = d[(d.intervention == iv) & (d.metric == "gap")]
        g = f"gap {gap.value.iloc[0]:.2f} [{gap.ci_low.iloc[0]:.2f}, {gap.ci_high.iloc[0]:.2f}]" if len(gap) else ""
        ax.set_title(f"{_t(iv)}\n{g}")
        for name, (x, y) in NODES.items():
            ax.text(x, y, name.replace(" ", "\n", 1), ha="center", va="center", fontsize=7,
                    bbox={"boxstyle": "round,pad=0.3", "fc": "#eef3f8", "ec": "#5b7a99", "lw": 0.8})
        chain = ["image", "vision tower", "projector", "LM blocks", "answer"]
        for a, b in zip(chain, chain[1:]):
            ax.annotate("", NODES[b], NODES[a], arrowprops={"arrowstyle": "->", "lw": 0.8, "shrinkA": 11,
                                                            "shrinkB": 11})
        for a, b in (("vision position code", "vision tower"), ("LM position ids", "LM blocks")):
            ax.annotate("", NODES[b], NODES[a], arrowprops={"arrowstyle": "->", "lw": 0.8, "shrinkA": 9,
                                                            "shrinkB": 14})
        ax.text(0.29, 0.62, f"Q {_pct(s['Q'])}", fontsize=7, ha="left", color="#1f4e79")
        ax.text(0.75, 0.62, f"P {_pct(s['P'], fam == 'bapa')}", fontsize=7, ha="left", color="#1f4e79")
        ax.text(0.615, 0.14, f"V {_pct(s['V'])}", fontsize=7, ha="center", color="#1f4e79")
        j = s["J"]
        r = None if j is None else (1 - j[0], 1 - j[2], 1 - j[1])
        ax.text(0.5, 0.0, f"J {_pct(j)} · order 1 − J {_pct(r)}", fontsize=7, ha="center", color="#444")
    _suptitle(fig, f"causal graph of the best → worst gap · {_t(m)} · {_t(p)}")
    fig.tight_layout()
    return fig
