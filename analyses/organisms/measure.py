"""Measure an organism on a held-out shapes probe through the engine (``interp.load`` → ``LVLM.run``).

The probe items are drawn exactly as :func:`probes.build.shapes_probe` draws them (same
renderer, same ``seed`` → same pixels: PNG is lossless), held in memory: ``n_items`` items ×
9 placements in the ``replace`` layout. Only :func:`score_items` touches the engine, so porting
to a changed engine API means editing that one function.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from scipy import stats

import interp
from analyses.metrics import cell_metrics
from analyses.organisms.build import CELL_WORDS, question
from analyses.scoring import AnswerSet
from probes import shapes

N_CELLS = 9


def probe_items(n_items: int, seed: int) -> dict[str, np.ndarray]:
    """``n_items`` × 9 rows, item-major then cell (as shapes_probe writes them): images uint8
    (R, 48, 48, 3), shape (R,), colour (R,), cell (R,), item (R,)."""
    rng = np.random.default_rng(seed)
    render = shapes.Renderer(cell_px=16)
    imgs, shp, col, cell, item = [], [], [], [], []
    for i in range(n_items):
        s, c, variants = render.item(rng)
        imgs += variants
        shp += [s] * len(variants)
        col += [c] * len(variants)
        cell += list(range(len(variants)))
        item += [i] * len(variants)
    return {"images": np.stack(imgs), "shape": np.array(shp), "colour": np.array(col), "cell": np.array(cell),
            "item": np.array(item)}


def score_items(lvlm, images: np.ndarray, questions: Sequence[str], answers: Sequence[str],
                candidates: Sequence[str], conditions: dict[str, list], batch_size: int = 300) -> dict[str, pd.DataFrame]:
    """The engine call: per condition, a table with ``correct`` (argmax over the candidate words'
    first tokens), ``p_correct`` and ``logit_diff`` per row (analyses.scoring.AnswerSet), one row
    per image (R rows). Each batch is prepared once and run under every condition."""
    cands = AnswerSet.build(lvlm, list(candidates), texts=sorted(set(questions)))
    out: dict[str, list] = {name: [] for name in conditions}
    for i in range(0, len(images), batch_size):
        pil = [Image.fromarray(x) for x in images[i:i + batch_size]]
        inputs = lvlm.inputs(pil, [lvlm.prompt(q) for q in questions[i:i + batch_size]])
        for name, ivs in conditions.items():
            with torch.inference_mode():
                logits = lvlm.run(inputs, ivs, last_only=True)[:, -1]
            s = cands.score(logits, list(answers[i:i + batch_size]))
            out[name].append(pd.DataFrame({k: s[k].cpu().numpy() for k in ("correct", "p_correct", "logit_diff")}))
    return {name: pd.concat(parts, ignore_index=True) for name, parts in out.items()}


def trend_test(hits: np.ndarray, n: np.ndarray, scores: np.ndarray | None = None) -> dict:
    """Cochran–Armitage test for a linear trend of a proportion in the cell scores (default
    0..8): ``z`` > 0 when accuracy rises with the score; ``p_one_sided`` for a rise,
    ``p_two_sided``. Counts are treated as independent binomials (items repeated across cells
    make the test conservative for a within-item trend)."""
    hits, n = np.asarray(hits, float), np.asarray(n, float)
    x = np.arange(len(n), dtype=float) if scores is None else np.asarray(scores, float)
    p = hits.sum() / n.sum()
    xbar = (n * x).sum() / n.sum()
    t = (x * (hits - n * p)).sum()
    var = p * (1 - p) * (n * (x - xbar) ** 2).sum()
    if var == 0:
        return {"z": 0.0, "p_one_sided": 0.5, "p_two_sided": 1.0, "slope": 0.0}
    z = t / math.sqrt(var)
    slope = float(np.polyfit(x, hits / n, 1)[0])
    return {"z": float(z), "p_one_sided": float(stats.norm.sf(z)), "p_two_sided": float(2 * stats.norm.sf(abs(z))),
            "slope": slope}


def item_bootstrap(df: pd.DataFrame, n_resamples: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Percentile intervals of the mean accuracy and of the range (max − min over cells),
    resampling ITEMS (each item keeps its 9 placements, so the pairing across cells is kept)."""
    m = df.pivot_table(index="id", columns="cell", values="correct", aggfunc="mean").to_numpy(float)  # items × 9
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(m), (n_resamples, len(m)))
    cells = np.nanmean(m[idx], axis=1)                                                              # R × 9
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    rng_ = cells.max(1) - cells.min(1)
    mean = cells.mean(1)
    return {"range_ci": [float(np.percentile(rng_, lo)), float(np.percentile(rng_, hi))],
            "mean_ci": [float(np.percentile(mean, lo)), float(np.percentile(mean, hi))]}


