"""Which sequence positions are image tokens, which image and patch each covers, and which
cell of an n×m grid that patch falls in. Every per-cell analysis reads this map.

Built from the adapter's per-image views (LLaVA 24×24; LLaVA-NeXT base view + unpadded anyres
tiles with one newline token per row; Qwen (h/2)×(w/2) merged patches; Gemma3 16×16 pooled
tokens) laid over the image-token positions of each row in order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from interp.errors import SpatialBiasError


@dataclass
class ImageTokenMap:
    """Per position (all (B, L) LongTensors; −1 where not applicable):

    ``image``: index of the image within its row (0, 1, …), −1 for text;
    ``view``: index of the view within the image (LLaVA-NeXT: 0 base, 1 tiles), −1 for text;
    ``row``/``col``: patch coordinates in that view's grid, −1 for non-patch image tokens
    (LLaVA-NeXT newlines) and text; ``rows``/``cols``: the view's grid size.
    """
    image: torch.Tensor
    view: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor

    @property
    def is_image(self) -> torch.Tensor:
        """(B, L) bool: image tokens, newline tokens included."""
        return self.image >= 0

    @property
    def is_patch(self) -> torch.Tensor:
        """(B, L) bool: image tokens that cover a patch (newline tokens excluded)."""
        return self.row >= 0

    def cells(self, n: int = 3, m: int = 3) -> torch.Tensor:
        """(B, L) row-major index of the n×m grid cell holding each patch's centre; −1 elsewhere."""
        rows = self.rows.clamp(min=1)
        cols = self.cols.clamp(min=1)
        r = torch.div((2 * self.row + 1) * n, 2 * rows, rounding_mode="floor")
        c = torch.div((2 * self.col + 1) * m, 2 * cols, rounding_mode="floor")
        return torch.where(self.is_patch, r * m + c, torch.full_like(r, -1))

    def labels(self) -> torch.Tensor:
        """(B, L): 0 for text, image index + 1 for image tokens (what BaPA collapses)."""
        return self.image + 1


def _image_fields(views) -> torch.Tensor:
    """(n_tokens, 5) long: view, row, col, rows, cols of every token of one image, in sequence order."""
    parts = []
    for vi, v in enumerate(views):
        r = torch.arange(v.rows).repeat_interleave(v.cols + int(v.newline_per_row))
        c = torch.arange(v.cols + int(v.newline_per_row)).repeat(v.rows)
        if v.newline_per_row:
            nl = c == v.cols
            r, c = r.masked_fill(nl, -1), c.masked_fill(nl, -1)
        if v.trailing:
            r = torch.cat([r, torch.full((v.trailing,), -1)])
            c = torch.cat([c, torch.full((v.trailing,), -1)])
        n = len(r)
        parts.append(torch.stack([torch.full((n,), vi), r, c, torch.full((n,), v.rows), torch.full((n,), v.cols)], 1))
    return torch.cat(parts, 0) if parts else torch.empty(0, 5, dtype=torch.long)


def build(image_mask: torch.Tensor, views: list[list[Any]]) -> ImageTokenMap:
    """Lay the images' views (processor order: row by row) over the image-token positions.

    Args:
        image_mask: (B, L) bool, True at image-placeholder tokens.
        views: per image, its list of :class:`interp.adapters.View` in sequence order.
    """
    B, L = image_mask.shape
    out = torch.full((6, B, L), -1, dtype=torch.long)
    cache: dict = {}
    per_image = []
    for vs in views:
        key = tuple(vs)
        if key not in cache:
            cache[key] = _image_fields(vs)
        per_image.append(cache[key])
    it = iter(per_image)
    mask = image_mask.cpu()
    for b in range(B):
        pos = mask[b].nonzero().flatten()
        k, img = 0, 0
        while k < len(pos):
            f = next(it, None)
            if f is None or k + len(f) > len(pos):
                raise SpatialBiasError(f"row {b}: {len(pos)} image tokens do not match the images' token counts; "
                                       "were the inputs made by this model's processor?")
            p = pos[k:k + len(f)]
            out[0, b, p] = img
            out[1:, b, p] = f.T
            k += len(f)
            img += 1
    if next(it, None) is not None:
        raise SpatialBiasError("more images than image-token runs in the prompts; each image needs its marker")
    out = out.to(image_mask.device)
    return ImageTokenMap(image=out[0], view=out[1], row=out[2], col=out[3], rows=out[4], cols=out[5])
