"""Vision-side position patching: the vision tower's own position code of two grid cells swapped.

Where the LM's position-id patch (:class:`~interp.interventions.PositionSwap`) asks whether the
gap is carried by the RoPE ids the LM gives the image tokens, this asks whether it is carried by
the position code the vision tower adds to its patches (the learned absolute position embeddings
of CLIP and SigLIP), under ordinary LM ids: the direct evidence for "the bias arises in the vision
tower's treatment of position".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from interp.imagemap import keyed_by_place
from interp.interventions.base import Edit, Intervention, register
from spatialbias.errors import SpatialBiasError


@register
@dataclass(frozen=True)
class VisionPositionSwap(Intervention):
    """Every image's patches of cell ``a`` get the vision tower's position embedding of the patch at
    the same place in cell ``b`` (same view, same row and column inside the cell), and vice versa:
    an edit of ``vision.embed`` (patch + position embeddings), ``+ table[b's] − table[a's]``. The
    patch content is untouched. Refused (one line) on a tower without a learned absolute position
    table (Qwen's 2-D rotary positions), and where the two cells' patches do not pair up.

    Run on the corrupt placement with a = the target's cell there and b = its clean cell, the
    target's patches carry the clean cell's vision position code through the whole model."""
    kind: ClassVar[str] = "vision_position_swap"
    a: int = 0
    b: int = 8
    grid: tuple[int, int] = (3, 3)

    def edits(self, lvlm, batch) -> dict[str, Edit]:
        table = lvlm.adapter.vision_position_table(lvlm.model)
        if table is None:
            raise SpatialBiasError(f"{lvlm.adapter.name}: its vision tower has no learned absolute position table "
                                   "(its positions are rotary), so the vision-side position patch cannot act; the "
                                   "diagnosis reports that component as n/a")
        fields, order = lvlm.adapter.vision_fields(lvlm.model, batch, "vision.embed")
        if order is not None:
            raise SpatialBiasError(f"{lvlm.adapter.name}: vision.embed holds its patches out of processor order; the "
                                   "vision-side position patch needs them in order")
        dst, src = self._pairs(fields)
        rows = table.shape[0]

        def swap(x: torch.Tensor) -> torch.Tensor:
            flat = x.reshape(-1, x.shape[-1])
            if flat.shape[0] % rows:
                raise SpatialBiasError(f"vision.embed holds {flat.shape[0]} tokens, not whole images of the "
                                       f"{rows}-row position table (interpolated positions are not supported)")
            t = table.to(x.device, x.dtype)
            out = flat.clone()
            d, s = dst.to(x.device), src.to(x.device)
            out[d] = flat[d] + t[s % rows] - t[d % rows]
            return out.view_as(x)
        return {"vision.embed": swap}

    def pairs_up(self, lvlm, batch) -> bool:
        """Whether the two cells' vision patches pair one to one on ``batch`` (else :meth:`edits`
        refuses)."""
        try:
            self._pairs(lvlm.adapter.vision_fields(lvlm.model, lvlm.batch(batch), "vision.embed")[0])
        except SpatialBiasError:
            return False
        return True

    def decode_edits(self, lvlm, batch, step: int) -> dict[str, Edit]:
        """Nothing: the vision tower runs in the prompt's forward only."""
        return {}

    def _pairs(self, fields: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """((k,), (k,)) flat token indices: token ``dst[i]`` takes the position code of ``src[i]``
        (cell a's tokens from cell b's and cell b's from cell a's, per image and view)."""
        gr, gc = self.grid
        dst, src, start = [], [], 0
        for f in fields:  # (n, 5): view, row, col, rows, cols of one image's tokens
            view, r, c, rows, cols = f.long().T
            patch = r >= 0
            cell = torch.where(patch, (r * gr // rows.clamp(min=1)) * gc + c * gc // cols.clamp(min=1), -1)
            ia = torch.nonzero(cell == self.a).flatten()
            ib = torch.nonzero(cell == self.b).flatten()
            ia, ka = keyed_by_place(ia, view[ia], r[ia], c[ia])
            ib, kb = keyed_by_place(ib, view[ib], r[ib], c[ib])
            if not len(ia) or ka.shape != kb.shape or not torch.equal(ka, kb):
                raise SpatialBiasError(f"cells {self.a} and {self.b} hold {len(ia)} and {len(ib)} vision patches of "
                                       f"different layouts; the vision-side position patch needs cells of one shape "
                                       f"(a grid {self.grid} that divides the patch grid)")
            dst += [ia + start, ib + start]
            src += [ib + start, ia + start]
            start += f.shape[0]
        return torch.cat(dst), torch.cat(src)

