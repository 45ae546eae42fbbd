"""Grid canvases from real images: each sub-image keeps its aspect ratio, is fitted into its
cell and centred on a white canvas (method.md §2: 840×840, 3×3 cells of 280 px).

Layouts of one item with a target and distractors:
* ``replace`` (default): a fixed background of n·m distractors, one per cell; variant k puts the
  target in cell k instead of that cell's distractor. Two variants differ only in two cells.
* ``insert`` (the paper's): n·m − 1 distractors keep their relative order and the target is
  inserted at slot k, so the distractors between two slots shift by one cell.
"""
from __future__ import annotations

from typing import Sequence

from PIL import Image

WHITE = (255, 255, 255)


def fit(im: Image.Image, w: int, h: int) -> Image.Image:
    """``im`` scaled to fit inside w×h with its aspect ratio kept (bicubic)."""
    s = min(w / im.width, h / im.height)
    return im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.BICUBIC)


def canvas(cells: Sequence[Image.Image | None], grid: tuple[int, int] = (3, 3), size: int = 840) -> Image.Image:
    """A size×size white canvas with ``cells`` (row-major; None = empty) fitted and centred."""
    rows, cols = grid
    cw, ch = size // cols, size // rows
    out = Image.new("RGB", (size, size), WHITE)
    for k, im in enumerate(cells):
        if im is None:
            continue
        r, c = divmod(k, cols)
        f = fit(im, cw, ch)
        out.paste(f, (c * cw + (cw - f.width) // 2, r * ch + (ch - f.height) // 2))
    return out


def variants(target: Image.Image, distractors: Sequence[Image.Image], layout: str = "replace",
             grid: tuple[int, int] = (3, 3), size: int = 840) -> list[Image.Image]:
    """The n·m placements of ``target`` (variant k: target in cell k).

    ``distractors``: n·m images for ``replace``, n·m − 1 for ``insert``.
    """
    n = grid[0] * grid[1]
    if layout == "replace":
        if len(distractors) != n:
            raise ValueError(f"replace layout needs {n} distractors, got {len(distractors)}")
        return [canvas([target if j == k else d for j, d in enumerate(distractors)], grid, size) for k in range(n)]
    if layout == "insert":
        if len(distractors) != n - 1:
            raise ValueError(f"insert layout needs {n - 1} distractors, got {len(distractors)}")
        return [canvas(list(distractors[:k]) + [target] + list(distractors[k:]), grid, size) for k in range(n)]
    raise ValueError(f"unknown layout {layout!r}; use replace or insert")
