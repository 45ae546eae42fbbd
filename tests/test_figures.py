"""Every figure is readable at the size the report shows it.

The report (``analyses.report``) embeds each figure's PNG, saved at 130 dpi, in a page whose body
is at most 1150 CSS px wide: a PNG pixel is one CSS px, and a wider PNG is shrunk by the browser.
So a text of ``s`` pt shows at ``s × 130/72 × min(1, 1150 / png_width) × 3/4`` pt, which must be
≥ 9 pt for every text of every figure (titles, tick labels, numbers inside cells, legends, colour
bars). Each public figure function is drawn at the largest realistic panel counts (9 conditions,
2 models, a 4×4 grid, a 32-layer model: 24 vision blocks, 32 LM blocks) and measured after
:func:`analyses.figures.save`. Also: compared heatmap panels share one colour scale and have a
colour bar; accuracy and p(correct) scales are anchored at 0–1; every report figure has a caption.
"""
from __future__ import annotations

import hashlib
import html
import json
import re
import warnings

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_report import INTERVENTIONS, NASTY, VERSIONS, _rows, synthetic_results, write_sweep

from analyses import figures, report, store
from analyses.figures.common import MIN_DISPLAY_PT, PAGE_WIDTH_PX, displayed_pt

FUNCTIONS = sorted(set(figures.__all__) - {"save", "select", "conditions_table"})
N_VISION, N_LM = 24, 32  # a LLaVA-1.5-7B-sized model: CLIP ViT-L (24 blocks), a 32-block LM
CAUSAL = INTERVENTIONS[:2] + INTERVENTIONS[4:5]  # baseline, bapa, agci:0.5


# ------------------------------------------------------------------------------------------------
# realistic inputs at their largest


def _row(model, probe, iv, analysis, seed, **kw):
    label, family, lam, _ = iv
    config = json.dumps({"model": model, "probe": probe, "iv": label, "analysis": analysis, "seed": seed},
                        sort_keys=True)
    r = dict(condition_id=hashlib.sha1(config.encode()).hexdigest()[:12], model=model, probe=probe,
             intervention=label, family=family, analysis=analysis, seed=seed, config=config, versions=VERSIONS,
             details=None, model_fingerprint="f" * 16, cell=None, layer=None, site=None, group=None,
             ci_low=np.nan, ci_high=np.nan)
    r["lambda"] = lam
    r.update(kw)
    return r


