"""Causal analyses on a grid probe: pairs of placements of the same items, fed to
:mod:`interp.patching`, :mod:`interp.attention` and :mod:`interp.attribution`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats

from analyses.evaluate import answer_set, load_image
from analyses.scoring import prompt_text
from interp import attention, attribution, patching
from interp.errors import SpatialBiasError
from interp.interventions import Intervention, PositionSwap
from interp.model import LVLM
from probes.format import Probe, find_probe, grid_name, grid_positions, read_rows


@dataclass
class Pairs:
    """The same items in two placements. ``clean``/``corrupt``: processor inputs (N rows);
    ``correct``: (N,) answer token ids; ``candidates``: answer token ids; ``targets``: per item
    the two target cells; ``ids``: item ids."""
    clean: dict[str, torch.Tensor]
    corrupt: dict[str, torch.Tensor]
    correct: torch.Tensor
    candidates: tuple[int, ...]
    targets: list[tuple[int, int]]
    ids: list[str]
    clean_cell: int
    corrupt_cell: int
    grid: tuple[int, int] = (3, 3)


def placement_pairs(lvlm: LVLM, probe_dir: str | Path | Probe, clean_cell: int, corrupt_cell: int,
                    n_items: int | None = None) -> Pairs:
    """Items of a grid probe (a folder, a rows file or a Probe) that have both placements; the
    first ``n_items`` of them."""
    if clean_cell == corrupt_cell:
        raise SpatialBiasError(f"clean and corrupt cells are both {clean_cell}; choose two different cells")
    probe = find_probe(probe_dir)
    rows = read_rows(probe)
    grid = probe_grid(rows, probe.rows_file)
    cands = answer_set(lvlm, rows, probe.meta)
    by_item: dict[str, dict[int, tuple[int, object]]] = {}
    for n, r in enumerate(rows):
        by_item.setdefault(r.id, {})[r.cell] = (n, r)
    ids = [i for i, v in by_item.items() if clean_cell in v and corrupt_cell in v][:n_items]
    if not ids:
        raise SpatialBiasError(f"{probe.rows_file}: no item has both cells {clean_cell} and {corrupt_cell}")

    def inputs(cell):
        sel = [by_item[i][cell] for i in ids]
        imgs = [load_image(probe, r, f"{probe.rows_file} row {n + 1}") for n, r in sel]
        return lvlm.inputs(imgs, [lvlm.prompt(prompt_text(r)) for _, r in sel])

    answers = [by_item[i][clean_cell][1].answer for i in ids]
    correct = torch.tensor([cands.token_ids[cands.answers.index(a)] for a in answers])
    return Pairs(inputs(clean_cell), inputs(corrupt_cell), correct, cands.token_ids,
                 [(clean_cell, corrupt_cell)] * len(ids), ids, clean_cell, corrupt_cell, grid)


def probe_grid(rows, where) -> tuple[int, int]:
    """The (n, m) grid of a cell-placement probe; shift and irregular-box probes have no cells
    to patch between and are refused (``where``, the probe's rows file or folder, names it)."""
    grids = {r.grid for r in rows}
    grid = next(iter(grids))
    names = set(grid_positions(*grid))
    bad = next((r for r in rows if r.position not in names), None)
    if len(grids) != 1 or bad is not None:
        what = f"position {bad.position!r}" if bad is not None else f"grids {sorted(grid_name(g) for g in grids)}"
        raise SpatialBiasError(f"{where}: the causal analyses need one n×m grid of cells ({what}); shift and "
                               "irregular-box probes have no cells to patch between: build one with "
                               "'spatialbias probe build --grid NxM'")
    return grid

# ---------------------------------------------------------------------------------------------
# The whole causal picture of one model under several conditions (baseline, BaPA, AGCI, …)


def _mean_metric(lvlm, inputs, pairs, ivs) -> float:
    with torch.no_grad():
        lg = lvlm.run(inputs, ivs, last_only=True)[:, -1]
    return float(patching.logit_diff(lg, pairs.correct.to(lg.device), pairs.candidates).mean())


def position_patching(lvlm: LVLM, pairs: Pairs, conditions: dict[str, list[Intervention]]) -> pd.DataFrame:
    """Position-id patching: the corrupt run with the target cell's and the clean target cell's
    image-token ids swapped (all layers, then one layer at a time), and the converse on the clean
    run. Restoration = (swapped − corrupt) / (clean − corrupt); damage on the clean run likewise."""
    n = lvlm.adapter.layer_count(lvlm.model, "lm")
    a, b = pairs.corrupt_cell, pairs.clean_cell
    rows = []
    for cond, ivs in conditions.items():
        clean, corrupt = _mean_metric(lvlm, pairs.clean, pairs, ivs), _mean_metric(lvlm, pairs.corrupt, pairs, ivs)
        windows = [None] + [(i, i + 1) for i in range(n)]
        for w in windows:
            label = "all" if w is None else f"{w[0]}"
            fixed = _mean_metric(lvlm, pairs.corrupt, pairs, ivs + [PositionSwap(a=a, b=b, layers=w, grid=pairs.grid)])
            broken = _mean_metric(lvlm, pairs.clean, pairs, ivs + [PositionSwap(a=b, b=a, layers=w, grid=pairs.grid)])
            gap = clean - corrupt
            rows.append({"condition": cond, "layers": label, "clean": clean, "corrupt": corrupt,
                         "corrupt_with_clean_ids": fixed, "clean_with_corrupt_ids": broken,
                         "restoration": (fixed - corrupt) / gap if gap else np.nan,
                         "damage": (clean - broken) / gap if gap else np.nan})
    return pd.DataFrame(rows)


def activation_patching(lvlm: LVLM, pairs: Pairs, conditions: dict[str, list[Intervention]],
                        batch_size: int = 64, progress: bool = False) -> pd.DataFrame:
    """Denoising and noising restoration of every default patch, per condition."""
    ps = patching.default_patches(lvlm)
    out = []
    for cond, ivs in conditions.items():
        for direction, base, source in (("denoise", pairs.corrupt, pairs.clean), ("noise", pairs.clean, pairs.corrupt)):
            df = patching.run_patches(lvlm, base, source, ps, pairs.correct, pairs.candidates, pairs.targets,
                                      interventions=ivs, batch_size=batch_size, progress=progress, grid=pairs.grid)
            out.append(patching.restoration(df, direction).assign(condition=cond))
    return pd.concat(out, ignore_index=True)


def attribution_check(lvlm: LVLM, pairs: Pairs, exact: pd.DataFrame, steps: int = 1,
                      method: str = "atp") -> tuple[pd.DataFrame, float]:
    """Attribution patching (``method``: atp, conductance or site_ig; :mod:`interp.attribution`) on
    the baseline graph and its Spearman rank correlation with exact denoising restoration over all
    (site, group) patches."""
    ps = patching.default_patches(lvlm)
    at = attribution.estimated_restoration(attribution.attribution_patching(
        lvlm, pairs.corrupt, pairs.clean, ps, pairs.correct, pairs.candidates, pairs.targets, steps=steps,
        method=method, grid=pairs.grid))
    ex = exact[(exact.condition == "baseline") & (exact.direction == "denoise")]
    j = ex.merge(at, on=["site", "group"])
    rho = float(stats.spearmanr(j["restoration"], j["estimate"]).statistic)
    return j[["site", "group", "restoration", "estimate"]], rho


def flow_by_placement(lvlm: LVLM, probe_dir: str | Path | Probe, conditions: dict[str, list[Intervention]],
                      n_items: int, query: str = "last") -> pd.DataFrame:
    """Attention mass from the query rows to each cell, for every placement of ``n_items`` items.
    Tidy: condition, target_cell, layer, cell, mass (mean over items and heads)."""
    out = []
    probe = find_probe(probe_dir)
    n, m = probe_grid(read_rows(probe), probe.rows_file)
    for cell in range(n * m):
        other = 0 if cell != 0 else n * m - 1
        pairs = placement_pairs(lvlm, probe, clean_cell=cell, corrupt_cell=other, n_items=n_items)
        for cond, ivs in conditions.items():
            f = attention.cell_flow(lvlm, pairs.clean, ivs, query=query, grid=pairs.grid).mean((0, 2))  # (layers, cells)
            for layer in range(f.shape[0]):
                for c in range(f.shape[1]):
                    out.append({"condition": cond, "target_cell": cell, "layer": layer, "cell": c,
                                "mass": float(f[layer, c])})
    return pd.DataFrame(out)


def knockout_curves(lvlm: LVLM, pairs: Pairs, conditions: dict[str, list[Intervention]]) -> pd.DataFrame:
    """Drop of the answer logit difference on the clean placement when the question tokens cannot
    attend to the target's cell, to a distractor cell, or to any image token, one layer at a time
    and in all layers."""
    n = lvlm.adapter.layer_count(lvlm.model, "lm")
    distractor = next(c for c in range(pairs.grid[0] * pairs.grid[1]) if c not in (pairs.clean_cell, pairs.corrupt_cell))
    rows = []
    for cond, ivs in conditions.items():
        base = _mean_metric(lvlm, pairs.clean, pairs, ivs)
        for w in [(i, i + 1) for i in range(n)] + [(0, n)]:
            for what, cells in (("target cell", (pairs.clean_cell,)), ("distractor cell", (distractor,)),
                                ("all image tokens", None)):
                ko = attention.Knockout(cells=cells, layers=w, query="text", grid=pairs.grid)
                v = _mean_metric(lvlm, pairs.clean, pairs, ivs + [ko])
                rows.append({"condition": cond, "layers": "all" if w == (0, n) else str(w[0]), "blocked": what,
                             "metric": v, "baseline_metric": base, "drop": base - v})
    return pd.DataFrame(rows)
