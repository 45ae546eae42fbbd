"""Logit lens per cell: the answer margin read through the model's own final norm and unembedding
at every depth, per placement of the target, and its spread over placements.

Role: figures of lens rows. May import: ``analyses.figures.common``."""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analyses.figures.common import MAX_WIDTH_IN, Labels, _pick, _suptitle, _t, intervention_order, seed_mean, styled
from spatialbias.errors import SpatialBiasError

WHAT = {"lens_margin": ("lens_spread", "answer position"),
        "lens_cell_margin": ("lens_cell_spread", "the target's own image tokens")}


def depth(site: str) -> tuple[int, int]:
    """Sort key of a site from the image to the answer: vision blocks, projector, ``lm.input``, LM blocks."""
    if site.startswith("vision.blocks."):
        return 0, int(site.rsplit(".", 1)[1])
    if site.startswith("lm.blocks."):
        return 3, int(site.rsplit(".", 1)[1])
    return {"vision.out": 1, "projector": 1, "lm.input": 2}.get(site, 4), 0


def short(site: str) -> str:
    """A site's tick label: ``v3`` (vision block 3), ``proj``, ``in`` (``lm.input``), ``7`` (LM block 7)."""
    if site.startswith("vision.blocks."):
        return "v" + site.rsplit(".", 1)[1]
    if site.startswith("lm.blocks."):
        return site.rsplit(".", 1)[1]
    return {"projector": "proj", "lm.input": "in"}.get(site, site)


def depth_axis(ax, sites: list[str], label: str) -> None:
    """x ticks at every k-th site (at most ~14 labels), labelled by :func:`short`."""
    step = max(1, math.ceil(len(sites) / 14))
    ax.set_xticks(range(0, len(sites), step), [_t(short(s)) for s in sites[::step]])
    ax.set_xlim(-0.5, len(sites) - 0.5)
    ax.set_xlabel(label)


@styled
def lens_margins(df: pd.DataFrame, model: Labels = None, probe: Labels = None, intervention: Labels = None,
                 metric: str = "lens_margin"):
    """Left: the answer margin (correct minus best other candidate) read through the model's final
    norm and unembedding after each LM block, one line per placement cell of the target; right: its
    spread (max − min over placements) with the bootstrap 95% interval: where the spread leaves 0 is
    where the position-dependent gap appears.

    Logit lens: one row of panels per intervention of one (model, probe); ``metric`` is
    ``lens_margin`` (the last position) or ``lens_cell_margin`` (the target cell's own image
    tokens). "in" is ``lm.input``; the lens after the last block is the model's own margin."""
    if metric not in WHAT:
        raise SpatialBiasError(f"lens_margins: metric {metric!r}; use {' or '.join(WHAT)}")
    spread_metric, where = WHAT[metric]
    d, m, p = _pick(df, "lens_margins", "lens", [metric, spread_metric], model, probe, intervention)
    lines = d[(d.metric == metric) & d.cell.notna()]
    if lines.empty:
        raise SpatialBiasError(f"lens_margins: no {metric} rows with a cell for model {m!r}, probe {p!r}")
    sites = sorted(set(lines.site.dropna()), key=depth)
    order = [i for i in intervention_order(d) if i in set(lines.intervention)]
    cells = sorted(int(c) for c in lines.cell.unique())
    colours = plt.get_cmap("viridis")(np.linspace(0, 0.95, len(cells)))
    fig, axes = plt.subplots(len(order), 2, figsize=(MAX_WIDTH_IN, 2.5 * len(order) + 0.9), squeeze=False,
                             layout="constrained", gridspec_kw={"width_ratios": [1.35, 1]})
    x = {s: k for k, s in enumerate(sites)}
    for (ax, ax2), iv in zip(axes, order):
        a = seed_mean(lines[lines.intervention == iv], ["site", "cell"])
        for c, colour in zip(cells, colours):
            v = a[a.cell == c].assign(x=lambda t: t.site.map(x)).sort_values("x")
            ax.plot(v.x, v.value, color=colour, lw=1.2, marker="o", ms=2.5, label=str(c))
        ax.axhline(0, color="black", lw=0.5)
        ax.set_ylabel("margin")
        ax.set_title(f"{_t(iv)} · margin per placement cell")
        depth_axis(ax, sites, "LM depth")
        s = d[(d.metric == spread_metric) & (d.intervention == iv)]
        sa = seed_mean(s, ["site"]).assign(x=lambda t: t.site.map(x)).dropna(subset=["x"]).sort_values("x")
        ci = s.groupby("site")[["ci_low", "ci_high"]].mean().reindex(sa.site)
        ax2.plot(sa.x, sa.value, color="black", lw=1.2, marker="o", ms=2.5)
        ax2.fill_between(sa.x, ci.ci_low, ci.ci_high, color="grey", alpha=0.3, lw=0)
        ax2.axhline(0, color="black", lw=0.5)
        ax2.set_ylabel("max − min over cells")
        ax2.set_title("spread over placements")
        depth_axis(ax2, sites, "LM depth")
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside lower center", ncol=min(len(cells), 9),
               title="placement cell")
    _suptitle(fig, f"logit lens at {where} · {_t(m)} · {_t(p)}")
    return fig
