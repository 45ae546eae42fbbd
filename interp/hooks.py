"""Output edits at canonical sites, applied with plain forward hooks for one run.

The model's own forward runs unchanged; a hook replaces a module's output by ``fn(output)``
(for tuple outputs, the first element).
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
            handles.append(adapter.module(model, site).register_forward_hook(make(fn)))
        yield
    finally:
        for h in handles:
            h.remove()
