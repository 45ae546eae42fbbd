"""Output edits at canonical sites, applied with plain forward hooks for one run.

The model's own forward runs unchanged; a hook replaces a module's output by ``fn(output)``
(for tuple outputs, the first element); at an input site (``lm.input``, ``vision.out``) a
pre-hook replaces the module's first input; at ``SITE#kwarg`` (e.g.
``lm.blocks.3#attention_mask``, ``lm.blocks.3#position_embeddings``) a pre-hook replaces that
keyword argument of the site's module.

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

from interp.adapters import INPUT_SITES, Adapter


def then(edits: dict[str, Callable], more: dict[str, Callable]) -> dict[str, Callable]:
    """``edits`` with ``more`` added: at a site holding both, ``more``'s edit runs on the output of
    the one already there. Returns a new dict."""
    out = dict(edits)
    for site, fn in more.items():
        prev = out.get(site)
        out[site] = fn if prev is None else (lambda x, f=fn, g=prev: f(g(x)))
    return out


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

    def make_pre(fn):
        def pre_hook(_mod, args, kwargs):
            if args:
                return (fn(args[0]),) + tuple(args[1:]), kwargs
            key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
            return args, {**kwargs, key: fn(kwargs[key])}
        return pre_hook

    def make_kw(fn, key):
        def kw_hook(_mod, args, kwargs):
            return args, {**kwargs, key: fn(kwargs.get(key))}
        return kw_hook

    try:
        for site, fn in edits.items():
            if "#" in site:
                base, key = site.split("#", 1)
                mod = adapter.module(model, base)
                handles.append(mod.register_forward_pre_hook(make_kw(fn, key), prepend=True, with_kwargs=True))
                continue
            mod = adapter.module(model, site)
            if site in INPUT_SITES:
                handles.append(mod.register_forward_pre_hook(make_pre(fn), prepend=True, with_kwargs=True))
            else:
                handles.append(mod.register_forward_hook(make(fn), prepend=True))
        yield
    finally:
        for h in handles:
            h.remove()
