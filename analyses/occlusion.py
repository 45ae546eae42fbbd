"""The occlusion probe (method.md §2, with the authors' defects fixed): which regions of the
canvas does the answer depend on, for each placement of the target?

For every probe row a white square is slid over a ``steps``×``steps`` grid of offsets; each
occluded image is scored like the row itself and the change of the answer logit difference
(correct answer's logit minus the best other candidate's, read from the logits, not from
post-processed generation scores) is kept per offset. Aggregates: the mean absolute change per
region (the grid cell holding the square's centre), per target position
(:func:`region_table`), and maps per image (:func:`image_map`) and per target position
(:func:`position_maps`: normalised per image, then summed, as the authors do; or averaged).
Nothing is overwritten per position: every image and every condition keeps its own rows.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from analyses.evaluate import Conditions, load_image, open_probe, row_columns
from analyses.scoring import prompt_text
from spatialbias.errors import SpatialBiasError
from interp.model import LVLM
from probes.format import Probe, ProbeRow, cell_of_point

WHITE = (255, 255, 255)


def offsets(side: int, square: int, steps: int) -> list[int]:
    """``steps`` top-left coordinates from 0 to ``side − square``, evenly spread (for the
    paper's 840 px canvas, 42 px square and 20 steps: 0, 42, …, 798 — a tiling)."""
    if steps < 1 or square < 1 or square > side:
        raise SpatialBiasError(f"occlusion square {square} px with {steps} steps does not fit a {side} px image; "
                               "use 1 <= square <= image side and steps >= 1")
    if steps == 1:
        return [(side - square) // 2]
    return [int(round(i * (side - square) / (steps - 1))) for i in range(steps)]


def occluded(image: Image.Image, x0: int, y0: int, square: int) -> Image.Image:
    """A copy of ``image`` with a white ``square``×``square`` box at (x0, y0)."""
    im = image.copy()
    im.paste(WHITE, (x0, y0, x0 + square, y0 + square))
    return im


def occlusion_scores(lvlm: LVLM, probe_dir: str | Path | Probe, conditions: Conditions | None = None,
                     rows: list[ProbeRow] | None = None, steps: int = 20, square: int | None = None,
                     batch_size: int = 32, progress: bool = True) -> pd.DataFrame:
    """Slide the occluder over every row's image under every condition (default: baseline);
    ``probe_dir``: a probe folder, a rows file or a Probe.

    ``square`` defaults to image width / ``steps`` (42 px on the paper's 840 px canvas with 20
    steps). Returns one row per (probe row, condition, offset): ``row``, ``id``, the
    placement columns of :func:`analyses.evaluate.row_columns`, ``answer``, ``condition``,
    ``oy``, ``ox`` (offset indices), ``sx``, ``sy`` (the square's top-left pixel), ``square``,
    ``region`` (cell of the row's grid holding the square's centre), ``base_logit_diff``,
    ``logit_diff`` (occluded), ``delta`` (occluded − base) and ``abs_delta``.
    Cost: steps² + 1 forwards per row and condition.
    """
    conditions = {"baseline": []} if conditions is None else conditions
    probe, rows, cands = open_probe(lvlm, probe_dir, rows)
    out = []
    bar = tqdm(total=len(rows) * len(conditions), desc="occlusion", unit="row", disable=not progress)
    for i, r in enumerate(rows):
        img = load_image(probe, r, f"{probe.rows_file} row {i + 1} (id={r.id})")
        w, h = img.size
        sq = square or max(1, w // steps)
        xs, ys = offsets(w, sq, steps), offsets(h, sq, steps)
        grid = [(a, b) for a in range(len(ys)) for b in range(len(xs))]
        variants = [img] + [occluded(img, xs[b], ys[a], sq) for a, b in grid]
        prompt = lvlm.prompt(prompt_text(r))
        canvas = int(r.extra.get("canvas", w))
        for name, ivs in conditions.items():
            diffs = []
            for s in range(0, len(variants), batch_size):
                chunk = variants[s:s + batch_size]
                inputs = lvlm.inputs(chunk, [prompt] * len(chunk))
                with torch.inference_mode():
                    logits = lvlm.run(inputs, ivs, last_only=True)[:, -1]
                diffs.append(cands.score(logits, [r.answer] * len(chunk))["logit_diff"].float().cpu())
            ld = torch.cat(diffs).numpy()
            base = float(ld[0])
            cols = row_columns(r)
            for (a, b), v in zip(grid, ld[1:]):
                cx, cy = (xs[b] + sq / 2) * canvas / w, (ys[a] + sq / 2) * canvas / h
                out.append({"row": i, "id": r.id, **cols, "answer": r.answer, "condition": name, "oy": a, "ox": b,
                            "sx": xs[b], "sy": ys[a], "square": sq, "region": cell_of_point(cx, cy, canvas, r.grid),
                            "base_logit_diff": base, "logit_diff": float(v), "delta": float(v) - base,
                            "abs_delta": abs(float(v) - base)})
            bar.update(1)
    bar.close()
    return pd.DataFrame(out)


def region_table(df: pd.DataFrame) -> pd.DataFrame:
    """Mean absolute change of the answer logit difference per (condition, target cell,
    region): columns ``condition``, ``cell``, ``region``, ``mean_abs_delta``, ``n``."""
    g = df.groupby(["condition", "cell", "region"])["abs_delta"]
    return g.agg(mean_abs_delta="mean", n="size").reset_index()


def image_map(df: pd.DataFrame, row: int, condition: str = "baseline") -> np.ndarray:
    """(steps_y, steps_x) absolute change for one probe row under one condition."""
    d = df[(df["row"] == row) & (df["condition"] == condition)]
    if d.empty:
        raise SpatialBiasError(f"no occlusion rows for row {row} under {condition!r}")
    return d.pivot_table(index="oy", columns="ox", values="abs_delta").to_numpy()


def position_maps(df: pd.DataFrame, condition: str = "baseline", normalise: bool = True,
                  reduce: str = "sum") -> dict[int, np.ndarray]:
    """Target cell → (steps_y, steps_x) map over that cell's images: each image's map divided
    by its maximum when ``normalise`` (the authors' per-image normalisation; an all-zero map
    stays zero), then ``sum`` (the authors') or ``mean`` over images."""
    if reduce not in ("sum", "mean"):
        raise SpatialBiasError(f"reduce={reduce!r}: use sum or mean")
    d = df[df["condition"] == condition]
    out: dict[int, list[np.ndarray]] = {}
    for (row, cell), g in d.groupby(["row", "cell"], sort=True):
        m = g.pivot_table(index="oy", columns="ox", values="abs_delta").to_numpy()
        if normalise and m.max() > 0:
            m = m / m.max()
        out.setdefault(int(cell), []).append(m)
    return {c: (np.sum(ms, 0) if reduce == "sum" else np.mean(ms, 0)) for c, ms in sorted(out.items())}


def region_matrix(df: pd.DataFrame, condition: str = "baseline", cells: Sequence[int] | None = None) -> np.ndarray:
    """(n_cells target positions, n_cells regions) mean absolute change; NaN where absent."""
    t = region_table(df[df["condition"] == condition])
    n = int(df["n_cells"].iloc[0]) if "n_cells" in df.columns else 9
    cells = list(range(n)) if cells is None else list(cells)
    piv = t.pivot_table(index="cell", columns="region", values="mean_abs_delta").reindex(index=cells,
                                                                                       columns=range(n))
    return piv.to_numpy()
