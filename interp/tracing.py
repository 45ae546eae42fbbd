"""Tracing: cache any set of sites and write to any site, in one forward (or generation) of the
model's own, unchanged code, through the one dispatcher (:mod:`interp.dispatch`) that ``run``,
``generate``, patching, attribution and attention flow use too.

>>> t = trace(m, inputs, cache=["projector", "lm.blocks.-1", "lm.blocks.0.attn.heads"], to_cpu=True)
>>> t.logits, t.cache["lm.blocks.-1"]
>>> t = trace(m, inputs, cache=["lm.blocks.0"], max_new_tokens=4)   # t.tokens, t.logits per step

Site names follow :mod:`interp.sites` (canonical names, negative layer indices, ``#kwarg``,
``@call``, ``module:HF.PATH``). Interventions (BaPA, AGCI, …) compose with the caching and writes.
Two placements of the same item are two rows of one batch, so a write at one row can read another
row's activation in the same forward (:func:`patch_rows`).

For users who prefer nnsight, ``lvlm.adapter.path(site, lvlm.model)`` gives the HF module path of
a canonical site (``NNsight(lvlm.model)`` then reaches it by attribute); the test suite checks this
module's caches against nnsight's.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from interp.dispatch import Edit, Trace, forward
from interp.interventions import Intervention
from interp.model import LVLM

__all__ = ["Trace", "patch_rows", "trace"]


def trace(lvlm: LVLM, inputs: dict[str, torch.Tensor], cache: Sequence[str] = (),
          edits: dict[str, Edit] | None = None, interventions: Sequence[Intervention] = (),
          to_cpu: bool = False, positions: str | None = None, grad: bool = False,
          reduce: dict[str, Callable] | None = None, max_new_tokens: int = 0) -> Trace:
    """One traced forward (or, with ``max_new_tokens``, a greedy generation).

    Args:
        cache: site names to save (``lm.blocks.3``, ``projector``, ``lm.input``,
            ``lm.blocks.0.attn.heads``, ``lm.rotary@1``, ``module:…``).
        edits: site → ``fn(value) -> value`` replacing the site's tensor; applied after the
            interventions' own edits at that site.
        to_cpu: move cached tensors to the CPU as they are recorded.
        positions: ``"image"`` keeps only the patch tokens of token sites, in image raster order:
            (n_patches, D) at every site (the projector and ``lm.input`` agree token for token).
        grad: keep the autograd graph (for attribution); default runs under no_grad.
        reduce: site → ``fn(value)`` applied as the value is recorded (e.g. a pattern reduced to cells).
        max_new_tokens: generate; ``logits`` become (B, N, V) and each cache a list per forward.
    """
    return forward(lvlm, inputs, interventions, edits=edits, cache=cache, positions=positions, reduce=reduce,
                   to_cpu=to_cpu, grad=grad, max_new_tokens=max_new_tokens)


def patch_rows(site: str, src_row: int, dst_row: int, where: torch.Tensor | None = None) -> dict[str, Edit]:
    """An edit that writes row ``src_row``'s activation at ``site`` into row ``dst_row`` of the
    same batch (at the (L,) bool positions ``where``; all positions when None)."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        if where is None:
            x[dst_row] = x[src_row]
        else:
            x[dst_row, where] = x[src_row, where]
        return x
    return {site: fn}
