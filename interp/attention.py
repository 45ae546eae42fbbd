"""Attention flow to grid cells and attention knockout.

Flow: eager attention weights (switched on for the run only; SDPA never materialises them),
per layer and head, summed over the image tokens of each grid cell, for chosen query rows
(``last`` token or the ``text`` after the image), averaged over those rows.
Knockout: an intervention that blocks attention from the query rows to one or more cells'
image tokens in a window of layers, by editing a clone of the mask each layer receives (bool
masks: False; additive float masks: the dtype's minimum). Gemma3's bidirectional image mask
and sliding windows are left as they are elsewhere.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar, Iterator, Sequence

import torch

from interp.errors import SpatialBiasError
from interp.interventions import Intervention, register
from interp.model import LVLM

QUERIES = ("last", "text")


@contextmanager
def eager_attention(model: torch.nn.Module) -> Iterator[None]:
    """Switch the model to eager attention for one block of code, then back."""
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def query_rows(lvlm: LVLM, inputs: dict[str, torch.Tensor], query: str) -> torch.Tensor:
    """(B, L) bool: the query positions (``last`` token, or ``text`` after the last image token)."""
    if query not in QUERIES:
        raise SpatialBiasError(f"query {query!r}: use one of {', '.join(QUERIES)}")
    ids = inputs["input_ids"]
    q = torch.zeros_like(ids, dtype=torch.bool)
    if query == "last":
        q[:, -1] = True
        return q
    img = lvlm.image_mask(ids)
    mask = inputs.get("attention_mask", torch.ones_like(ids)).bool()
    for b in range(ids.shape[0]):
        pos = img[b].nonzero().flatten()
        if len(pos):
            q[b, int(pos[-1]) + 1:] = True
    return q & mask


def cell_flow(lvlm: LVLM, inputs: dict[str, torch.Tensor], interventions: Sequence[Intervention] = (),
              query: str = "last", grid: tuple[int, int] = (3, 3)) -> torch.Tensor:
    """Attention mass from the query rows to each cell's image tokens.

    Returns (B, layers, heads, n·m) float: per row, layer and head, the attention weight the
    query rows put on the image tokens of each cell (summed over the cell's tokens, averaged
    over query rows). Summing over cells gives the mass on the whole image.
    """
    prepared, edits = lvlm.prepare(inputs, interventions)
    from interp.hooks import edit_sites
    with eager_attention(lvlm.model), edit_sites(lvlm.model, lvlm.adapter, edits), torch.no_grad():
        out = lvlm.model(**prepared, use_cache=False, output_attentions=True)
    att = torch.stack([a.float() for a in out.attentions], 1)  # (B, layers, heads, L, L)
    cells = lvlm.image_map(prepared).cells(*grid)  # (B, L)
    q = query_rows(lvlm, prepared, query)
    n = grid[0] * grid[1]
    onehot = torch.stack([(cells == c) for c in range(n)], -1).float()  # (B, L, n)
    per_key = torch.einsum("bhlqk,bkc->bhlqc", att.transpose(1, 2), onehot).transpose(1, 2)  # (B, layers, heads, L, n)
    w = q.float() / q.float().sum(-1, keepdim=True).clamp(min=1)
    return torch.einsum("blhqc,bq->blhc", per_key, w)


@register
@dataclass(frozen=True)
class Knockout(Intervention):
    """Block attention from the ``query`` rows to the image tokens of ``cells`` in layers
    ``layers`` = (start, stop); ``cells=None`` blocks every image token (patches and newline
    tokens). Works with eager and SDPA masks."""
    kind: ClassVar[str] = "knockout"
    cells: tuple[int, ...] | None = None
    layers: tuple[int, int] | None = None
    query: str = "last"
    grid: tuple[int, int] = (3, 3)

    def edits(self, lvlm, inputs):
        imap = lvlm.image_map(inputs)
        if self.cells is None:
            keys = imap.is_image
        else:
            cells = imap.cells(*self.grid)
            keys = torch.zeros_like(imap.is_image)
            for c in self.cells:
                keys |= cells == c
        q = query_rows(lvlm, inputs, self.query)
        block = q[:, :, None] & keys[:, None, :]  # (B, Lq, Lk)
        n = lvlm.adapter.layer_count(lvlm.model, "lm")
        start, stop = self.layers or (0, n)
        L = inputs["input_ids"].shape[1]

        def edit(mask):
            if mask is None:  # SDPA with no padding passes no mask: causal only
                mask = torch.ones(L, L, dtype=torch.bool, device=block.device).tril()[None, None]
                mask = mask.expand(block.shape[0], 1, L, L)
            mask = mask.clone()
            b4 = block[:, None, -mask.shape[-2]:, -mask.shape[-1]:]
            if mask.dtype == torch.bool:
                mask = mask & ~b4
            else:
                mask = mask.masked_fill(b4, torch.finfo(mask.dtype).min)
            return mask
        return {f"lm.blocks.{i}#attention_mask": edit for i in range(start, stop)}
