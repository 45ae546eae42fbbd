"""The similarity probe's score (method.md §2): does the image side see the target equally well
in every cell? Cosine between the caption's pooled LM input embeddings and the pooled image
tokens the LM receives, per row, kept per position.

* Text side: the caption's tokens (no chat template, no special tokens) through the LM's
  input embedding table (site ``lm.embed``), (T, D).
* Image side: the projector output as the LM receives it: site ``lm.input`` at the image-token
  positions, patch tokens only (:class:`interp.imagemap.ImageTokenMap`), (N, D). For LLaVA-1.5,
  Qwen2-VL/2.5-VL and Gemma3 this is exactly the ``projector`` output; for LLaVA-NeXT it is the
  projector output after unpadding, without the newline tokens.
* Pooling over tokens, each side separately: ``max`` (element-wise; what the authors' code
  does, although its variable names say mean) or ``mean``.
* ``sim_image``: all patch tokens of the image (the authors' score); ``sim_cell``: only the
  tokens whose patch centre lies in the target's cell (or box) — a local score the authors do
  not have. Per-cell means: :func:`similarity_summary`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from analyses.evaluate import probe_batches, row_columns, validate_probe
from analyses.metrics import table_cells, table_grid
from spatialbias.errors import SpatialBiasError
from interp.model import LVLM
from interp.tracing import trace
from probes.format import Probe, ProbeRow, find_probe, grid_positions

POOLINGS = ("max", "mean")


def pool(x: torch.Tensor, how: str) -> torch.Tensor:
    """(T, D) → (D,): element-wise ``max`` or ``mean`` over tokens."""
    if how == "max":
        return x.max(0).values
    if how == "mean":
        return x.mean(0)
    raise SpatialBiasError(f"pooling {how!r} is not known; use max (the paper's) or mean")


def caption_embeddings(lvlm: LVLM, text: str) -> torch.Tensor:
    """(T, D) float: the caption's tokens (no template, no special tokens) through ``lm.embed``."""
    ids = lvlm.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(lvlm.device)
    if ids.shape[1] == 0:
        raise SpatialBiasError(f"caption {text!r} tokenizes to nothing; give the row a non-empty caption")
    with torch.no_grad():
        return lvlm.adapter.module(lvlm.model, "lm.embed")(ids)[0].float()


def target_token_mask(imap, b: int, row: ProbeRow, size: tuple[int, int]) -> torch.Tensor:
    """(L,) bool: patch tokens of batch row ``b`` that cover the row's target — its grid cell
    (``ImageTokenMap.cells``), or for a row with a ``box`` the patches whose centre lies in it.
    ``size``: the image's (width, height) in pixels (the box is in canvas pixels)."""
    patch = imap.is_patch[b]
    if row.position in grid_positions(*row.grid):
        return patch & (imap.cells(*row.grid)[b] == row.cell)
    x0, y0, x1, y1 = row.box
    sx, sy = size[0] / int(row.extra["canvas"]), size[1] / int(row.extra["canvas"])
    rows, cols = imap.rows[b].clamp(min=1).float(), imap.cols[b].clamp(min=1).float()
    cx = (imap.col[b].float() + 0.5) / cols * size[0]
    cy = (imap.row[b].float() + 0.5) / rows * size[1]
    return patch & (cx >= x0 * sx) & (cx < x1 * sx) & (cy >= y0 * sy) & (cy < y1 * sy)


def similarity_scores(lvlm: LVLM, probe_dir: str | Path | Probe, rows: list[ProbeRow] | None = None,
                      poolings: Sequence[str] = POOLINGS, batch_size: int = 16, progress: bool = True) -> pd.DataFrame:
    """Score every row of a (similarity) probe (a folder, a rows file or a Probe).

    Returns one row per (probe row, pooling): ``row``, ``id``, the placement columns of
    :func:`analyses.evaluate.row_columns`, ``answer``, ``pooling``, ``sim_image`` (cosine with
    all patch tokens), ``sim_cell`` (with the target's cell/box tokens; NaN when no patch
    centre falls in it) and ``n_cell_tokens``.
    """
    for p in poolings:
        pool(torch.zeros(1, 1), p)
    probe = find_probe(probe_dir)
    if rows is None:
        rows = validate_probe(probe)
    out = []
    text_cache: dict[str, torch.Tensor] = {}
    for start, batch, images, inputs in tqdm(probe_batches(lvlm, probe, rows, batch_size), desc="similarity",
                                             total=-(-len(rows) // batch_size), disable=not progress):
        hidden = trace(lvlm, inputs, cache=["lm.input"]).cache["lm.input"].float()  # (B, L, D)
        imap = lvlm.image_map(inputs)
        for j, r in enumerate(batch):
            if r.caption is None:
                raise SpatialBiasError(f"{probe.rows_file} row {start + j + 1} (id={r.id}): the similarity score needs a "
                                       "caption; this row has a question")
            if r.caption not in text_cache:
                text_cache[r.caption] = caption_embeddings(lvlm, r.caption)
            txt = text_cache[r.caption]
            every = hidden[j][imap.is_patch[j]]
            mask = target_token_mask(imap, j, r, images[j].size)
            local = hidden[j][mask]
            for how in poolings:
                t = pool(txt, how)
                rec = {"row": start + j, "id": r.id, **row_columns(r), "answer": r.answer, "pooling": how,
                       "sim_image": float(F.cosine_similarity(t, pool(every, how), dim=0)),
                       "sim_cell": float(F.cosine_similarity(t, pool(local, how), dim=0)) if len(local) else np.nan,
                       "n_cell_tokens": int(mask.sum())}
                out.append(rec)
    return pd.DataFrame(out)


def similarity_summary(df: pd.DataFrame) -> dict:
    """Per pooling: per-cell mean ``sim_image`` and ``sim_cell`` over the matching rows
    (answer Yes), their range across cells, and the same means over mismatching rows (answer
    No: the caption of an absent image) when the probe has negatives. Lists have one entry per
    grid cell (NaN for a cell without rows); ``grid`` is [rows, cols]."""
    n_cells = table_cells(df)
    grid = table_grid(df, n_cells) or ((3, 3) if n_cells == 9 else (1, n_cells))
    out = {}
    for how, d in df.groupby("pooling", sort=False):
        block: dict = {"grid": list(grid)}
        for label, part in (("", d[d.answer == "Yes"]), ("_mismatch", d[d.answer == "No"])):
            if part.empty:
                continue
            for key in ("sim_image", "sim_cell"):
                per = part.groupby("cell")[key].mean().reindex(range(n_cells))
                block[f"cell_{key}{label}"] = [float(v) for v in per]
                block[f"mean_{key}{label}"] = float(np.nanmean(per)) if per.notna().any() else float("nan")
                if not label:
                    block[f"range_{key}"] = float(np.nanmax(per) - np.nanmin(per)) if per.notna().any() else float("nan")
        out[str(how)] = block
    return out
