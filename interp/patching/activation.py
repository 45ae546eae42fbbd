"""Activation patching: :func:`run_patches`, every patch on every item, by the resumed scheme
(:mod:`.resumed`) where it is exact, else by full forwards (:mod:`.full`). Base / source rows,
denoising and noising: :mod:`interp.patching`.
"""
from __future__ import annotations

from typing import Sequence

import pandas as pd
import torch

from interp.batch import concat
from interp.interventions import Intervention
from interp.model import LVLM
from interp.patching.core import Patch, _check_site
from interp.patching.full import _full_patches
from interp.patching.resumed import _not_resumable, _resumed_patches
from spatialbias.errors import SpatialBiasError


def run_patches(lvlm: LVLM, base: dict[str, torch.Tensor], source: dict[str, torch.Tensor], patches: Sequence[Patch],
                correct: torch.Tensor, candidates: Sequence[int], targets: Sequence[Sequence[int]],
                interventions: Sequence[Intervention] = (), batch_size: int = 32,
                progress: bool = False, grid: tuple[int, int] = (3, 3), resume: bool | None = None) -> pd.DataFrame:
    """Metric (answer logit difference) of every patch on every item.

    Args:
        base, source: inputs with N rows (row i of both: item i in two placements, same prompt;
            any number of images per row, the same in both).
        patches: the (site, group) patches. LM sites take every group; vision-side sites
            (vision blocks, ``vision.out``, the projector) take ``all``, ``image`` and ``target``,
            whose cells are read from the site's own token order (:meth:`LVLM.token_map`).
        correct: (N,) correct answer token per item; candidates: the answer token ids.
        targets: per item, the target's cells (both placements), row-major on ``grid``; the
            ``target`` group needs one image per row.
        interventions: applied to every row (so patching runs on the BaPA/AGCI graph too).
        batch_size: rows per forward (the unpatched runs of ⌊batch_size/2⌋ items, or resumed rows).
        resume: how residual-stream patches (``lm.input``, ``lm.blocks.{i}``) and patches before
            the LM (vision blocks, projector) run. True: resumed (:func:`_resumed_patches`: one
            unpatched run per item records every block's input; a patch at block ℓ then runs blocks
            ℓ+1… only, over the positions from its first patched one on); False: one full forward
            per patch row (the reference scheme); None (default): resumed, unless the model or an
            intervention cannot be resumed exactly (checked per chunk: a resumed unpatched row must
            give the run's own logits), then full.
    Returns:
        one row per (item, patch) with ``metric``, plus ``base_metric`` and ``source_metric``
        (the unpatched rows); ``df.attrs["engine"]`` says which scheme ran ("resumed" or "full").
    """
    base, source = lvlm.batch(base), lvlm.batch(source)
    N = base.rows
    if source["input_ids"].shape != base["input_ids"].shape or source.images_per_row != base.images_per_row:
        raise SpatialBiasError("base and source must have the same shape and images per row (same prompts)")
    if len(targets) != N or correct.shape[0] != N:
        raise SpatialBiasError(f"{N} rows but {len(targets)} target lists and {correct.shape[0]} answers")
    for p in patches:
        _check_site(lvlm, p.site)
    if any(p.group == "target" and p.position is None for p in patches):
        base.need_one_image_per_row("the 'target' token group")
    if batch_size < 3:
        raise SpatialBiasError(f"batch_size={batch_size}: patching needs at least 3 rows per forward (source, base, "
                               "one patched row)")
    both = concat(lvlm, base, source)
    job = (lvlm, both, N, patches, correct, candidates, targets, interventions, batch_size, progress, grid)
    why = None if resume is False else _not_resumable(lvlm, patches, interventions, both)
    if resume is True and why:
        raise SpatialBiasError(f"resume=True: {why}; use resume=None (falls back to full forwards) or False")
    out = _resumed_patches(*job, strict=resume is True) if why is None and resume is not False else None
    engine = "resumed"
    if out is None:
        out, engine = _full_patches(*job), "full"
    df = pd.DataFrame(out)
    df.attrs["engine"] = engine
    return df
