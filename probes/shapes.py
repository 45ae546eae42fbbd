"""Synthetic shapes: the model organism's task and its grid probe source.

A canvas of 3×3 cells, each holding one coloured shape. The question
"what colour is the <shape> ?" names a shape that occurs in exactly one cell (the target);
the answer is its colour word (chance 1/5). Images are uint8 RGB arrays (H, W, 3) with
Gaussian pixel noise, clipped and quantised exactly as a PNG stores them, so what the model
sees in training is what it sees from a probe file.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow", "white")
RGB = np.array([[230, 40, 40], [40, 200, 40], [50, 80, 240], [230, 220, 40], [235, 235, 235]],
               np.float32) / 255.0
GRID = 3
NOISE_SIGMA = 0.03
JITTER = 1


def question(shape: str) -> str:
    return f"what colour is the {shape} ?"


def shape_masks(size: int) -> np.ndarray:
    """Binary masks for every shape in a ``size``×``size`` box; float32 (len(SHAPES), size, size)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    c, r = size / 2.0, 0.38 * size
    top, bot = c - r, c + r
    w = max(1, int(round(0.1 * size)))
    masks = {
        "circle": (yy - c) ** 2 + (xx - c) ** 2 <= r ** 2,
        "square": (np.abs(yy - c) <= 0.32 * size) & (np.abs(xx - c) <= 0.32 * size),
        "triangle": (yy >= top) & (yy <= bot) & (np.abs(xx - c) <= (yy - top) / (bot - top) * r),
        "cross": ((np.abs(yy - c) <= w) & (np.abs(xx - c) <= r)) | ((np.abs(xx - c) <= w) & (np.abs(yy - c) <= r)),
    }
    return np.stack([masks[s] for s in SHAPES]).astype(np.float32)


@dataclass(frozen=True)
class Cell:
    """One cell's content: shape and colour indices and the (dy, dx) jitter in pixels."""
    shape: int
    colour: int
    dy: int = 0
    dx: int = 0


class Renderer:
    """Draws 3×3 canvases of ``cell_px``-pixel cells (the organism uses 16 → 48×48 images)."""

    def __init__(self, cell_px: int = 16, jitter: int = JITTER, noise: float = NOISE_SIGMA):
        if cell_px < 4 + 2 * jitter:
            raise ValueError(f"cell_px={cell_px} is too small for jitter {jitter}")
        self.cell_px, self.jitter, self.noise = cell_px, jitter, noise
        self.masks = shape_masks(cell_px - 2 * jitter)

    @property
    def size(self) -> int:
        return GRID * self.cell_px

    def draw(self, cells: list[Cell], noise: np.ndarray | None) -> np.ndarray:
        """Canvas for 9 row-major cells; ``noise`` (H, W, 3) float or None. Returns uint8 (H, W, 3)."""
        s, m = self.cell_px, self.masks.shape[-1]
        x = np.zeros((self.size, self.size, 3), np.float32)
        for k, c in enumerate(cells):
            r, col = divmod(k, GRID)
            y0, x0 = r * s + self.jitter + c.dy, col * s + self.jitter + c.dx
            x[y0:y0 + m, x0:x0 + m] += self.masks[c.shape][..., None] * RGB[c.colour]
        if noise is not None:
            x += noise
        return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)

    def random_cell(self, rng: np.random.Generator, shape: int, colour: int | None = None) -> Cell:
        j = self.jitter
        col = int(rng.integers(0, len(COLOURS))) if colour is None else colour
        dy, dx = (rng.integers(-j, j + 1, 2) if j else (0, 0))
        return Cell(shape, col, int(dy), int(dx))

    def distractor(self, rng: np.random.Generator, target_shape: int) -> Cell:
        """A cell with any shape but the target's, in a random colour."""
        return self.random_cell(rng, int((target_shape + rng.integers(1, len(SHAPES))) % len(SHAPES)))

    def noise_field(self, rng: np.random.Generator) -> np.ndarray:
        return rng.normal(0.0, self.noise, (self.size, self.size, 3)).astype(np.float32)

    def sample(self, rng: np.random.Generator, n: int, cell_probs: np.ndarray | None = None):
        """Training samples: target cell drawn from ``cell_probs`` (uniform if None).

        Returns (images uint8 (n, H, W, 3), target shape (n,), target colour (n,), cell (n,)).
        """
        shapes = rng.integers(0, len(SHAPES), n)
        colours = rng.integers(0, len(COLOURS), n)
        cells = rng.choice(GRID * GRID, n, p=cell_probs)
        imgs = np.empty((n, self.size, self.size, 3), np.uint8)
        for b in range(n):
            content = [self.random_cell(rng, int(shapes[b]), int(colours[b])) if k == cells[b]
                       else self.distractor(rng, int(shapes[b])) for k in range(GRID * GRID)]
            imgs[b] = self.draw(content, self.noise_field(rng))
        return imgs, shapes, colours, cells

    def item(self, rng: np.random.Generator) -> tuple[int, int, list[np.ndarray]]:
        """One probe item in the ``replace`` layout: a fixed background of 9 distractors and one
        noise field; variant k replaces cell k's distractor by the target. Any two variants
        differ only inside the two cells involved.

        Returns (target shape, target colour, 9 uint8 images, variant k at index k).
        """
        shape, colour = int(rng.integers(0, len(SHAPES))), int(rng.integers(0, len(COLOURS)))
        target = self.random_cell(rng, shape, colour)
        background = [self.distractor(rng, shape) for _ in range(GRID * GRID)]
        noise = self.noise_field(rng)
        variants = []
        for k in range(GRID * GRID):
            cells = list(background)
            cells[k] = target
            variants.append(self.draw(cells, noise))
        return shape, colour, variants
