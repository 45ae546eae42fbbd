"""Grid canvases from real images: each sub-image keeps its aspect ratio, is fitted into its
cell and centred on a white canvas (method.md §2: 840×840, 3×3 cells of 280 px).

Layouts of one item with a target and distractors:
* ``replace`` (default): a fixed background of n·m distractors, one per cell; variant k puts the
  target in cell k instead of that cell's distractor. Two variants differ only in two cells.
* ``insert`` (the paper's): n·m − 1 distractors keep their relative order and the target is
  inserted at slot k, so the distractors between two slots shift by one cell.

Beyond the grid: :func:`place` draws sub-images into arbitrary boxes ``(x0, y0, x1, y1)``
(canvas pixels, x1/y1 exclusive); :func:`random_boxes` makes irregular non-overlapping
layouts and :func:`shift_boxes` the positions of a target slid along a row or column.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image

Box = tuple[int, int, int, int]

WHITE = (255, 255, 255)


def fit(im: Image.Image, w: int, h: int) -> Image.Image:
    """``im`` scaled to fit inside w×h with its aspect ratio kept (bicubic)."""
    s = min(w / im.width, h / im.height)
    return im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.BICUBIC)


def cell_box(k: int, grid: tuple[int, int] = (3, 3), size: int = 840) -> Box:
    """Box of row-major cell ``k`` of an n×m grid on a size×size canvas (cells are
    ``size // cols`` × ``size // rows`` px; leftover pixels at the right/bottom stay white)."""
    rows, cols = grid
    cw, ch = size // cols, size // rows
    r, c = divmod(k, cols)
    return (c * cw, r * ch, (c + 1) * cw, (r + 1) * ch)


def place(items: Sequence[tuple[Image.Image | None, Box]], size: int = 840) -> Image.Image:
    """A size×size white canvas with each (image, box) fitted into its box and centred (None = empty)."""
    out = Image.new("RGB", (size, size), WHITE)
    for im, (x0, y0, x1, y1) in items:
        if im is None:
            continue
        f = fit(im, x1 - x0, y1 - y0)
        out.paste(f, (x0 + (x1 - x0 - f.width) // 2, y0 + (y1 - y0 - f.height) // 2))
    return out


def canvas(cells: Sequence[Image.Image | None], grid: tuple[int, int] = (3, 3), size: int = 840) -> Image.Image:
    """A size×size white canvas with ``cells`` (row-major; None = empty) fitted and centred."""
    return place([(im, cell_box(k, grid, size)) for k, im in enumerate(cells)], size)


def random_boxes(rng: np.random.Generator, k: int, size: int = 840, min_frac: float = 0.15,
                 max_frac: float = 0.3, tries: int = 10000) -> list[Box]:
    """``k`` non-overlapping boxes on a size×size canvas, each side between ``min_frac`` and
    ``max_frac`` of ``size`` (rejection sampling; :class:`ValueError` when ``k`` do not fit)."""
    lo, hi = max(1, int(round(min_frac * size))), max(1, int(round(max_frac * size)))
    boxes: list[Box] = []
    for _ in range(tries):
        if len(boxes) == k:
            break
        w, h = (int(v) for v in rng.integers(lo, hi + 1, 2))
        x0, y0 = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
        b = (x0, y0, x0 + w, y0 + h)
        if all(b[2] <= o[0] or o[2] <= b[0] or b[3] <= o[1] or o[3] <= b[1] for o in boxes):
            boxes.append(b)
    if len(boxes) < k:
        raise ValueError(f"could not place {k} non-overlapping boxes of {lo}-{hi} px on a {size} px canvas; "
                         "use fewer boxes")
    return boxes


def shift_boxes(grid: tuple[int, int] = (3, 3), size: int = 840, path: str = "horizontal",
                step: int | None = None) -> tuple[list[Box], list[int]]:
    """Positions of a cell-sized target slid in ``step``-pixel steps along the middle row
    (``horizontal``) or middle column (``vertical``) of the grid, from one edge to the other.

    Returns (boxes, offsets): offset = the box's left (horizontal) or top (vertical) edge in
    pixels. The default step is a quarter cell, so the cell-aligned positions are included.
    """
    rows, cols = grid
    cw, ch = size // cols, size // rows
    if path == "horizontal":
        span, side, y0 = cols * cw - cw, cw, (rows // 2) * ch
    elif path == "vertical":
        span, side, x0 = rows * ch - ch, ch, (cols // 2) * cw
    else:
        raise ValueError(f"unknown path {path!r}; use horizontal or vertical")
    step = max(1, side // 4) if step is None else step
    if step < 1:
        raise ValueError(f"step {step} must be at least 1 px")
    offsets = list(range(0, span + 1, step))
    if offsets[-1] != span:
        offsets.append(span)
    if path == "horizontal":
        return [(o, y0, o + cw, y0 + ch) for o in offsets], offsets
    return [(x0, o, x0 + cw, o + ch) for o in offsets], offsets


def band_cells(grid: tuple[int, int], path: str) -> list[int]:
    """Cells of the row (``horizontal``) or column (``vertical``) a shift target travels through."""
    rows, cols = grid
    if path == "horizontal":
        return [(rows // 2) * cols + c for c in range(cols)]
    return [r * cols + cols // 2 for r in range(rows)]


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
