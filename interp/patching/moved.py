"""The vision-side restoration: the target's image tokens moved, position ids kept
(:func:`run_moved`, with :func:`cell_keys` and :func:`moved_slots` pairing the token slots of a
cell in two placements).
"""
from __future__ import annotations

from typing import Sequence

import pandas as pd
import torch

from interp.batch import concat, select_rows
from interp.dispatch import forward, then
from interp.imagemap import keyed_by_place
from interp.interventions import Intervention
from interp.interventions.base import lm_input_edit
from interp.model import LVLM
from interp.patching.core import _copy, injection_edits, logit_diff
from spatialbias.errors import SpatialBiasError


def cell_keys(imap, row: int, cell: int, grid: tuple[int, int] = (3, 3)) -> tuple[torch.Tensor, torch.Tensor]:
    """Row ``row``'s image tokens in ``cell``: ((k,) sequence positions, (k, 3) keys (view,
    row in cell, col in cell)), sorted by key (stably): each view's patch coordinates measured
    from that view's top-left patch of the cell, so two cells' tokens of the same view and
    relative place get the same key whatever the LM's token order."""
    cells = imap.cells(*grid)[row]
    pos = (cells == cell).nonzero().flatten()
    return keyed_by_place(pos, imap.view[row][pos], imap.row[row][pos], imap.col[row][pos])


def moved_slots(imap, src_row: int, dst_row: int, src_cell: int, dst_cell: int,
                grid: tuple[int, int] = (3, 3)) -> tuple[torch.Tensor, torch.Tensor]:
    """((k,) source positions, (k,) destination positions): token ``src[i]`` of ``src_cell`` in row
    ``src_row`` moves onto token ``dst[i]`` of ``dst_cell`` in row ``dst_row``, the one of the same
    view and the same place inside its cell. Refuses (one line) unless the two cells' keys match
    one to one."""
    src, ks = cell_keys(imap, src_row, src_cell, grid)
    dst, kd = cell_keys(imap, dst_row, dst_cell, grid)
    if not len(src) or ks.shape != kd.shape or not torch.equal(ks, kd):
        raise SpatialBiasError(f"cells {src_cell} and {dst_cell} hold {len(src)} and {len(dst)} image tokens of "
                               "different (view, row, col) layouts; moving the target needs cells of one shape in "
                               f"every view (a grid {grid} that divides each view's patch grid evenly)")
    return src, dst


