"""Attention flow to grid cells.

Flow: the softmaxed attention of every LM layer (the ``lm.blocks.{i}.attn.pattern`` sites, which
switch the run to an eager kernel; SDPA never materialises them), per layer and head, summed over
the image tokens of each grid cell, for chosen query rows (``last`` token or the ``text`` after the
image), averaged over those rows; reduced inside each layer's forward. Attention knockout is an
intervention: :class:`interp.interventions.Knockout`.
"""
from __future__ import annotations

from typing import Sequence

import torch

from interp.dispatch import attention_implementation, forward
from interp.interventions import Intervention
from interp.interventions.knockout import query_rows
from interp.model import LVLM


def eager_attention(model: torch.nn.Module):
    """Context manager: the LM on HF's eager attention for one block of code, then back."""
    return attention_implementation(model, "eager")


def cell_flow(lvlm: LVLM, inputs: dict[str, torch.Tensor], interventions: Sequence[Intervention] = (),
              query: str = "last", grid: tuple[int, int] = (3, 3), batch_size: int | None = None) -> torch.Tensor:
    """Attention mass from the query rows to each cell's image tokens.

    Returns (B, layers, heads, n·m) float: per row, layer and head, the attention weight the
    query rows put on the image tokens of each cell (summed over the cell's tokens, averaged
    over query rows). Summing over cells gives the mass on the whole image. A layer without
    attention (a hybrid LM's recurrent layer, outside :meth:`~interp.adapters.Adapter.attention_layers`)
    is NaN: it has no pattern.

    Memory is bounded by one layer of ``batch_size`` rows (default: all rows in one forward): each
    layer's pattern (``lm.blocks.{i}.attn.pattern``, (B, H, L, L)) is reduced inside that layer's
    forward — its query rows first, so no float copy of the whole map is made — and dropped.
    """
    batch = lvlm.batch(inputs)
    step = batch.rows if batch_size is None else max(1, batch_size)
    if step < batch.rows:
        from interp.batch import select_rows
        return torch.cat([cell_flow(lvlm, select_rows(lvlm, batch, range(a, min(batch.rows, a + step))), interventions,
                                    query, grid) for a in range(0, batch.rows, step)], 0)
    batch, _ = lvlm.prepare(inputs, interventions)
    cells = batch.imap.cells(*grid)  # (B, L)
    q = query_rows(lvlm, batch, query).float()
    w = q / q.sum(-1, keepdim=True).clamp(min=1)  # (B, Lq) query weights
    used = w.abs().sum(0).nonzero().flatten()  # query positions any row reads
    w = w[:, used]
    onehot = torch.stack([(cells == c) for c in range(grid[0] * grid[1])], -1).float()  # (B, Lk, n)

    def to_cells(att: torch.Tensor) -> torch.Tensor:  # (B, H, Lq, Lk) → (B, H, n)
        rows = att.index_select(2, used.to(att.device)).float()  # (B, H, q, Lk): only the query rows
        return torch.einsum("bhqk,bq,bkc->bhc", rows, w.to(att.device), onehot.to(att.device))

    n = lvlm.adapter.layer_count(lvlm.model, "lm")
    att = lvlm.adapter.attention_layers(lvlm.model)
    sites = {i: f"lm.blocks.{i}.attn.pattern" for i in att}
    t = forward(lvlm, inputs, interventions, cache=list(sites.values()),
                reduce={s: to_cells for s in sites.values()}, last_only=True)
    first = t.cache[sites[att[0]]]
    return torch.stack([t.cache[sites[i]] if i in sites else torch.full_like(first, float("nan")) for i in range(n)], 1)