def _typed(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    for col in ("cell", "layer"):
        df[col] = df[col].astype("Int64")
    df["seed"] = df["seed"].astype("int64")
    for col in ("lambda", "value", "ci_low", "ci_high"):
        df[col] = df[col].astype(float)
    return df[store.COLUMNS]


def big_results() -> pd.DataFrame:
    """Two seeds of: a 4×4 probe under all 9 conditions (eval), and a 32-layer model's causal rows
    (activation patching over 24 vision blocks, the projector, the LM input and 32 LM blocks;
    position-id patching and knockout per layer; attention flow on the 4×4 grid at 8 layers) under
    3 conditions, and a 4×4 similarity map."""
    rng = np.random.default_rng(1)
    m, p = "llava-1.5-7b-hf", "shapes 4×4"
    rows = []
    for seed in (0, 1):
        for iv in INTERVENTIONS:
            rows += _rows(m, p, iv, "eval", seed, (4, 4), rng)
        for iv in CAUSAL:
            sites = ([f"vision.blocks.{i}" for i in range(N_VISION)] + ["projector"])
            for direction in ("denoise", "noise"):
                for site in sites:
                    rows.append(_row(m, p, iv, "patching", seed, metric=f"restoration_{direction}", site=site,
                                     group="all", value=rng.uniform(0.9, 1.05)))
                for site in ["lm.input"] + [f"lm.blocks.{i}" for i in range(N_LM)]:
                    for g in ("target", "image", "text", "last"):
                        rows.append(_row(m, p, iv, "patching", seed, metric=f"restoration_{direction}", site=site,
                                         group=g, value=rng.uniform(-0.6, 1.6)))
            rows.append(_row(m, p, iv, "patching", seed, metric="position_restoration", value=rng.uniform(0, 1)))
            for layer in range(N_LM):
                rows.append(_row(m, p, iv, "patching", seed, metric="position_restoration", layer=layer,
                                 value=rng.uniform(-0.1, 0.4)))
            for metric, v in (("logit_diff_clean", 3.4), ("logit_diff_corrupt", -1.7), ("clean_cell", 15),
                              ("corrupt_cell", 0)):
                rows.append(_row(m, p, iv, "patching", seed, metric=metric, value=v))
            for layer in list(range(N_LM)) + [None]:
                for blocked in ("target cell", "distractor cell", "all image tokens"):
                    v = rng.uniform(-0.5, 6)
                    rows.append(_row(m, p, iv, "knockout", seed, metric="knockout_drop", layer=layer, group=blocked,
                                     value=v, ci_low=v - 0.6, ci_high=v + 0.6))
            for layer in range(0, N_LM, 4):
                for c in range(16):
                    rows.append(_row(m, p, iv, "flow", seed, metric="attention_to_target", layer=layer, cell=c,
                                     value=rng.uniform(0.01, 0.2)))
        for c in range(16):
            for pooling in ("max", "mean"):
                rows.append(_row(m, p, INTERVENTIONS[0], "similarity", seed, metric="cell_sim_image", cell=c,
                                 group=pooling, value=0.19 + rng.normal(0, 0.01)))
    df = _typed(rows)
    return pd.concat([df, _typed([_row(m, p, INTERVENTIONS[0], "eval", 0, metric=k, value=4)
                                  for k in ("grid_rows", "grid_cols")])], ignore_index=True)


def lens_results(n_layers: int = N_LM, n_cells: int = 16) -> pd.DataFrame:
    """Logit-lens rows of a 32-block LM on a 4×4 grid, 3 conditions: margin per site × cell, spreads."""
    rng = np.random.default_rng(5)
    rows = []
    m, p = "llava-1.5-7b-hf", "shapes 4×4"
    for iv in CAUSAL:
        for site in ["lm.input"] + [f"lm.blocks.{i}" for i in range(n_layers)]:
            layer = None if site == "lm.input" else int(site.rsplit(".", 1)[1])
            for metric in ("lens_margin", "lens_cell_margin"):
                for c in range(n_cells):
                    v = rng.normal(0.1 * (layer or 0), 1)
                    rows.append(_row(m, p, iv, "lens", 0, metric=metric, site=site, layer=layer, cell=c, value=v,
                                     ci_low=v - 0.5, ci_high=v + 0.5))
            for metric in ("lens_spread", "lens_cell_spread"):
                v = rng.uniform(0, 3)
                rows.append(_row(m, p, iv, "lens", 0, metric=metric, site=site, layer=layer, value=v,
                                 ci_low=v - 0.6, ci_high=v + 0.6))
    return _typed(rows)


def cellprobe_results() -> pd.DataFrame:
    """Cell-probe rows of a LLaVA-1.5-7B-sized model (24 vision blocks, projector, lm.input, 32 LM
    blocks), 3 conditions; with :func:`big_results` the patching restorations at the same sites."""
    rng = np.random.default_rng(6)
    rows = []
    m, p = "llava-1.5-7b-hf", "shapes 4×4"
    sites = ([f"vision.blocks.{i}" for i in range(N_VISION)] + ["projector", "lm.input"]
             + [f"lm.blocks.{i}" for i in range(N_LM)])
    for iv in CAUSAL:
        for site in sites:
            layer = int(site.rsplit(".", 1)[1]) if "blocks" in site else None
            for metric, v in (("cellprobe_accuracy", rng.uniform(0.3, 1)), ("cellprobe_control", rng.uniform(0, 0.2)),
                              ("cellprobe_selectivity", rng.uniform(0, 0.8))):
                rows.append(_row(m, p, iv, "cellprobe", 0, metric=metric, site=site, layer=layer, value=v,
                                 ci_low=max(0, v - 0.1), ci_high=min(1, v + 0.1)))
        rows.append(_row(m, p, iv, "cellprobe", 0, metric="cellprobe_chance", value=1 / 16))
    return _typed(rows)


def heads_results(n_layers: int = N_LM, n_heads: int = 32, top: int = 8) -> pd.DataFrame:
    """Heads rows of a 32-layer, 32-head LM, 3 conditions: every head's estimate, the top 8 measured."""
    rng = np.random.default_rng(7)
    rows = []
    m, p = "llava-1.5-7b-hf", "shapes 4×4"
    for iv in CAUSAL:
        est = rng.exponential(0.02, (n_layers, n_heads))
        for layer in range(n_layers):
            for h in range(n_heads):
                v = est[layer, h]
                rows.append(_row(m, p, iv, "heads", 0, metric="head_share_estimate", layer=layer, group=f"head {h}",
                                 value=v, ci_low=v - 0.01, ci_high=v + 0.01))
        for k, i in enumerate(np.argsort(-est.reshape(-1))[:top]):
            key = {"layer": int(i // n_heads), "group": f"head {int(i % n_heads)}"}
            rows.append(_row(m, p, iv, "heads", 0, metric="head_rank", value=float(k + 1), **key))
            for metric in ("head_restoration", "head_path_restoration"):
                v = rng.uniform(0, 0.3)
                rows.append(_row(m, p, iv, "heads", 0, metric=metric, value=v, ci_low=v - 0.1, ci_high=v + 0.1, **key))
        for k in range(1, top + 1):
            for metric in ("head_cumulative_estimate", "head_cumulative_restoration", "head_knockout_removed"):
                v = min(1, 0.12 * k + rng.uniform(0, 0.05))
                rows.append(_row(m, p, iv, "heads", 0, metric=metric, group=f"top {k}", value=v, ci_low=v - 0.1,
                                 ci_high=v + 0.1))
        rows.append(_row(m, p, iv, "heads", 0, metric="gap", value=2.0, ci_low=1.5, ci_high=2.5))
    return _typed(rows)


def pairs_results(n_pairs: int = 3) -> pd.DataFrame:
    """Pairs rows, 3 conditions: the best cell against ``n_pairs`` others (36: every pair of 9
    cells), P absent under BaPA, one pair not read."""
    import itertools
    rng = np.random.default_rng(8)
    rows = []
    m, p = "llava-1.5-7b-hf", "shapes"
    pairs = list(itertools.combinations(range(9), 2))[:n_pairs] if n_pairs > 8 else [(4, c) for c in range(n_pairs)]
    for iv in CAUSAL:
        for k, (a, b) in enumerate(pairs):
            key = {"cell": b, "group": f"{a}→{b}"}
            g = rng.uniform(0.2, 3)
            rows.append(_row(m, p, iv, "pairs", 0, metric="pair_gap", value=g, ci_low=g - 0.4, ci_high=g + 0.4, **key))
            for metric in ("pair_position_restoration", "pair_moved", "pair_joint", "pair_vision_position"):
                if metric == "pair_position_restoration" and iv[1] == "bapa":
                    continue
                v = np.nan if k == 1 else rng.uniform(-0.1, 1.1)
                rows.append(_row(m, p, iv, "pairs", 0, metric=metric, value=v, ci_low=v - 0.15, ci_high=v + 0.15,
                                 **key))
    return _typed(rows)


def _detail_base(iv, model="llava-1.5-7b-hf", probe="shapes 4×4", seed=0) -> dict:
    label, family, lam, _ = iv
    return {"model": model, "probe": probe, "intervention": label, "family": family, "lambda": lam, "seed": seed}


def flow_details(n_layers: int = N_LM, n_cells: int = 16) -> pd.DataFrame:
    """Flow detail rows (one item, every placement) of a 32-layer model on a 4×4 grid, 3 conditions."""
    rng = np.random.default_rng(2)
    frames = []
    for iv in CAUSAL:
        t, layer, cell = np.meshgrid(range(n_cells), range(n_layers), range(n_cells), indexing="ij")
        frames.append(pd.DataFrame({"item": 0, "target_cell": t.ravel(), "layer": layer.ravel(), "cell": cell.ravel(),
                                    "mass": rng.uniform(0, 0.12, t.size), **_detail_base(iv)}))
    return pd.concat(frames, ignore_index=True)


def shift_details() -> pd.DataFrame:
    """Eval detail rows of a shift probe: 9 conditions × 9 offsets × 6 items."""
    rng = np.random.default_rng(3)
    rows = []
    for iv in INTERVENTIONS:
        for off in range(0, 90, 10):
            for item in range(6):
                p = float(np.clip(0.7 - off / 400 + rng.normal(0, 0.1), 0, 1))
                rows.append({"row": len(rows), "offset": off, "cell": off // 30, "correct": p > 0.5, "p_correct": p,
                             "logit_diff": 4 * p - 2, **_detail_base(iv, probe="shift")})
    return pd.DataFrame(rows)


def occlusion_details(grid=(4, 4), steps: int = 8) -> pd.DataFrame:
    """Occlusion rows: one image per target cell of a 4×4 grid, an 8 × 8 sweep of the square."""
    rng = np.random.default_rng(4)
    rows = []
    n = grid[0] * grid[1]
    for cell in range(n):
        for oy in range(steps):
            for ox in range(steps):
                rows.append({"row": cell, "cell": cell, "grid": f"{grid[0]}x{grid[1]}", "n_cells": n, "oy": oy,
                             "ox": ox, "abs_delta": rng.uniform(0, 1), "condition": "baseline",
                             **_detail_base(INTERVENTIONS[0])})
    return pd.DataFrame(rows)


def zoo_table():
    """A zoo table (analyses/organisms/zoo_table.py) of 10 organisms × 3 seeds, restorations spread
    over and beyond the axes."""
    rng = np.random.default_rng(0)
    names = ["planted-lm", "uniform", "planted-order", "planted-vision", "learned-absolute", "mrope", "where",
             "recency", "lora", "lora-bapa"]
    rows = []
    for o in names:
        for s in range(3):
            p, v = rng.uniform(-0.6, 1.6, 2)
            rows.append({"organism": o, "seed": s, "position": p, "position_lo": p - 0.2, "position_hi": p + 0.2,
                         "vision": v, "vision_lo": v - 0.3, "vision_hi": v + 0.3,
                         "diagnosis": "no significant spatial bias" if o in ("uniform", "where") else "mixed / undetermined",
                         "matches": "yes" if s else "no"})
    return pd.DataFrame(rows)


def graph_results(interventions=CAUSAL) -> pd.DataFrame:
    """Patching rows with the diagnosis' components under each of ``interventions`` (default
    baseline, BaPA and AGCI): a read gap with shares, BaPA's gap not read (NaN shares), AGCI
    without the vision position patch."""
    rows = []
    m, p = NASTY, "shapes"
    for iv in interventions:
        read = iv[1] != "bapa"
        v = (lambda x: x) if read else (lambda x: np.nan)
        rows.append(_row(m, p, iv, "patching", 0, metric="gap", value=2.0 if read else 0.1, ci_low=1.5 if read else
                         -0.2, ci_high=2.5 if read else 0.4))
        rows.append(_row(m, p, iv, "patching", 0, metric="position_restoration", value=v(0.46), ci_low=v(0.4),
                         ci_high=v(0.5)))
        for site, group, x in (("lm.input", "moved", 0.43), ("lm.input", "joint", 0.95),
                               ("vision.embed", "vision_position", 0.3)):
            if iv[1] == "agci" and group == "vision_position":
                continue
            rows.append(_row(m, p, iv, "patching", 0, metric="restoration_denoise", site=site, group=group,
                             value=v(x), ci_low=v(x - 0.1), ci_high=v(x + 0.1)))
    return pd.DataFrame(rows)


CASES = {  # function → [(case id, table, kwargs)], the largest realistic panel counts
    "pair_components": [("3 conditions, 3 pairs", "pairs", {}), ("3 conditions, all 36 pairs", "pairs-36", {})],
    "head_shares": [("3 conditions × 32 layers × 32 heads", "heads", {}),
                    ("2 layers × 4 heads (annotated)", "heads-small", {})],
    "causal_graph": [("3 conditions, long model label", "graph", {}),
                     ("9 conditions (a sweep's), long model label", "graph-9", {})],
    "cell_heatmaps": [("9 conditions, 3×3, 2 seeds", "synthetic", {"model": "organism", "probe": "shapes"}),
                      ("9 conditions, 4×4, 2 seeds", "big", {}),
                      ("p(correct), 9 conditions, 4×4", "big", {"metric": "p_correct"}),
                      ("2×4 grid", "synthetic", {"model": "organism", "probe": "wide 2×4"}),
                      ("long model label", "synthetic", {"model": NASTY})],
    "range_vs_accuracy": [("2 models, 2 probes", "synthetic", {}), ("one panel, 9 conditions", "big", {})],
    "lambda_curves": [("2 models, 2 probes", "synthetic", {}), ("4×4 probe", "big", {})],
    "similarity_maps": [("4×4", "big", {})],
    "restoration_heatmaps": [("32-layer model, denoise", "big", {}),
                             ("32-layer model, noise", "big", {"direction": "noise"}),
                             ("synthetic", "synthetic", {"model": "organism", "probe": "shapes"})],
    "position_restoration": [("32-layer model", "big", {}),
                             ("synthetic", "synthetic", {"model": "organism", "probe": "shapes"})],
    "knockout_drops": [("32-layer model", "big", {})],
    "attention_to_target": [("3 conditions × 8 layers, 4×4", "big", {}),
                            ("synthetic", "synthetic", {"model": "organism", "probe": "shapes"})],
    "layer_cell": [("32 layers × 16 cells", "flow", {}), ("2 layers × 9 cells", "flow-small", {})],
    "shift_curves": [("9 conditions", "shift", {})],
    "occlusion_maps": [("4×4", "occlusion", {}), ("3×3", "occlusion-3x3", {})],
    "zoo_diagnosis": [("10 organisms × 3 seeds", "zoo", {})],
    "lens_margins": [("3 conditions × 33 depths × 16 cells", "lens", {}),
                     ("image tokens", "lens", {"metric": "lens_cell_margin"})],
    "cellprobe_accuracy": [("3 conditions × 58 sites, with patching", "cellprobe", {}),
                           ("without patching", "cellprobe-only", {})],
}
HEATMAPS = {"cell_heatmaps", "similarity_maps", "restoration_heatmaps", "attention_to_target", "layer_cell",
            "occlusion_maps"}
UNIT_SCALED = {"cell_heatmaps"}  # heatmaps of an accuracy or a probability: colour scale 0–1


@pytest.fixture(scope="module")
def tables():
    big = big_results()
    return {"synthetic": synthetic_results(), "big": big, "flow": flow_details(),
            "flow-small": flow_details(n_layers=2, n_cells=9), "shift": shift_details(),
            "occlusion": occlusion_details(), "occlusion-3x3": occlusion_details((3, 3)), "zoo": zoo_table(),
            "lens": lens_results(), "cellprobe": pd.concat([big, cellprobe_results()], ignore_index=True),
            "cellprobe-only": cellprobe_results(), "graph": graph_results(), "heads": heads_results(),
            "pairs": pairs_results(), "pairs-36": pairs_results(36),
            "heads-small": heads_results(n_layers=2, n_heads=4),
            "graph-9": graph_results(INTERVENTIONS)}


def test_every_figure_function_has_cases():
    assert set(CASES) == set(FUNCTIONS)


def _texts(fig):
    """Every text the figure draws: visible and non-empty, on a visible axes; tick labels only of
    the ticks drawn (inside the view limits, on an axes whose axis is on); axis labels only when
    the axis is on. Titles, cell numbers, legends, colour-bar labels and ticks included."""
    hidden, drawn = set(), set()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                hidden |= {id(tick.label1), id(tick.label2)}
            if ax.axison and ax.get_visible():
                drawn |= {id(lab) for tick in axis._update_ticks() for lab in (tick.label1, tick.label2)}
            else:
                hidden |= {id(axis.label), id(axis.get_offset_text())}
    out = []
    for t in fig.findobj(matplotlib.text.Text):
        if not t.get_text().strip() or not t.get_visible() or (t.axes is not None and not t.axes.get_visible()):
            continue
        if id(t) in hidden and id(t) not in drawn:
            continue
        out.append(t)
    return out


def _heat_panels(fig):
    """(axes, norm) of every heatmap panel: a mesh or an image outside a colour-bar axis."""
    out = []
    for ax in fig.axes:
        if hasattr(ax, "_colorbar") or not ax.get_visible() or not ax.axison and not ax.images:
            continue
        for art in list(ax.collections) + list(ax.images):
            if isinstance(art, (matplotlib.collections.QuadMesh, matplotlib.image.AxesImage)):
                out.append((ax, art.norm))
    return out


CASE_IDS = [(f, c) for f in FUNCTIONS for c in range(len(CASES[f]))]
MEASURED: dict[str, float] = {}


@pytest.mark.parametrize("function,case", CASE_IDS, ids=[f"{f}-{CASES[f][c][0]}" for f, c in CASE_IDS])
def test_text_is_readable_at_display_size(tables, tmp_path, function, case):
    """Every text is ≥ 9 pt as the report shows the PNG; shared colour scales with a colour bar;
    accuracy / p(correct) anchored at 0–1."""
    name, table, kwargs = CASES[function][case]
    with warnings.catch_warnings(record=True) as caught:  # e.g. "Tight layout not applied"
        warnings.simplefilter("always")
        fig = getattr(figures, function)(tables[table], **kwargs)
        png, _svg = figures.save(fig, tmp_path, "f")
    layout = [str(w.message) for w in caught if "layout" in str(w.message).lower()]
    assert not layout, f"{function} ({name}): the layout failed: {layout}"
    with Image.open(png) as im:
        width = im.size[0]
    texts = _texts(fig)
    assert texts, "no text found"
    sizes = {t.get_text(): displayed_pt(t.get_fontsize(), width) for t in texts}
    small = {k: round(v, 2) for k, v in sizes.items() if v < MIN_DISPLAY_PT}
    assert not small, (f"{function} ({name}): PNG {width} px wide (shown at {min(width, PAGE_WIDTH_PX)} px); "
                       f"texts under {MIN_DISPLAY_PT} pt displayed: {small}")
    MEASURED[f"{function} ({name})"] = min(sizes.values())
    print(f"\n{function} ({name}): {width} px wide, smallest text {min(sizes.values()):.2f} pt displayed")
    if function in HEATMAPS:
        panels = _heat_panels(fig)
        assert panels
        limits = {(round(n.vmin, 9), round(n.vmax, 9)) for _, n in panels}
        assert len(limits) == 1, f"{function}: panels on different colour scales {limits}"
        assert sum(hasattr(ax, "_colorbar") for ax in fig.axes) == 1, f"{function}: needs one colour bar"
        if function in UNIT_SCALED:
            assert limits == {(0.0, 1.0)}, f"{function}: accuracy / p(correct) scale {limits}, not 0–1"
    plt.close(fig)


def test_accuracy_axes_are_anchored(tables, tmp_path):
    """Line and scatter figures of accuracy: the accuracy axis spans 0–1 whatever the data."""
    df = tables["synthetic"]
    fig = figures.range_vs_accuracy(df, model="organism", probe="shapes")
    assert fig.axes[0].get_xlim() == (0.0, 1.0) and fig.axes[0].get_ylim()[0] == 0
    plt.close(fig)
    fig = figures.lambda_curves(df)
    assert all(row[0].get_ylim() == (0.0, 1.0) for row in np.array(fig.axes).reshape(-1, 2))
    plt.close(fig)
    fig = figures.shift_curves(tables["shift"], key="p_correct")
    lo, hi = fig.axes[0].get_ylim()
    assert lo <= 0 and hi >= 1
    plt.close(fig)


def test_a_noisy_probability_is_not_stretched(tables):
    """The defect seen: p(correct) between 0.50060 and 0.50070 drawn as vivid contrast."""
    df = tables["synthetic"]
    d = df[(df.model == "organism") & (df.probe == "shapes")].copy()
    sel = d.metric == "p_correct"
    d.loc[sel, "value"] = 0.5006 + 0.0001 * np.linspace(0, 1, sel.sum())
    fig = figures.cell_heatmaps(d, metric="p_correct")
    assert {(n.vmin, n.vmax) for _, n in _heat_panels(fig)} == {(0.0, 1.0)}
    plt.close(fig)


def test_rule_catches_small_text(tables, tmp_path):
    """The measurement fails a figure with a 5.5 pt annotation (the old patching maps) and one
    drawn too wide (the old 2,100 px heatmaps shrunk to 1150)."""
    fig = figures.cell_heatmaps(tables["synthetic"], model="organism", probe="shapes")
    fig.axes[0].texts[0].set_fontsize(5.5)
    png, _ = figures.save(fig, tmp_path, "small")
    width = Image.open(png).size[0]
    assert min(displayed_pt(t.get_fontsize(), width) for t in _texts(fig)) < MIN_DISPLAY_PT
    fig = figures.cell_heatmaps(tables["synthetic"], model="organism", probe="shapes")
    fig.set_size_inches(16, 6)
    png, _ = figures.save(fig, tmp_path, "wide")
    width = Image.open(png).size[0]
    assert width > PAGE_WIDTH_PX
    assert min(displayed_pt(t.get_fontsize(), width) for t in _texts(fig)) < MIN_DISPLAY_PT
    assert displayed_pt(7, 1150) == pytest.approx(7 * 130 / 72 * 0.75) and displayed_pt(7, 2300) < 5


def test_style_is_scoped():
    """The figure functions do not change matplotlib's global settings."""
    before = dict(matplotlib.rcParams)
    fig = figures.cell_heatmaps(synthetic_results(only_eval=True, seeds=(0,)), model="organism", probe="shapes")
    plt.close(fig)
    assert dict(matplotlib.rcParams) == before


def test_every_planned_figure_has_a_caption(tables):
    """plan_figures gives every figure a caption (what to read from it), one source: the first
    paragraph of the figure function's docstring."""
    df = pd.concat([tables["synthetic"], tables["big"], tables["lens"], tables["cellprobe-only"], tables["graph"],
                    tables["heads"], tables["pairs"]], ignore_index=True)
    tabs = {"flow": tables["flow"], "eval": tables["shift"], "occlusion": tables["occlusion"]}
    specs, _ = report.plan_figures(df, tabs)
    # zoo_diagnosis is drawn by `spatialbias zoo` from its zoo table, not planned by the report
    assert {s.function for s in specs} == set(FUNCTIONS) - {"zoo_diagnosis"}
    for s in specs:
        assert s.caption == figures.caption(s.function), s.function
        assert len(s.caption) > 40 and s.caption.endswith(".") and "\n" not in s.caption, (s.function, s.caption)
        assert s.caption.count(". ") + 1 <= 3, s.caption  # one or two sentences (three at most)


def test_report_prints_each_caption_before_its_call(tmp_path):
    df = synthetic_results(seeds=(0,))
    d = write_sweep(tmp_path / "run", df[df.probe == "shapes"])
    page = report.build(d).read_text(encoding="utf-8")
    specs, _ = report.plan_figures(pd.read_parquet(d / "results.parquet"), {})
    found = re.findall(r"<figure id='fig-([^']*)'>.*?<figcaption><b>.*?</b> — <span class='caption'>(.*?)</span>"
                       r"<br>Redraw: <code>(.*?)</code>", page)
    assert [f[0] for f in found] == [html.escape(s.stem) for s in specs]
    for (_, cap, call), s in zip(found, specs):
        assert html.unescape(cap) == s.caption and cap.strip()
        assert html.unescape(call) == s.command(d.resolve())
    for s in specs:  # shown unshrunk: every figure fits the page
        assert Image.open(d / "figures" / f"{s.stem}.png").size[0] <= PAGE_WIDTH_PX, s.stem
