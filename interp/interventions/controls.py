"""Position-id controls and tests: :class:`PositionSwap` (position-id patching between two cells,
the direct causal test of the RoPE hypothesis) and :class:`PositionPermute` (image tokens trade
position ids: reverse or shuffle)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from spatialbias.errors import SpatialBiasError
from interp.interventions.base import Intervention, _image_groups, _moved_image_ids, register
from interp.interventions.knockout import attention_window


@dataclass(frozen=True)
class PositionSwap(Intervention):
    """Position-id patching: the image tokens of cell ``a`` get the position ids of cell ``b``'s
    tokens and vice versa (per image, patch by patch in raster order; the cells must hold the
    same number of patches), in every LM layer or only in ``layers`` = (start, stop).

    Run on the corrupt placement with a = the target's cell there and b = its cell in the clean
    placement, the target's content is read at the clean target's positions: the direct causal
    test of the RoPE hypothesis. On M-RoPE models all three rows are swapped. With ``layers``, the
    rotary pair of the window's attention layers is swapped (a hybrid LM's recurrent layers read no
    positions; a window of those only is refused).
    """
    kind: ClassVar[str] = "position_swap"
    a: int = 0
    b: int = 8
    layers: tuple[int, int] | None = None
    grid: tuple[int, int] = (3, 3)

    def swapped_ids(self, lvlm, batch) -> torch.Tensor:
        """(B, L) or (3, B, L): the run's ids with cells a and b swapped."""
        batch = lvlm.batch(batch)
        def moves(imap):
            cells = imap.cells(*self.grid)
            for b, sel in _image_groups(imap):
                ia = (sel & (cells[b] == self.a)).nonzero().flatten()
                ib = (sel & (cells[b] == self.b)).nonzero().flatten()
                if len(ia) != len(ib):
                    raise SpatialBiasError(f"cells {self.a} and {self.b} hold {len(ia)} and {len(ib)} patches; "
                                           "position swap needs equal counts")
                yield b, torch.cat([ia, ib]), torch.cat([ib, ia])
        return _moved_image_ids(lvlm, batch, moves)

    def prepare(self, lvlm, batch):
        batch = lvlm.batch(batch)
        if self.layers is None:
            return batch.replace(position_ids=self.swapped_ids(lvlm, batch))
        return batch

    def edits(self, lvlm, batch):
        if self.layers is None:
            return {}
        if lvlm.adapter.rope_kind(lvlm.model) == "none":
            raise SpatialBiasError(f"PositionSwap(layers={self.layers}) swaps the rotary embeddings of some layers; "
                                   "this LM has learned absolute positions, added once at the embedding: use "
                                   "layers=None")
        pos = self.swapped_ids(lvlm, batch)
        out = {}
        for i in attention_window(lvlm, self.layers, "PositionSwap"):
            out[f"lm.blocks.{i}#position_embeddings"] = lambda old, i=i: _rope_like(lvlm, old, pos, i)
        return out

    def decode_edits(self, lvlm, batch, step):
        """Nothing: decode tokens are text, whose ids the swap leaves alone; the image tokens' keys
        were rotated with the swapped ids in the prompt's forward and are read from the cache."""
        return {}


register(PositionSwap)


def _rope_like(lvlm, old, pos: torch.Tensor, layer: int):
    """Layer ``layer``'s (cos, sin) for ids ``pos``, computed by the model's own rotary module on
    the device and dtype of the pair ``old`` it replaces (a dispatched model's parameters may be on
    meta or another device; the rotary module's own hook moves its inputs where it computes)."""
    like = old[0]
    rope = lvlm.adapter.rotary(lvlm.model, like, pos, layer)
    return tuple(t.to(device=like.device, dtype=like.dtype) for t in rope)


POSITION_CONTROLS = ("shuffle", "reverse")


@dataclass(frozen=True)
class PositionPermute(Intervention):
    """Position-id control: each image's tokens keep their content and sequence slots but take
    each other's position ids — ``reverse`` (the last patch gets the first patch's id, …) or
    ``shuffle`` (a fixed random permutation from ``seed``). On M-RoPE models a token takes another
    token's whole (t, h, w) triple. If a model's bias follows the position ids, ``reverse`` mirrors
    its per-cell profile (cell k ↔ cell 8 − k on a 3×3 grid); a bias carried by the content does not move.
    """
    kind: ClassVar[str] = "positions"
    mode: str = "reverse"
    seed: int = 0

    def __post_init__(self):
        if self.mode not in POSITION_CONTROLS:
            raise SpatialBiasError(f"position control {self.mode!r} is unknown; use one of {', '.join(POSITION_CONTROLS)}")

    def position_ids(self, lvlm, batch) -> torch.Tensor:
        """(B, L) ids, or (3, B, L) on M-RoPE models."""
        batch = lvlm.batch(batch)

        def moves(imap):
            gen = torch.Generator().manual_seed(self.seed)
            for b, sel in _image_groups(imap):
                idx = sel.nonzero().flatten()
                perm = idx.flip(0) if self.mode == "reverse" else idx[torch.randperm(len(idx), generator=gen).to(idx.device)]
                yield b, idx, perm
        return _moved_image_ids(lvlm, batch, moves)

    def prepare(self, lvlm, batch):
        batch = lvlm.batch(batch)
        return batch.replace(position_ids=self.position_ids(lvlm, batch))


register(PositionPermute)
