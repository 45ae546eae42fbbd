"""BaPA — Balanced Position Assignment (method.md §4): every image token gets the position id of
its image's first token, text after the image continues at +1. Only the ids fed to the rotary
embedding change; mask, cache slots and token order do not."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from spatialbias.errors import SpatialBiasError
from interp.interventions.base import Intervention, register


def bapa_position_ids(input_ids: torch.Tensor, image_mask: torch.Tensor,
                      attention_mask: torch.Tensor | None = None) -> torch.LongTensor:
    """BaPA position ids, per row.

    Args:
        input_ids: (B, L) token ids (only the shape is used).
        image_mask: (B, L) bool, True at image tokens; or integer labels (0 = text,
            k ≥ 1 = image k) to separate images that touch.
        attention_mask: (B, L) 0/1; left padding is handled per row. None = all ones.

    Returns:
        (B, L) LongTensor. Real tokens count from 0 at the row's first real token; each image
        collapses to one slot (all its tokens share the id of its first token ``s``) and the
        next token gets ``s + 1``. Padding positions get 1 (HF's convention in ``generate``).
        A row without image tokens gets the ordinary ``0, 1, 2, …`` ids.
    """
    if input_ids.dim() != 2 or image_mask.shape != input_ids.shape:
        raise SpatialBiasError(f"bapa_position_ids: input_ids {tuple(input_ids.shape)} and image_mask "
                               f"{tuple(image_mask.shape)} must both be (B, L)")
    labels = image_mask.long() if image_mask.dtype == torch.bool else image_mask.long()
    real = torch.ones_like(labels, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    prev = F.pad(labels, (1, 0))[:, :-1]
    starts_image = (labels > 0) & (labels != prev)
    step = real & ((labels == 0) | starts_image)
    pos = step.long().cumsum(-1) - 1
    return pos.masked_fill(~real, 1)


BAPA_VARIANTS = ("reference", "keep_hw")


@dataclass(frozen=True)
class BaPA(Intervention):
    """All image tokens share one position id; text continues from it + 1 (method.md §4).

    Each image collapses separately; rows are computed from the attention mask (left
    padding); the mask is always passed with the new ids. On M-RoPE models (Qwen2-VL,
    Qwen2.5-VL) ``variant="reference"`` (the authors') writes the 1-D scheme into all three
    rows, so image tokens lose their (row, col) rotary structure; ``variant="keep_hw"`` keeps
    it: an image token at patch (r, c) gets (t, h, w) = (s, s + r, s + c), text after the image
    still continues at s + 1 on every row. 1-D models have only the reference variant.
    """
    kind: ClassVar[str] = "bapa"
    variant: str = "reference"

    def __post_init__(self):
        if self.variant not in BAPA_VARIANTS:
            raise SpatialBiasError(f"BaPA variant {self.variant!r} is unknown; use one of {', '.join(BAPA_VARIANTS)}")

    def position_ids(self, lvlm, batch) -> torch.Tensor:
        """(B, L) ids, or (3, B, L) on M-RoPE models."""
        batch = lvlm.batch(batch)
        imap = batch.imap
        pos = bapa_position_ids(batch["input_ids"], imap.labels(), batch["attention_mask"])
        if lvlm.adapter.rope_kind(lvlm.model) != "mrope":
            if self.variant != "reference":
                raise SpatialBiasError(f"BaPA variant {self.variant!r} needs M-RoPE (Qwen2-VL, Qwen2.5-VL); "
                                       f"{lvlm.adapter.name} uses 1-D RoPE: use BaPA()")
            return pos
        pos = pos.unsqueeze(0).repeat(3, 1, 1)
        if self.variant == "keep_hw":
            pos[1] += imap.row.clamp(min=0)
            pos[2] += imap.col.clamp(min=0)
        return pos

    def prepare(self, lvlm, batch):
        batch = lvlm.batch(batch)
        return batch.replace(position_ids=self.position_ids(lvlm, batch))


register(BaPA)
