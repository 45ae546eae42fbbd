"""Tracing on nnsight: cache any set of canonical sites and write to any site, in one forward
of the model's own, unchanged code.

>>> t = trace(m, inputs, cache=["projector", "lm.blocks.0"], to_cpu=True, positions="image")
>>> t.logits, t.cache["lm.blocks.0"]

Interventions (BaPA, AGCI) compose with the caching and writes: their input rewrites go into
the traced call and their site edits run inside the trace like any other write. Two placements
of the same item are simply two rows of one batch (``LVLM.inputs``), so a write at one row can
read another row's activation in the same forward (see :func:`patch_rows`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from interp.adapters import INPUT_SITES
from interp.errors import SpatialBiasError
from interp.hooks import then
from interp.interventions import Edit, Intervention
from interp.model import LVLM


@dataclass
class Trace:
    """``logits``: (B, L, V). ``cache``: site → tensor in the site's documented shape, or, with
    ``positions="image"``, LM sites gathered at the image-token positions: (n_image_tokens, D)
    over the batch in row-major order."""
    logits: torch.Tensor
    cache: dict[str, torch.Tensor] = field(default_factory=dict)


def _envoy(net, path: str):
    env = net
    for part in path.split("."):
        env = env[int(part)] if part.lstrip("-").isdigit() else getattr(env, part)
    return env


def _event(lvlm: LVLM, site: str) -> tuple[str, str]:
    """("in" | "out", HF module path) of a site: input sites and ``SITE#kwarg`` read the module's inputs."""
    if "#" in site:
        return "in", lvlm.adapter.path(site.split("#", 1)[0])
    return ("in" if site in INPUT_SITES else "out"), lvlm.adapter.path(site)


def forward_order(lvlm: LVLM, inputs: dict[str, torch.Tensor]) -> list[str]:
    """Every concrete site in the order the model's forward reaches it (nnsight needs sites
    accessed in that order). Found once per LVLM with a hooked dry run and remembered."""
    rank = _event_rank(lvlm, inputs)
    sites = lvlm.adapter.concrete_sites(lvlm.model)
    return sorted(sites, key=lambda s: rank.get(_event(lvlm, s), len(rank)))


def _event_rank(lvlm: LVLM, inputs: dict[str, torch.Tensor]) -> dict[tuple[str, str], int]:
    rank = getattr(lvlm, "_event_rank", None)
    if rank is not None:
        return rank
    seen: dict[tuple[str, str], int] = {}
    handles = []
    paths = {lvlm.adapter.path(s) for s in lvlm.adapter.concrete_sites(lvlm.model)}
    for path in paths:
        mod = lvlm.model.get_submodule(path)
        handles.append(mod.register_forward_pre_hook(lambda *_a, p=path: _mark(seen, ("in", p))))
        handles.append(mod.register_forward_hook(lambda *_a, p=path: _mark(seen, ("out", p))))
    try:
        with torch.no_grad():
            lvlm.model(**inputs)
    finally:
        for h in handles:
            h.remove()
    lvlm._event_rank = seen
    return seen


def _mark(seen: dict, event) -> None:
    """Record an event's first occurrence; returns None so the hook changes nothing."""
    seen.setdefault(event, len(seen))


def _nnsight(lvlm: LVLM):
    net = getattr(lvlm, "_nnsight", None)
    if net is None:
        from nnsight import NNsight
        net = lvlm._nnsight = NNsight(lvlm.model)
    return net


def trace(lvlm: LVLM, inputs: dict[str, torch.Tensor], cache: Sequence[str] = (),
          edits: dict[str, Edit] | None = None, interventions: Sequence[Intervention] = (),
          to_cpu: bool = False, positions: str | None = None, grad: bool = False) -> Trace:
    """One traced forward.

    Args:
        cache: concrete site names to save (``lm.blocks.3``, ``projector``, ``lm.input``, …).
        edits: site → ``fn(tensor) -> tensor`` replacing the site's output (input, for
            ``lm.input`` / ``vision.out``; the keyword argument, for ``SITE#kwarg``);
            applied after the interventions' own edits.
        to_cpu: move cached tensors to the CPU.
        positions: ``"image"`` keeps only image-token positions of (B, L, ·) LM sites.
        grad: keep the autograd graph (for attribution); default runs under no_grad.
    """
    if positions not in (None, "image"):
        raise SpatialBiasError(f"positions={positions!r}: use None (all) or 'image'")
    prepared, iv_edits = lvlm.prepare(inputs, interventions)
    all_edits = then(iv_edits, edits or {})
    known = set(lvlm.adapter.concrete_sites(lvlm.model))
    bad = [s for s in list(cache) + list(all_edits) if s.split("#", 1)[0] not in known
           or ("#" not in s and s not in known)]
    if bad:
        raise SpatialBiasError(f"unknown site(s) {', '.join(bad)} for {lvlm.adapter.name}; "
                               f"see lvlm.adapter.concrete_sites(model)")
    rank = _event_rank(lvlm, prepared)
    events: dict[tuple[str, str], list[str]] = {}
    for site in dict.fromkeys(list(cache) + list(all_edits)):
        events.setdefault(_event(lvlm, site), []).append(site)
    net = _nnsight(lvlm)
    saved: dict[str, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    ctx = torch.enable_grad() if grad else torch.no_grad()
    with ctx:
        with net.trace(**prepared, use_cache=False):
            for (kind, path), sites in sorted(events.items(), key=lambda kv: rank.get(kv[0], len(rank))):
                env = _envoy(net, path)
                if kind == "out":
                    value = env.output
                    first = value[0] if isinstance(value, tuple) else value
                    site = sites[0]
                    if site in all_edits:
                        first = all_edits[site](first)
                        env.output = (first,) + tuple(value[1:]) if isinstance(value, tuple) else first
                    if site in cache:
                        saved[site] = first.save()
                    continue
                args, kwargs = env.inputs
                args, kwargs = tuple(args), dict(kwargs)
                changed = False
                for site in sites:
                    if "#" in site:
                        key = site.split("#", 1)[1]
                        if site in all_edits:
                            kwargs[key] = all_edits[site](kwargs.get(key))
                            changed = True
                        if site in cache:
                            v = kwargs.get(key)
                            saved[site] = v.save() if v is not None else None
                        continue
                    if args:
                        first = args[0]
                    else:
                        key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
                        first = kwargs[key]
                    if site in all_edits:
                        first = all_edits[site](first)
                        if args:
                            args = (first,) + args[1:]
                        else:
                            kwargs[key] = first
                        changed = True
                    if site in cache:
                        saved[site] = first.save()
                if changed:
                    env.inputs = (args, kwargs)
            out["logits"] = net.output.logits.save()
    result = Trace(logits=out["logits"])
    mask = lvlm.image_mask(prepared["input_ids"]) if positions == "image" else None
    for site in cache:
        t = saved[site]
        if mask is not None and site.startswith("lm.") and site != "lm.rotary" and t.shape[:2] == mask.shape:
            t = t[mask]
        result.cache[site] = t.detach().cpu() if to_cpu and isinstance(t, torch.Tensor) else t
    return result


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
