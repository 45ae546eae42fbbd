"""Which tokens of a tensor are image patches: which row, image and patch each covers, and which
cell of an n×m grid that patch falls in. Every per-cell analysis reads one of these maps.

The same class maps two kinds of token axes:

* the LM sequence, (B, L): :func:`build` lays each image's views (LLaVA 24×24; LLaVA-NeXT base
  view + unpadded anyres tiles with one newline token per row; Qwen (h/2)×(w/2) merged patches;
  Gemma3 16×16 pooled tokens; InternVL a tile grid held tile by tile, then a thumbnail) over the
  image-token positions of each row in order;
* the flattened token axis of a vision-side site, (T,): :func:`from_fields` takes, per image,
  the (view, row, col, rows, cols) of every token *in the order the site holds them* (each
  adapter's token-order contract, e.g. Qwen2.5-VL's vision-window order), so a cell mask is
  right at any site without a module knowing the architecture.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Sequence

import torch

from spatialbias.errors import SpatialBiasError


@dataclass
class ImageTokenMap:
    """Per token (LongTensors of one shape: (B, L) for the LM sequence, (T,) for a site's
    flattened token axis; −1 where not applicable):

    ``batch_row``: the batch row the token belongs to;
    ``image``: index of the image within its row (0, 1, …), −1 for text;
    ``view``: index of the view within the image (LLaVA-NeXT: 0 base, 1 tiles), −1 for text;
    ``row``/``col``: patch coordinates in that view's grid, −1 for non-patch tokens
    (LLaVA-NeXT newlines, CLS, text); ``rows``/``cols``: the view's grid size.
    """
    image: torch.Tensor
    view: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    batch_row: torch.Tensor

    @property
    def is_image(self) -> torch.Tensor:
        """Bool: image tokens (newline and CLS tokens of an image included)."""
        return self.image >= 0

    @property
    def is_patch(self) -> torch.Tensor:
        """Bool: image tokens that cover a patch (newline and CLS tokens excluded)."""
        return self.row >= 0

    def cells(self, n: int = 3, m: int = 3) -> torch.Tensor:
        """Row-major index of the n×m grid cell holding each patch's centre; −1 elsewhere."""
        rows = self.rows.clamp(min=1)
        cols = self.cols.clamp(min=1)
        r = torch.div((2 * self.row + 1) * n, 2 * rows, rounding_mode="floor")
        c = torch.div((2 * self.col + 1) * m, 2 * cols, rounding_mode="floor")
        return torch.where(self.is_patch, r * m + c, torch.full_like(r, -1))

    def labels(self) -> torch.Tensor:
        """0 for text, image index + 1 for image tokens (what BaPA collapses)."""
        return self.image + 1

    def flat(self) -> "ImageTokenMap":
        """The same map over the flattened token axis (T = B·L for the LM sequence)."""
        return ImageTokenMap(**{f.name: getattr(self, f.name).reshape(-1) for f in fields(self)})

    def raster_order(self) -> torch.Tensor:
        """(n_patches,) indices into the flattened token axis of every patch token, sorted by
        (batch row, image, view, patch row, patch col): image raster order, whatever order the
        site holds its tokens in."""
        f = self.flat()
        idx = f.is_patch.nonzero().flatten()
        if not len(idx):
            return idx
        key = torch.zeros_like(idx)
        for part in (f.batch_row[idx], f.image[idx], f.view[idx], f.row[idx], f.col[idx]):
            key = key * (int(part.max()) + 1) + part  # lexicographic: earlier fields dominate
        return idx[key.argsort(stable=True)]

    def to(self, device) -> "ImageTokenMap":
        return ImageTokenMap(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def image_fields(views) -> torch.Tensor:
    """(n_tokens, 5) long: view, row, col, rows, cols of every token of one image, in LM sequence
    order (views in order, each a raster grid — or tile by tile, each tile in raster order, for a
    view with ``tile`` — optional newline per row, optional trailing tokens)."""
    parts = []
    for vi, v in enumerate(views):
        r = torch.arange(v.rows).repeat_interleave(v.cols + int(v.newline_per_row))
        c = torch.arange(v.cols + int(v.newline_per_row)).repeat(v.rows)
        if getattr(v, "tile", None):  # tiles row-major, each tile's patches in raster order
            th, tw = v.tile
            k = torch.arange(v.rows * v.cols)
            t, j = k // (th * tw), k % (th * tw)
            r = (t // (v.cols // tw)) * th + j // tw
            c = (t % (v.cols // tw)) * tw + j % tw
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
    """The LM-sequence map: lay the images' views (processor order: row by row) over the
    image-token positions.

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
            cache[key] = image_fields(vs)
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
    rows = torch.arange(B, device=image_mask.device)[:, None].expand(B, L)
    return ImageTokenMap(image=out[0], view=out[1], row=out[2], col=out[3], rows=out[4], cols=out[5],
                         batch_row=rows.clone())


def from_fields(per_image: Sequence[torch.Tensor], image_row: Sequence[int], image_in_row: Sequence[int],
                order: torch.Tensor | None = None) -> ImageTokenMap:
    """A site's flattened token map.

    Args:
        per_image: for every image (processor order), (n_i, 5) long fields view, row, col, rows,
            cols of its tokens in processor order (−1 row/col for CLS or padding tokens).
        image_row / image_in_row: each image's batch row and its index within that row.
        order: optional (T,) permutation: the site holds token ``order[k]`` of the concatenated
            processor order at position k (Qwen2.5-VL's window order).
    """
    if not per_image:
        e = torch.empty(0, dtype=torch.long)
        return ImageTokenMap(e, e, e, e, e, e, e)
    f = torch.cat(per_image, 0)
    img = torch.cat([torch.full((len(p),), i) for i, p in zip(image_in_row, per_image)])
    row = torch.cat([torch.full((len(p),), r) for r, p in zip(image_row, per_image)])
    if order is not None:
        f, img, row = f[order], img[order], row[order]
    return ImageTokenMap(image=img, view=f[:, 0], row=f[:, 1], col=f[:, 2], rows=f[:, 3], cols=f[:, 4],
                         batch_row=row)


def keyed_by_place(idx: torch.Tensor, view: torch.Tensor, row: torch.Tensor, col: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``idx`` (k,) token indices of one cell, with their view, row and col (k,), sorted (stably)
    by the key (view, row in cell, col in cell) — each view's coordinates measured from that view's
    top-left patch of the cell — and those keys (k, 3): two cells' tokens of the same view and the
    same place inside their cell get the same key, whatever order a site holds them in."""
    if not len(idx):
        return idx, torch.zeros(0, 3, dtype=torch.long, device=idx.device)
    view, r, c = view.clone(), row.clone(), col.clone()
    for v in view.unique():
        sel = view == v
        r[sel] -= r[sel].min()
        c[sel] -= c[sel].min()
    keys = torch.stack([view, r, c], 1)
    flat = torch.zeros_like(idx)
    for part in keys.T:
        flat = flat * (int(part.max()) + 1) + part  # lexicographic: view, then row, then col
    order = flat.argsort(stable=True)
    return idx[order], keys[order]

