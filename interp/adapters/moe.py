"""What an adapter may declare about a mixture-of-experts LM; :class:`interp.adapters.Adapter`
inherits the dense defaults (:class:`Dense`), an MoE adapter (Qwen3-VL-MoE) overrides them."""
from __future__ import annotations

from typing import NamedTuple

import torch


class Routing(NamedTuple):
    """A MoE LM's routed ``layers`` (their ``lm.blocks.{i}.router`` sites hold the router logits
    (B·L, ``experts``)); each token goes to its ``top_k`` experts of highest router probability."""
    layers: tuple[int, ...]
    experts: int
    top_k: int


class Dense:
    """The defaults of an LM without experts (every architecture but the MoE ones)."""

    def routing(self, model: torch.nn.Module) -> Routing | None:
        """The LM's mixture-of-experts routing; None for a dense LM."""
        return None

    def complete_output(self, model: torch.nn.Module, path: str, out: tuple) -> tuple:
        """Tuple output ``out`` of module ``path`` after an edit of its first element (the site's
        tensor), as the rest of the forward must see it (:mod:`interp.dispatch` calls this after
        every such edit). Most modules' other elements do not follow from the first (attention's
        weights): unchanged by default. A MoE router returning (logits, weights, indices)
        recomputes its weights and indices from the written logits, so that the write re-routes."""
        return out
