"""Attention flow: attention from the last token to the target's cell by placement, and to every
cell per layer.

Role: figures of flow rows and flow details. May import: ``analyses.figures.common``."""
from __future__ import annotations

import numpy as np
import pandas as pd

from analyses.figures.common import (Labels, _colourbar, _first_col, _grid, _heat, _heat_figure, _pick, _pm,
                                     _seeds_note, _suptitle, _t, grid_shape, intervention_order, seed_mean, select,
                                     styled)
from spatialbias.errors import SpatialBiasError


@styled
def attention_to_target(df: pd.DataFrame, model: Labels = None, probe: Labels = None, intervention: Labels = None):
    """Each panel is one condition at one layer; a square is the attention from the last token to
    the target's own cell when the target sits there: a flat map means the model attends to the
    target equally wherever it is. The colour scale is shared by the panels and starts at 0.

    Attention flow: mean attention mass from the last token to the target's cell, drawn at the
    target's placement on the n×m grid; each condition starts a row, its layers run along it
    (wrapping when they do not fit); the seed spread is written under each mean."""
    d, m, p = _pick(df, "attention_to_target", "flow", "attention_to_target", model, probe, intervention)
    d = d[d.cell.notna() & d.layer.notna()]
    if d.empty:
        raise SpatialBiasError(f"attention_to_target: no rows with a cell and a layer for model {m!r}, probe {p!r}")
    agg = seed_mean(d, ["intervention", "layer", "cell"])
    shape = grid_shape(df, p, int(agg.cell.max()) + 1)
    order = [i for i in intervention_order(d) if i in set(agg.intervention)]
    layers = sorted(int(x) for x in agg.layer.unique())
    vmax = float(agg.value.max()) or 1.0
    cell_in = 0.55 if agg.sd.notna().any() else 0.5
    fig, axes, cax = _heat_figure(len(order) * len(layers), max(1.75, cell_in * shape[1] + 0.3),
                                  cell_in * shape[0] + 0.6, head_h=0.5,
                                  row_starts=[i * len(layers) for i in range(len(order))])
    mesh = None
    for k, ax in enumerate(axes):
        iv, layer = order[k // len(layers)], layers[k % len(layers)]
        a = agg[(agg.intervention == iv) & (agg.layer == layer)]
        grid, sd = _grid(a.value, a.cell, shape), _grid(a.sd, a.cell, shape)
        annot = np.array([_pm(v, s, ".3f") for v, s in zip(grid.flat, sd.flat)], dtype=object).reshape(shape)
        mesh = _heat(ax, grid, annot, 0, vmax, "magma")
        ax.set_title(f"{_t(iv)}\nlayer {layer}")
    _colourbar(mesh, cax, "attention mass")
    _suptitle(fig, f"attention from the last token to the target's cell, by placement · {_t(m)} · {_t(p)} · "
              f"{_seeds_note(d)}")
    return fig


@styled
def layer_cell(details: pd.DataFrame, model: Labels = None, probe: Labels = None, intervention: Labels = None):
    """Each panel is one condition: the attention mass from the last token to every cell (columns)
    at every layer (rows), averaged over the target's placements; look for the layers where one
    cell takes more than its share. The colour scale is shared by the panels and starts at 0.

    ``details``: flow detail rows (:func:`analyses.store.read_details` of ``flow``); mean over
    placements and items."""
    d = select(details, model, probe, intervention)
    if d.empty:
        raise SpatialBiasError("layer_cell: no flow detail rows in the selection")
    order = intervention_order(d)
    piv = {iv: d[d.intervention == iv].pivot_table(index="layer", columns="cell", values="mass") for iv in order}
    vmax = max(float(p.to_numpy().max()) for p in piv.values()) or 1.0
    n_layers, n_cells = len(piv[order[0]]), piv[order[0]].shape[1]
    fig, axes, cax = _heat_figure(len(order), 0.34 * n_cells + 0.3, 0.2 * n_layers + 0.9, head_h=0.4, label_w=0.5)
    mesh = None
    for k, (ax, iv) in enumerate(zip(axes, order)):
        g = piv[iv]
        annot = np.array([f"{v:.2f}" for v in g.to_numpy().flat], dtype=object).reshape(g.shape)
        mesh = _heat(ax, g.to_numpy(float), annot, 0, vmax, "magma", square=False,
                     xlabels=[str(c) for c in g.columns],
                     ylabels=[str(i) for i in g.index] if _first_col(ax) else None)
        ax.set_title(_t(iv))
        ax.set_xlabel("cell")
        ax.set_ylabel("layer" if _first_col(ax) else "")
    _colourbar(mesh, cax, "attention mass")
    _suptitle(fig, "attention mass per layer and cell (mean over placements)")
    return fig