def summarise(df: pd.DataFrame) -> dict:
    """Per-cell metrics of one condition (``cell``, ``id``, ``correct``, ``p_correct`` columns):
    :func:`analyses.metrics.cell_metrics`, the trend test and item-bootstrap intervals of the mean
    accuracy and the range (:func:`item_bootstrap`), rounded for the record."""
    m = cell_metrics(df, n_cells=N_CELLS)
    hits = df.groupby("cell")["correct"].sum().reindex(range(N_CELLS)).to_numpy()
    n = df.groupby("cell")["correct"].size().reindex(range(N_CELLS)).to_numpy()
    keep = ("mean_accuracy", "mean_p_correct", "range", "std", "chi2", "chi2_p", "consistency")
    out = {k: m[k] for k in keep}
    out.update({k: [round(v, 4) for v in m[k]] for k in ("cell_accuracy", "cell_ci_low", "cell_ci_high")})
    out["trend"] = trend_test(hits, n)
    out.update(item_bootstrap(df))
    return out


@dataclass(frozen=True)
class ReverseImageTokens(interp.Intervention):
    """Locus control: each image's projected tokens enter the LM in reverse order (the content of
    cell k sits in the sequence slot of cell 8 − k, with that slot's position id), edited at the
    projector output. A per-cell profile that mirrors follows the LM's slots (position ids or
    causal order); one that stays put follows the content, i.e. sits before the LM."""
    kind: ClassVar[str] = "reverse_image_tokens"

    def edits(self, lvlm, inputs):
        grid = inputs.get("image_grid_thw")

        def flip(x: torch.Tensor) -> torch.Tensor:
            if x.dim() == 3:  # LLaVA: (n_images, N, D)
                return x.flip(1)
            sizes = (grid.prod(-1) // lvlm.model.config.vision_config.spatial_merge_size ** 2).tolist()
            return torch.cat([part.flip(0) for part in x.split(sizes, 0)], 0)  # Qwen: (T/4, D)
        return {"projector": flip}


def conditions_for(lvlm) -> dict[str, list]:
    """baseline, BaPA (on M-RoPE models both variants), and the token-order control
    (:class:`ReverseImageTokens`) with and without BaPA."""
    conds = {"baseline": [], "bapa": [interp.BaPA()]}
    if lvlm.adapter.rope == "mrope":
        conds["bapa_keep_hw"] = [interp.BaPA(variant="keep_hw")]
    conds["reversed"] = [ReverseImageTokens()]
    conds["bapa_reversed"] = [interp.BaPA(), ReverseImageTokens()]
    return conds


def measure(path: str | Path, n_items: int = 200, seed: int = 12345, kinds: Sequence[str] = ("colour",),
            conditions: dict[str, list] | None = None) -> dict:
    """Load ``path`` with ``interp.load`` and score every question kind under every condition.

    Returns ``{kind: {condition: summary}}`` (:func:`summarise`); ``colour`` asks
    "what colour is the <shape> ?" (5 candidate colours), ``where`` asks "where is the <shape> ?"
    (9 candidate cell words).
    """
    lvlm = interp.load(str(path))
    conditions = conditions or conditions_for(lvlm)
    items = probe_items(n_items, seed)
    out = {}
    for kind in kinds:
        qs = [question(kind, int(s)) for s in items["shape"]]
        if kind == "colour":
            answers, cands = [shapes.COLOURS[c] for c in items["colour"]], shapes.COLOURS
        else:
            answers, cands = [CELL_WORDS[k] for k in items["cell"]], CELL_WORDS
        scored = score_items(lvlm, items["images"], qs, answers, cands, conditions)
        out[kind] = {name: summarise(df.assign(cell=items["cell"], id=items["item"])) for name, df in scored.items()}
    return out
