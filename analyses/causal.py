"""Causal analyses on a grid probe: pairs of placements of the same items, fed to
:mod:`interp.patching`, :mod:`interp.attention` and :mod:`interp.attribution`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from analyses.evaluate import answer_set, load_image
from analyses.scoring import prompt_text
from interp import attention, attribution, patching
from spatialbias.errors import SpatialBiasError
from interp.interventions import Knockout, PositionSwap
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
# Per-item tables of each causal analysis (one row per item × patch / window / placement), and
# their aggregates with bootstrap 95% intervals over items (ratios of means, as the point values)


def item_metric(lvlm: LVLM, inputs, pairs: Pairs, ivs, batch_size: int | None = None) -> np.ndarray:
    """(N,) answer logit difference of every item under ``ivs``, in forwards of ``batch_size`` rows
    (None: one forward)."""
    batch = lvlm.batch(inputs)
    step = batch.rows if batch_size is None else max(1, batch_size)
    out = []
    with torch.no_grad():
        for a in range(0, batch.rows, step):
            rows = list(range(a, min(batch.rows, a + step)))
            lg = lvlm.run(lvlm.rows(batch, rows) if step < batch.rows else batch, ivs, last_only=True)[:, -1]
            out.append(patching.logit_diff(lg, pairs.correct[rows].to(lg.device), pairs.candidates).double().cpu())
    return torch.cat(out).numpy()


def activation_items(lvlm: LVLM, pairs: Pairs, ivs, batch_size: int = 64, progress: bool = False,
                     screen: int | None = None, screen_batch_size: int | None = None) -> pd.DataFrame:
    """Denoising (clean → corrupt) and noising patches of every default patch: one row per item ×
    direction × (site, group) with ``metric`` (patched), ``base_metric``, ``source_metric``. With
    ``screen`` K: attribution ranks the patches per direction and only the top K are patched
    exactly (:func:`interp.screen.screened_patches`; column ``method``: ``"exact"`` or
    ``"screen_estimate"``); its attribution step (a backward pass) takes ``screen_batch_size``
    rows per step (default ``batch_size``), its exact patches ``batch_size``."""
    from interp.screen import screened_patches
    ps = patching.default_patches(lvlm)
    out = []
    for direction, base, source in (("denoise", pairs.corrupt, pairs.clean), ("noise", pairs.clean, pairs.corrupt)):
        if screen is not None:
            df = screened_patches(lvlm, base, source, ps, pairs.correct, pairs.candidates, pairs.targets, screen,
                                  interventions=ivs, batch_size=batch_size, grid=pairs.grid,
                                  attribution_batch_size=screen_batch_size)
            out.append(df.assign(direction=direction))
            continue
        df = patching.run_patches(lvlm, base, source, ps, pairs.correct, pairs.candidates, pairs.targets,
                                  interventions=ivs, batch_size=batch_size, progress=progress, grid=pairs.grid)
        out.append(df.assign(direction=direction))
    return _with_ids(pd.concat(out, ignore_index=True), pairs)


def position_items(lvlm: LVLM, pairs: Pairs, ivs, batch_size: int | None = None) -> pd.DataFrame:
    """Position-id patching per item: the corrupt run with the target's image tokens given their
    clean position ids (``fixed``) and the clean run with the corrupt ids (``broken``), in all
    layers (``layers`` = "all") and one layer at a time (not on an LM with learned absolute
    positions, which enter once, at the embedding; a hybrid LM's attention layers: the ones reading them)."""
    att = lvlm.adapter.attention_layers(lvlm.model) if lvlm.adapter.rope_kind(lvlm.model) != "none" else []
    a, b = pairs.corrupt_cell, pairs.clean_cell
    bs = batch_size
    clean, corrupt = item_metric(lvlm, pairs.clean, pairs, ivs, bs), item_metric(lvlm, pairs.corrupt, pairs, ivs, bs)
    frames = []
    for w in [None] + [(i, i + 1) for i in att]:
        fixed = item_metric(lvlm, pairs.corrupt, pairs, ivs + [PositionSwap(a=a, b=b, layers=w, grid=pairs.grid)], bs)
        broken = item_metric(lvlm, pairs.clean, pairs, ivs + [PositionSwap(a=b, b=a, layers=w, grid=pairs.grid)], bs)
        frames.append(pd.DataFrame({"item": range(len(clean)), "layers": "all" if w is None else str(w[0]),
                                    "clean": clean, "corrupt": corrupt, "fixed": fixed, "broken": broken}))
    return _with_ids(pd.concat(frames, ignore_index=True), pairs)


def moved_items(lvlm: LVLM, pairs: Pairs, ivs, batch_size: int = 64) -> pd.DataFrame:
    """Vision-side patching per item (:func:`interp.patching.run_moved`): the corrupt run with
    the target's image tokens at ``lm.input`` replaced by the clean run's (the content the vision
    tower and projector produced at the clean cell), moved into the corrupt cell's slots, position
    ids kept. Columns as :func:`activation_items`, at site ``lm.input``, group ``moved``."""
    df = patching.run_moved(lvlm, pairs.corrupt, pairs.clean, pairs.corrupt_cell, pairs.clean_cell, pairs.correct,
                            pairs.candidates, interventions=ivs, batch_size=max(3, batch_size), grid=pairs.grid)
    return _with_ids(df.assign(site="lm.input", group="moved", position=None, direction="denoise"), pairs)


def joint_items(lvlm: LVLM, pairs: Pairs, ivs, batch_size: int = 64) -> pd.DataFrame:
    """The joint patch per item (:func:`interp.patching.run_moved` with ``joint``): the corrupt run
    with the target's clean image tokens moved into the corrupt cell's slots AND given the clean
    cell's position ids — content, vision-side position code and LM ids from the good placement,
    only the sequence slots from the bad one. Site ``lm.input``, group ``joint``."""
    df = patching.run_moved(lvlm, pairs.corrupt, pairs.clean, pairs.corrupt_cell, pairs.clean_cell, pairs.correct,
                            pairs.candidates, interventions=ivs, batch_size=max(3, batch_size), grid=pairs.grid,
                            joint=True)
    return _with_ids(df.assign(site="lm.input", group="joint", position=None, direction="denoise"), pairs)


def vision_position_items(lvlm: LVLM, pairs: Pairs, ivs, batch_size: int | None = None) -> pd.DataFrame | None:
    """The vision-side position patch per item: the corrupt run with the vision tower's position
    code of the corrupt and clean cells swapped (:class:`interp.interventions.VisionPositionSwap`),
    the LM's ids untouched. Site ``vision.embed``, group ``vision_position``; None (the component
    is then n/a) for a tower without a learned position table, or whose patch grid the probe's
    grid does not divide (the two cells' patches do not pair up)."""
    from interp.interventions import VisionPositionSwap
    if lvlm.adapter.vision_position_table(lvlm.model) is None:
        return None
    swap = VisionPositionSwap(a=pairs.corrupt_cell, b=pairs.clean_cell, grid=pairs.grid)
    if not swap.pairs_up(lvlm, pairs.corrupt):
        return None  # the grid does not divide the tower's patch grid: the two cells' patches do not pair
    clean, corrupt = item_metric(lvlm, pairs.clean, pairs, ivs, batch_size), item_metric(lvlm, pairs.corrupt, pairs,
                                                                                          ivs, batch_size)
    patched = item_metric(lvlm, pairs.corrupt, pairs, list(ivs) + [swap], batch_size)
    return _with_ids(pd.DataFrame({"item": range(len(clean)), "metric": patched, "base_metric": corrupt,
                                   "source_metric": clean, "site": "vision.embed", "group": "vision_position",
                                   "position": None, "direction": "denoise"}), pairs)


def knockout_items(lvlm: LVLM, pairs: Pairs, ivs, batch_size: int | None = None) -> pd.DataFrame:
    """Per item, on the clean placement: the answer logit difference with the question tokens
    unable to attend to the target's cell, to a distractor cell, or to any image token, one layer
    at a time and in all layers (``base``: without knockout; ``drop`` = base − metric); a hybrid LM's
    attention layers only (its recurrent ones have no mask, and carry the image past the knockout)."""
    n = lvlm.adapter.layer_count(lvlm.model, "lm")
    distractor = next(c for c in range(pairs.grid[0] * pairs.grid[1]) if c not in (pairs.clean_cell, pairs.corrupt_cell))
    base, frames = item_metric(lvlm, pairs.clean, pairs, ivs, batch_size), []
    for w in [(i, i + 1) for i in lvlm.adapter.attention_layers(lvlm.model)] + [(0, n)]:
        for what, cells in (("target cell", (pairs.clean_cell,)), ("distractor cell", (distractor,)),
                            ("all image tokens", None)):
            ko = Knockout(cells=cells, layers=w, query="text", grid=pairs.grid)
            v = item_metric(lvlm, pairs.clean, pairs, ivs + [ko], batch_size)
            frames.append(pd.DataFrame({"item": range(len(base)), "layers": "all" if w == (0, n) else str(w[0]),
                                        "blocked": what, "base": base, "metric": v, "drop": base - v}))
    return _with_ids(pd.concat(frames, ignore_index=True), pairs)


def flow_items(lvlm: LVLM, probe_dir: str | Path | Probe, ivs, n_items: int, query: str = "last",
               batch_size: int | None = None) -> pd.DataFrame:
    """Attention mass from the query rows to each cell (mean over heads), for every placement of
    the first ``n_items`` items: one row per item × target cell × (attention) layer × cell."""
    probe, frames, att = find_probe(probe_dir), [], lvlm.adapter.attention_layers(lvlm.model)
    n, m = probe_grid(read_rows(probe), probe.rows_file)
    for cell in range(n * m):
        other = 0 if cell != 0 else n * m - 1
        pairs = placement_pairs(lvlm, probe, clean_cell=cell, corrupt_cell=other, n_items=n_items)
        f = attention.cell_flow(lvlm, pairs.clean, ivs, query=query, grid=pairs.grid,
                                batch_size=batch_size).mean(2)[:, att]  # (B, attention layers, cells)
        B, L, C = f.shape
        frames.append(pd.DataFrame({"item": np.repeat(np.arange(B), L * C), "id": np.repeat(pairs.ids, L * C),
                                    "target_cell": cell, "layer": np.tile(np.repeat(att, C), B),
                                    "cell": np.tile(np.arange(C), B * L), "mass": f.double().flatten().numpy()}))
    return pd.concat(frames, ignore_index=True)


def attribution_items(lvlm: LVLM, pairs: Pairs, ivs, steps: int = 1, method: str = "atp",
                      batch_size: int = 32) -> pd.DataFrame:
    """Attribution patching (:mod:`interp.attribution`) of every default patch, per item: the
    estimated effect ``attribution`` beside ``base_metric`` and ``source_metric`` (denoising)."""
    ps = patching.default_patches(lvlm)
    df = attribution.attribution_patching(lvlm, pairs.corrupt, pairs.clean, ps, pairs.correct, pairs.candidates,
                                          pairs.targets, interventions=ivs, steps=steps, method=method,
                                          grid=pairs.grid, batch_size=batch_size)
    return _with_ids(df, pairs)


def _with_ids(df: pd.DataFrame, pairs: Pairs) -> pd.DataFrame:
    return df.assign(id=[pairs.ids[i] for i in df["item"]])


# aggregates: point value = ratio of item means (as before); interval = percentile bootstrap over items


def restoration_rows(items: pd.DataFrame, rng: np.random.Generator) -> list[dict]:
    """Tidy rows of :func:`activation_items`: ``restoration_{denoise,noise}`` per exactly patched
    (site, group) with its interval, ``screen_estimate_{denoise,noise}`` (same formula) per
    (site, group) that ``--screen`` only estimated (``method`` "screen_estimate"), and
    ``logit_diff_clean`` / ``logit_diff_corrupt``."""
    from interp.screen import ESTIMATE
    rows = []
    estimated = items["method"].eq(ESTIMATE) if "method" in items else pd.Series(False, index=items.index)
    for (direction, site, group, est), g in items.groupby(["direction", "site", "group", estimated], sort=False):
        g = g.sort_values("item")
        if direction == "denoise":
            arrays = {"p": g.metric.to_numpy(), "clean": g.source_metric.to_numpy(), "corrupt": g.base_metric.to_numpy()}
            fn = lambda p, clean, corrupt: (p - corrupt) / (clean - corrupt)  # noqa: E731
        else:
            arrays = {"p": g.metric.to_numpy(), "clean": g.base_metric.to_numpy(), "corrupt": g.source_metric.to_numpy()}
            fn = lambda p, clean, corrupt: (clean - p) / (clean - corrupt)  # noqa: E731
        name = f"{ESTIMATE if est else 'restoration'}_{direction}"
        rows.append({"metric": name, "site": site, "group": group, **_point_ci(arrays, fn, rng)})
    den = items[items.direction == "denoise"].drop_duplicates("item")
    for name, col in (("logit_diff_clean", "source_metric"), ("logit_diff_corrupt", "base_metric")):
        rows.append({"metric": name, **_point_ci({"x": den[col].to_numpy()}, lambda x: x, rng)})
    return rows


MIN_GAP = 0.5
"""A causal ratio (a share of the clean − corrupt gap) is read only when the gap's 95% interval
lies above this many units of answer logit difference (a factor e^0.5 ≈ 1.65 in the odds of the
answer over the best other): below it the ratio divides by noise. Fixed before any run scored it."""
RATIOS = ("restoration_", "screen_estimate_", "position_", "interaction")
"""Metric prefixes of the ratios the gap gates."""


def gap_rows(items: pd.DataFrame, rng: np.random.Generator) -> list[dict]:
    """``gap`` (mean clean − corrupt answer logit difference, with its interval) and ``gap_read``
    (1 when the interval lies above :data:`MIN_GAP`), from the denoising rows of
    :func:`activation_items`."""
    den = items[items.direction == "denoise"].drop_duplicates("item").sort_values("item")
    g = _point_ci({"clean": den.source_metric.to_numpy(), "corrupt": den.base_metric.to_numpy()},
                  lambda clean, corrupt: clean - corrupt, rng)
    read = g["ci_low"] == g["ci_low"] and g["ci_low"] >= MIN_GAP
    return [{"metric": "gap", **g}, {"metric": "gap_read", "value": float(read)}]


def gate(rows: list[dict], gap: list[dict]) -> list[dict]:
    """``rows`` with every ratio blanked (value and interval NaN: "not read") when ``gap`` says the
    clean − corrupt gap is not clearly above :data:`MIN_GAP`; the per-item tables keep the numbers."""
    if next(r["value"] for r in gap if r["metric"] == "gap_read"):
        return rows + gap
    nan = float("nan")
    return [({**r, "value": nan, "ci_low": nan, "ci_high": nan} if r["metric"].startswith(RATIOS) else r)
            for r in rows] + gap


def interaction_rows(act: pd.DataFrame, pos: pd.DataFrame, rng: np.random.Generator) -> list[dict]:
    """``interaction`` = J − P − V as a share of the gap (joint patch minus the position-id patch
    minus the moved patch, each a restoration), per item jointly resampled; none without the
    joint patch or the all-layer position patch."""
    def per_item(group: str) -> np.ndarray:
        return act[(act.group == group) & (act.site == "lm.input")].sort_values("item").metric.to_numpy()
    allp = pos[pos.layers == "all"].sort_values("item")
    joint, moved = per_item("joint"), per_item("moved")
    if not len(joint) or not len(allp) or len(joint) != len(allp):
        return []
    arrays = {"j": joint, "m": moved, "f": allp.fixed.to_numpy(), "clean": allp.clean.to_numpy(),
              "corrupt": allp.corrupt.to_numpy()}
    return [{"metric": "interaction", **_point_ci(
        arrays, lambda j, m, f, clean, corrupt: (j - m - f + corrupt) / (clean - corrupt), rng)}]


def position_rows(items: pd.DataFrame, rng: np.random.Generator) -> list[dict]:
    """``position_restoration`` (corrupt run, clean ids) and ``position_damage`` (clean run, corrupt
    ids) per layer window (``layer`` null = all layers), as shares of the clean − corrupt gap."""
    rows = []
    for layers, g in items.groupby("layers", sort=False):
        layer = None if layers == "all" else int(layers)
        arrays = {k: g.sort_values("item")[k].to_numpy() for k in ("clean", "corrupt", "fixed", "broken")}
        rows.append({"metric": "position_restoration", "layer": layer, **_point_ci(
            arrays, lambda clean, corrupt, fixed, broken: (fixed - corrupt) / (clean - corrupt), rng)})
        rows.append({"metric": "position_damage", "layer": layer, **_point_ci(
            arrays, lambda clean, corrupt, fixed, broken: (clean - broken) / (clean - corrupt), rng)})
    return rows


def knockout_rows(items: pd.DataFrame, rng: np.random.Generator) -> list[dict]:
    """``knockout_drop`` (mean drop of the logit difference) per layer window (null = all layers)
    × what was blocked (``group``)."""
    return [{"metric": "knockout_drop", "layer": None if layers == "all" else int(layers), "group": blocked,
             **_point_ci({"x": g.sort_values("item")["drop"].to_numpy()}, lambda x: x, rng)}
            for (layers, blocked), g in items.groupby(["layers", "blocked"], sort=False)]


def flow_rows(items: pd.DataFrame, rng: np.random.Generator) -> list[dict]:
    """``attention_to_target`` per layer × target cell (``cell``): the last token's attention mass
    on the target's own cell, mean over items; and per layer ``attention_spread``, its max − min
    over the placements (the same items at every placement, resampled jointly)."""
    own = items[items.cell == items.target_cell]
    rows = [{"metric": "attention_to_target", "layer": int(layer), "cell": int(cell),
             **_point_ci({"x": g.sort_values("item").mass.to_numpy()}, lambda x: x, rng)}
            for (layer, cell), g in own.groupby(["layer", "target_cell"], sort=True)]
    for layer, g in own.groupby("layer", sort=True):
        wide = g.pivot_table(index="item", columns="target_cell", values="mass").dropna()
        arrays = {f"c{c}": wide[c].to_numpy() for c in wide.columns}
        spread = lambda **m: np.max(np.stack(list(m.values())), 0) - np.min(np.stack(list(m.values())), 0)  # noqa: E731
        rows.append({"metric": "attention_spread", "layer": int(layer), **_point_ci(arrays, spread, rng)})
    return rows


def _point_ci(arrays: dict[str, np.ndarray], fn, rng: np.random.Generator) -> dict:
    """{value: fn(item means), ci_low, ci_high: its percentile bootstrap 95% interval}."""
    from analyses.metrics import item_bootstrap
    means = {k: float(np.mean(v)) for k, v in arrays.items()}
    with np.errstate(divide="ignore", invalid="ignore"):
        value = float(fn(**means))
    lo, hi = item_bootstrap(arrays, fn, rng)
    return {"value": value, "ci_low": lo, "ci_high": hi}
