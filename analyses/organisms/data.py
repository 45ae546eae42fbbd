"""Training data of the zoo: grid batches (images + one question kind) and the text-only
recency task that pretrains an LM before it meets images.

All randomness comes from the ``numpy.random.Generator`` passed in, so a seed fixes the data.
"""
from __future__ import annotations

import numpy as np
import torch

from analyses.organisms import build
from probes import shapes

N_CELLS = shapes.GRID * shapes.GRID


def cell_probs(weights: tuple[float, ...]) -> np.ndarray:
    """Target-cell probabilities (9,) from row-major weights."""
    w = np.asarray(weights, float)
    if w.shape != (N_CELLS,) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"cell weights must be 9 non-negative numbers with a positive sum, got {weights}")
    return w / w.sum()


def answer_words(kind: str, colours: np.ndarray, cells: np.ndarray) -> list[str]:
    """The answer word of every sample: its colour (``colour``) or its cell's name (``where``)."""
    if kind == "colour":
        return [shapes.COLOURS[c] for c in colours]
    if kind == "where":
        return [build.CELL_WORDS[k] for k in cells]
    raise ValueError(f"unknown question kind {kind!r}")


def sample_sparse(render: shapes.Renderer, rng: np.random.Generator, n: int, probs: np.ndarray,
                  fill: np.ndarray):
    """Like ``render.sample`` (same returns), but a non-target cell k holds its distractor only
    with probability ``fill[k]`` and is otherwise empty (background and noise only)."""
    shp = rng.integers(0, len(shapes.SHAPES), n)
    col = rng.integers(0, len(shapes.COLOURS), n)
    cells = rng.choice(N_CELLS, n, p=probs)
    imgs = np.empty((n, render.size, render.size, 3), np.uint8)
    s = render.cell_px
    for b in range(n):
        content = [render.random_cell(rng, int(shp[b]), int(col[b])) if k == cells[b]
                   else render.distractor(rng, int(shp[b])) for k in range(N_CELLS)]
        empty = [k for k in range(N_CELLS) if k != cells[b] and rng.random() >= fill[k]]
        noise = render.noise_field(rng)
        img = render.draw(content, noise)
        if empty:
            bg = render.draw([], noise)
            for k in empty:
                r, c = divmod(k, shapes.GRID)
                img[r * s:(r + 1) * s, c * s:(c + 1) * s] = bg[r * s:(r + 1) * s, c * s:(c + 1) * s]
        imgs[b] = img
    return imgs, shp, col, cells


def grid_batch(arch, render: shapes.Renderer, rng: np.random.Generator, n: int, probs: np.ndarray,
               words: tuple[str, ...], kind: str = "colour",
               fill: np.ndarray | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One batch of the grid task: (model inputs, answer token ids (n,)). The target's cell is
    drawn from ``probs``; with ``fill`` (9,) non-target cells are filled with those
    probabilities (:func:`sample_sparse`), else all are (``render.sample``, the rng's only use)."""
    imgs, shp, col, cells = (render.sample(rng, n, probs) if fill is None
                             else sample_sparse(render, rng, n, probs, fill))
    y = torch.tensor([words.index(a) for a in answer_words(kind, col, cells)])
    return arch.inputs(imgs, shp, words, kind), y


def item_token(words: tuple[str, ...], shape: int, colour: int) -> int:
    return words.index(build.ITEM_WORDS[shape * len(shapes.COLOURS) + colour])


def recency_batch(rng: np.random.Generator, n: int, words: tuple[str, ...], n_items: tuple[int, int],
                  skew: float, copies: int, n_fixed: int | None = None, target_fixed: int | None = None):
    """Text task "<bos> item×N what colour is the <shape> ?" with a recency prior.

    Each item is one colour-shape token. The target (an item of the queried shape) sits at
    index t ∈ [0, N) drawn with weight (t + 1)**skew, so later items are targets more often;
    up to ``copies`` earlier items are replaced by the queried shape in other colours, and the
    answer is the colour of the LAST occurrence. Other items have other shapes.

    Returns input_ids (n, L) left padded, attention_mask (n, L), position_ids (n, L) (counting
    from 0 at each row's <bos>, as in the grid task), answer token ids (n,), target index (n,).
    """
    w = {t: i for i, t in enumerate(words)}
    rows, ys, targets = [], [], []
    for _ in range(n):
        N = n_fixed or int(rng.integers(n_items[0], n_items[1] + 1))
        if target_fixed is None:
            p = np.arange(1, N + 1, dtype=float) ** skew
            t = int(rng.choice(N, p=p / p.sum()))
        else:
            t = target_fixed
        s, c = int(rng.integers(len(shapes.SHAPES))), int(rng.integers(len(shapes.COLOURS)))
        items = [item_token(words, int((s + rng.integers(1, len(shapes.SHAPES))) % len(shapes.SHAPES)),
                            int(rng.integers(len(shapes.COLOURS)))) for _ in range(N)]
        items[t] = item_token(words, s, c)
        n_copies = min(int(rng.integers(0, copies + 1)), t) if copies else 0
        for k in (rng.choice(t, n_copies, replace=False) if n_copies else []):
            items[int(k)] = item_token(words, s, int((c + rng.integers(1, len(shapes.COLOURS))) % len(shapes.COLOURS)))
        rows.append([w["<bos>"]] + items + [w[x] for x in build.question_words("colour", s)])
        ys.append(w[shapes.COLOURS[c]])
        targets.append(t)
    L = max(map(len, rows))
    ids = torch.full((n, L), w["<pad>"])
    mask = torch.zeros(n, L, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, L - len(r):] = torch.tensor(r)
        mask[b, L - len(r):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos, torch.tensor(ys), np.array(targets)