def run_moved(lvlm: LVLM, base: dict[str, torch.Tensor], source: dict[str, torch.Tensor], base_cell: int,
              source_cell: int, correct: torch.Tensor, candidates: Sequence[int],
              interventions: Sequence[Intervention] = (), batch_size: int = 32,
              grid: tuple[int, int] = (3, 3), joint: bool = False) -> pd.DataFrame:
    """The target's image tokens moved between placements at ``lm.input``, position ids kept
    (``joint``: the ids moved with them).

    Row i of ``source`` holds item i's target at ``source_cell`` (the good, clean cell) and row i
    of ``base`` the same item at ``base_cell`` (the bad, corrupt cell). The patched run is the base
    row with its LM input at ``base_cell``'s image-token slots, (k, D), replaced by the source
    row's LM input at ``source_cell``'s slots, each token onto the one of the same view and the
    same place inside its cell (:func:`moved_slots`; refused when the cells' shapes differ): the content as the
    vision tower and projector produced it at the good cell, read by the LM at the bad cell's
    sequence slots and position ids (the base row's prepared inputs, interventions included,
    are otherwise unchanged). What the text model adds to those tokens after LM blocks (the
    adapter's injections: Qwen3-VL's DeepStack features) moves with them, token for token. Each
    forward holds, per item, its source row, its unpatched base row and its patched row; the edit
    copies from the source row of the same forward.

    On an LM with learned absolute positions (GPT-2), whose ``lm.input`` already holds the
    position embeddings, the moved tokens are the source's ``lm.input`` minus the source slots'
    position embeddings plus the base slots' (``lm.positions``, recorded in the same forward),
    so the position ids stay the base row's there too.

    With ``joint``, the patched row also gets the source cell's position ids at the base cell's
    slots (and the base cell's at the source cell's: :class:`~interp.interventions.PositionSwap`
    on that row only): content, its vision-side position code and its LM position ids all come
    from the good placement, and only the sequence slots are the bad one's. What the joint patch
    does not restore is carried by the slots themselves (token order).

    Returns one row per item: ``metric`` (patched), ``base_metric``, ``source_metric`` (answer
    logit differences); denoising restoration is (metric − base) / (source − base).
    """
    base, source = lvlm.batch(base), lvlm.batch(source)
    N = base.rows
    if source["input_ids"].shape != base["input_ids"].shape:
        raise SpatialBiasError("base and source must have the same shape (same prompts)")
    if correct.shape[0] != N:
        raise SpatialBiasError(f"{N} rows but {correct.shape[0]} answers")
    base.need_one_image_per_row("moving the target's image tokens")
    if batch_size < 3:
        raise SpatialBiasError(f"batch_size={batch_size}: the moved patch needs at least 3 rows per forward")
    both = concat(lvlm, base, source)
    per = max(1, batch_size // 3)
    out = []
    for a in range(0, N, per):
        items = list(range(a, min(N, a + per)))
        rows = [r for i in items for r in (N + i, i, i)]  # source, unpatched base, patched base
        chunk, iv_edits = lvlm.prepare(select_rows(lvlm, both, rows), interventions)
        if joint:
            chunk = _swap_patched_ids(lvlm, lvlm.batch(chunk), base_cell, source_cell, grid)
        imap = lvlm.batch(chunk).imap
        dst, src = [], []
        L = chunk["input_ids"].shape[1]
        for k in range(len(items)):
            s, d = moved_slots(imap, 3 * k, 3 * k + 2, source_cell, base_cell, grid)
            src.append(s + 3 * k * L)
            dst.append(d + (3 * k + 2) * L)
        n = len(rows) * chunk["input_ids"].shape[1]
        dst, src = torch.cat(dst), torch.cat(src)
        move = then(_move_edits(lvlm, n, dst, src), injection_edits(lvlm, chunk["input_ids"], [(src, dst, 0)]))
        with torch.no_grad():
            logits = forward(lvlm, chunk, edits=then(iv_edits, move), last_only=True).logits[:, -1]
        corr = torch.cat([correct[i].repeat(3) for i in items]).to(logits.device)
        m = logit_diff(logits, corr, candidates).cpu()
        out += [{"item": i, "metric": float(m[3 * k + 2]), "base_metric": float(m[3 * k + 1]),
                 "source_metric": float(m[3 * k])} for k, i in enumerate(items)]
    return pd.DataFrame(out)


def _swap_patched_ids(lvlm: LVLM, chunk, base_cell: int, source_cell: int, grid: tuple[int, int]):
    """``chunk`` (rows: source, base, patched per item) with the patched rows' position ids those
    of :class:`PositionSwap` (base cell ↔ source cell); the other rows keep theirs."""
    from interp.interventions import PositionSwap
    ids = chunk.get("position_ids")
    ids = (ids if ids is not None else lvlm.default_position_ids(chunk)).clone()
    swapped = PositionSwap(a=base_cell, b=source_cell, grid=grid).swapped_ids(lvlm, chunk)
    patched = torch.arange(2, chunk.rows, 3, device=ids.device)
    ids[..., patched, :] = swapped[..., patched, :]
    return chunk.replace(position_ids=ids)


def _move_edits(lvlm: LVLM, n: int, dst: torch.Tensor, src: torch.Tensor) -> dict:
    """Edits copying tokens ``src`` onto tokens ``dst`` of ``lm.input`` viewed as (n, D); with
    learned absolute positions the source slots' position embeddings are swapped for the
    destination slots' (:func:`interp.interventions.base.lm_input_edit`)."""
    def move(x, pos):
        if pos is None:
            return _copy(x, n, dst, src)
        x = x.clone()
        view, p = x.view(n, -1), pos.reshape(n, -1)
        d, s = dst.to(x.device), src.to(x.device)
        view[d] = view[s] - p[s] + p[d]
        return x
    return lm_input_edit(lvlm, move)
