"""Attention knockout: an intervention that blocks attention from the query rows to one or more
cells' image tokens in a window of layers, by editing a clone of the mask each layer receives (bool
masks: False; additive float masks: the dtype's minimum). Gemma3's bidirectional image mask and
sliding windows are left as they are elsewhere. :func:`query_rows` (the ``last`` token or the
``text`` after the image) is shared with :func:`interp.attention.cell_flow`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from interp.dispatch import PATTERN_IMPL
from interp.interventions.base import Intervention, register
from interp.sites import layer_range
from spatialbias.errors import SpatialBiasError

QUERIES = ("last", "text")


def query_rows(lvlm, inputs: dict[str, torch.Tensor], query: str) -> torch.Tensor:
    """(B, L) bool: the query positions (``last`` token, or ``text`` after the last image token)."""
    if query not in QUERIES:
        raise SpatialBiasError(f"query {query!r}: use one of {', '.join(QUERIES)}")
    batch = lvlm.batch(inputs)
    ids = batch["input_ids"]
    q = torch.zeros_like(ids, dtype=torch.bool)
    if query == "last":
        q[:, -1] = True
        return q
    img = batch.imap.is_image
    for b in range(ids.shape[0]):
        pos = img[b].nonzero().flatten()
        if len(pos):
            q[b, int(pos[-1]) + 1:] = True
    return q & batch["attention_mask"].bool()


@register
@dataclass(frozen=True)
class Knockout(Intervention):
    """Block attention from the ``query`` rows to the image tokens of ``cells`` in layers
    ``layers`` = (start, stop); ``cells=None`` blocks every image token (patches and newline
    tokens). Works with eager and SDPA masks. On a hybrid LM (Qwen3.5) only the window's attention
    layers are edited: a recurrent layer still carries the image to the queries through its state
    (a window of recurrent layers only is refused; :func:`attention_window`)."""
    kind: ClassVar[str] = "knockout"
    cells: tuple[int, ...] | None = None
    layers: tuple[int, int] | None = None
    query: str = "last"
    grid: tuple[int, int] = (3, 3)

    def _keys(self, batch) -> torch.Tensor:
        """(B, L) bool: the blocked image tokens."""
        imap = batch.imap
        if self.cells is None:
            return imap.is_image
        cells = imap.cells(*self.grid)
        keys = torch.zeros_like(imap.is_image)
        for c in self.cells:
            keys |= cells == c
        return keys

    def _sites(self, lvlm) -> list[str]:
        impl = lvlm.model.config.text_config._attn_implementation
        if impl not in EDITABLE_MASKS:
            raise SpatialBiasError(f"Knockout edits the attention mask, which the {impl!r} attention implementation "
                                   f"does not take; load the model with attn_implementation='sdpa' or 'eager'")
        return [f"lm.blocks.{i}#attention_mask" for i in attention_window(lvlm, self.layers, "Knockout")]

    def edits(self, lvlm, batch):
        batch = lvlm.batch(batch)
        sites = self._sites(lvlm)
        block = query_rows(lvlm, batch, self.query)[:, :, None] & self._keys(batch)[:, None, :]  # (B, Lq, Lk)
        L = batch["input_ids"].shape[1]

        def edit(mask):
            if mask is None:  # SDPA with no padding passes no mask: causal only
                mask = torch.ones(L, L, dtype=torch.bool, device=block.device).tril()[None, None]
                mask = mask.expand(block.shape[0], 1, L, L)
            return _blocked(mask, block[:, None, -mask.shape[-2]:, -mask.shape[-1]:].to(mask.device))
        return {s: edit for s in sites}

    def decode_edits(self, lvlm, batch, step):
        """Each decoded token is text after the image (and the last token when it is made), so it
        is a query of both ``last`` and ``text``: it cannot attend to the blocked image tokens."""
        sites = self._sites(lvlm)
        keys = self._keys(batch)
        B, L = keys.shape

        def edit(mask):
            if mask is None:
                mask = torch.ones(B, 1, 1, L + step, dtype=torch.bool, device=keys.device)
            # the mask's columns are the last W cached positions (W < L + step for a sliding-window cache)
            col = torch.arange(L + step - mask.shape[-1], L + step, device=keys.device)
            hit = torch.zeros(B, mask.shape[-1], dtype=torch.bool, device=keys.device)
            inside = (col >= 0) & (col < L)
            hit[:, inside] = keys[:, col[inside]]
            return _blocked(mask, hit[:, None, None, :].to(mask.device))
        return {s: edit for s in sites}


def attention_window(lvlm, layers: tuple[int, int] | None, what: str) -> list[int]:
    """The attention layers (:meth:`~interp.adapters.Adapter.attention_layers`) among the LM layers
    ``layers`` = (start, stop) names (None: all): a hybrid LM's recurrent layers (Gated DeltaNet)
    have no attention mask and read no position ids, so ``what`` acts on the attention layers of
    its window only; a window without one is one error line."""
    a, m = lvlm.adapter, lvlm.model
    window = layer_range(a.layer_count(m, "lm"), layers)
    att = set(a.attention_layers(m))
    out = [i for i in window if i in att]
    if not out:
        kinds = sorted({a.layer_kind(m, i) for i in window})
        raise SpatialBiasError(f"{what}(layers={layers}): LM layers {list(window)} of {a.name} are "
                               f"{'/'.join(kinds)} layers, which have no attention mask and read no position ids; "
                               f"give a window holding an attention layer ({sorted(att)})")
    return out


EDITABLE_MASKS = ("eager", "sdpa", PATTERN_IMPL)
"""Attention implementations whose per-layer masks Knockout can edit (flash-attention and flex
take none)."""


def _blocked(mask: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """``mask`` (bool keep-mask or additive float) with ``block`` (broadcastable bool) removed."""
    mask = mask.clone()
    if mask.dtype == torch.bool:
        return mask & ~block
    return mask.masked_fill(block, torch.finfo(mask.dtype).min)
