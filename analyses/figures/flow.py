"""Attention flow: attention from the last token to the target's cell by placement, and to every
cell per layer.

Role: figures of flow rows and flow details. May import: ``analyses.figures.common``."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analyses.figures.common import (Labels, _grid, _heat, _pick, _pm, _seeds_note, _t, grid_shape,
                                     intervention_order, seed_mean, select)
from spatialbias.errors import SpatialBiasError


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


def layer_cell(details: pd.DataFrame, model: Labels = None, probe: Labels = None, intervention: Labels = None):
    """Attention mass from the last token to every cell per layer (mean over placements and
    items), one panel per intervention on one colour scale. ``details``: flow detail rows
    (:func:`analyses.store.read_details` of ``flow``)."""
    d = select(details, model, probe, intervention)
    if d.empty:
        raise SpatialBiasError("layer_cell: no flow detail rows in the selection")
    order = intervention_order(d)
    piv = {iv: d[d.intervention == iv].pivot_table(index="layer", columns="cell", values="mass") for iv in order}
    vmax = max(float(p.to_numpy().max()) for p in piv.values()) or 1.0
    fig, axes = plt.subplots(1, len(order) + 1, figsize=(3.6 * len(order) + 0.6, 0.45 * len(piv[order[0]]) + 1.6),
                             gridspec_kw={"width_ratios": [1] * len(order) + [0.06]}, squeeze=False)
    for k, iv in enumerate(order):
        g = piv[iv]
        annot = np.array([f"{v:.2f}" for v in g.to_numpy().flat], dtype=object).reshape(g.shape)
        _heat(axes[0, k], g.to_numpy(float), annot, 0, vmax, "magma", 6, cax=axes[0, -1] if k == 0 else None,
              square=False, xlabels=[str(c) for c in g.columns], ylabels=[str(i) for i in g.index] if k == 0 else None)
        axes[0, k].set_title(_t(iv), fontsize=9)
        axes[0, k].set_xlabel("cell")
    axes[0, 0].set_ylabel("layer")
    fig.suptitle("attention mass per layer and cell (mean over placements)", fontsize=10)
    fig.tight_layout()
    return fig
