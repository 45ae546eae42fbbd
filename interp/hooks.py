"""Output edits at canonical sites, applied with plain forward hooks for one run.

The model's own forward runs unchanged; a hook replaces a module's output by ``fn(output)``
(for tuple outputs, the first element).

Trap: transformers 5 records ``hidden_states`` with forward hooks of its own (installed on
first use). An edit hook that runs after them changes the next layer's input but not the
recorded copy, and LLaVA reads its image features from that copy
(``vision_feature_layer``), so an edit of ``vision.blocks.{i}`` would silently do nothing.
Edit hooks are therefore prepended: they run before any recorder.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from interp.adapters import Adapter


@contextmanager
def edit_sites(model: torch.nn.Module, adapter: Adapter,
               edits: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> Iterator[None]:
    handles = []

    def make(fn):
        def hook(_mod, _args, out):
            if isinstance(out, tuple):
                return (fn(out[0]),) + out[1:]
            return fn(out)
        return hook

    try:
        for site, fn in edits.items():
            handles.append(adapter.module(model, site).register_forward_hook(make(fn), prepend=True))
        yield
    finally:
        for h in handles:
            h.remove()
