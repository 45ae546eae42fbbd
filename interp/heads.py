"""Attention heads between two placements of the same items: which (layer, head) carries the
answer's clean − corrupt gap, estimated for every head at once and measured exactly for a few.

All functions take ``base`` (the corrupt placement) and ``source`` (the clean one): processor
inputs of N rows with the same prompts and image sizes (so their token layouts agree position for
position), ``correct`` (N,) answer token ids and the candidate ids; ``m`` is the answer logit
difference at the last position (:func:`interp.patching.logit_diff`). A head's tensor is the
site ``lm.blocks.{l}.attn.heads``: (B, L, H, head_dim), the input of the attention output
projection split into heads (writing it changes the layer's output).

Only attention layers have heads: on a hybrid LM (Qwen3.5's Gated DeltaNet layers) the others
score NaN and cannot be named.

* :func:`head_attribution` — attribution patching per head: ``Σ_{pos, d} Δa · ∂m/∂a`` at the base
  run (Δa = source − base head output), every head of every layer from one forward of the
  source rows and one forward/backward of the base rows. (N, layers, H).
* :func:`head_patches` — exact patches of one or more heads into the base run: a head's output
  from the source run at every position (``scope="all"``), or at the answer position only
  (``"last"``); a set of heads patched together gives the cumulative restoration.
* :func:`path_patches` — path patching image tokens → head → answer position (Wang et al. 2023;
  Goldowsky-Dill et al. 2023): first the base run with the residual stream entering block l
  replaced at the image tokens by the source's (so head (l, h) at the answer position reads the
  source's keys and values of the image tokens, with the base's query and text tokens), and the
  head's output at the answer position recorded; then the base run with only that output written
  in. Everything else (other heads, other positions, later layers' inputs except through this
  one write) stays the base's.
* :func:`head_ablations` — both runs with a set of heads replaced, at every position, by the mean
  of the item's two placements' outputs: the gap that remains is what the other heads carry.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from interp.attribution import frozen
from interp.dispatch import forward
from interp.model import LVLM
from interp.patching import logit_diff
from spatialbias.errors import SpatialBiasError

Head = tuple[int, int]
"""(layer, head)."""


def head_site(layer: int) -> str:
    return f"lm.blocks.{layer}.attn.heads"


def _chunks(n: int, size: int):
    size = max(1, int(size))
    for a in range(0, n, size):
        yield list(range(a, min(n, a + size)))


def _metric(lvlm: LVLM, logits: torch.Tensor, correct: torch.Tensor, candidates) -> np.ndarray:
    return logit_diff(logits[:, -1], correct.to(logits.device), candidates).double().cpu().numpy()


def _check(lvlm: LVLM, base, source, correct) -> tuple:
    base, source = lvlm.batch(base), lvlm.batch(source)
    if base["input_ids"].shape != source["input_ids"].shape:
        raise SpatialBiasError("base and source must have the same shape (the same items in two placements)")
    if correct.shape[0] != base.rows:
        raise SpatialBiasError(f"{base.rows} rows but {correct.shape[0]} answers")
    return base, source


def head_attribution(lvlm: LVLM, base, source, correct: torch.Tensor, candidates: Sequence[int],
                     interventions: Sequence = (), batch_size: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Attribution-patching estimate of every head's denoising effect.

    Returns (scores (N, layers, H): the estimated ``m(base with the head patched) − m(base)``, NaN
    on an LM layer without attention heads (a hybrid LM's recurrent layer:
    :meth:`~interp.adapters.Adapter.attention_layers`), base metric (N,), source metric (N,))."""
    base, source = _check(lvlm, base, source, correct)
    n_layers = lvlm.adapter.layer_count(lvlm.model, "lm")
    att = lvlm.adapter.attention_layers(lvlm.model)
    sites = [head_site(i) for i in att]
    scores, mb, ms = [], [], []
    for rows in _chunks(base.rows, batch_size):
        b, s = lvlm.rows(base, rows), lvlm.rows(source, rows)
        t_s = forward(lvlm, s, interventions, cache=sites, last_only=True)
        with frozen(lvlm.model):
            t_b = forward(lvlm, b, interventions, cache=sites, grad=True, leaves=True, last_only=True)
        m = logit_diff(t_b.logits[:, -1], correct[rows].to(t_b.logits.device), candidates)
        grads = torch.autograd.grad(m.sum(), [t_b.cache[x] for x in sites], allow_unused=True)
        per = []
        for x, g in zip(sites, grads):
            a_b = t_b.cache[x].detach()
            if g is None:
                per.append(torch.zeros(a_b.shape[0], a_b.shape[2], dtype=torch.float64))
                continue
            delta = t_s.cache[x].to(a_b.device).double() - a_b.double()
            per.append((delta * g.double()).sum((1, 3)).cpu())  # (B, H)
        full = torch.full((len(rows), n_layers, per[0].shape[1]), float("nan"), dtype=torch.float64)
        full[:, att] = torch.stack(per, 1)
        scores.append(full)
        mb.append(m.detach().double().cpu().numpy())
        ms.append(_metric(lvlm, t_s.logits, correct[rows], candidates))
    return torch.cat(scores).numpy(), np.concatenate(mb), np.concatenate(ms)


def _write(heads: Sequence[Head], values: dict[int, torch.Tensor], scope: str) -> dict:
    """Edits writing ``values[layer]`` (B, L, H, dh) into the listed heads (every position, or the
    last one with ``scope="last"``)."""
    by_layer: dict[int, list[int]] = {}
    for layer, h in heads:
        by_layer.setdefault(layer, []).append(h)
    pos = slice(None) if scope == "all" else slice(-1, None)

    def edit(layer, hs):
        def fn(x):
            x = x.clone()
            v = values[layer].to(x.device, x.dtype)
            x[:, pos, hs] = v[:, pos, hs]
            return x
        return fn
    return {head_site(layer): edit(layer, hs) for layer, hs in by_layer.items()}


def head_patches(lvlm: LVLM, base, source, sets: Sequence[Sequence[Head]], correct: torch.Tensor,
                 candidates: Sequence[int], interventions: Sequence = (), scope: str = "all",
                 batch_size: int = 16) -> np.ndarray:
    """(N, len(sets)) metric of the base run with each set of heads' outputs taken from the source
    run (``scope``: ``"all"`` positions, or ``"last"``, the answer position)."""
    if scope not in ("all", "last"):
        raise SpatialBiasError(f"scope {scope!r}: use 'all' or 'last'")
    base, source = _check(lvlm, base, source, correct)
    layers = sorted({layer for s in sets for layer, _ in s})
    out = np.zeros((base.rows, len(sets)))
    with torch.no_grad():
        for rows in _chunks(base.rows, batch_size):
            b = lvlm.rows(base, rows)
            src = forward(lvlm, lvlm.rows(source, rows), interventions, cache=[head_site(x) for x in layers],
                          last_only=True).cache
            vals = {x: src[head_site(x)] for x in layers}
            for k, heads in enumerate(sets):
                lg = forward(lvlm, b, interventions, edits=_write(heads, vals, scope), last_only=True).logits
                out[rows, k] = _metric(lvlm, lg, correct[rows], candidates)
    return out


def path_patches(lvlm: LVLM, base, source, heads: Sequence[Head], correct: torch.Tensor, candidates: Sequence[int],
                 interventions: Sequence = (), batch_size: int = 16) -> np.ndarray:
    """(N, len(heads)) metric of the base run with path image tokens → head → answer position
    patched from the source run (module doc): two forwards per layer and one per head."""
    base, source = _check(lvlm, base, source, correct)
    layers = sorted({layer for layer, _ in heads})
    out = np.zeros((base.rows, len(heads)))
    with torch.no_grad():
        for rows in _chunks(base.rows, batch_size):
            b, s = lvlm.rows(base, rows), lvlm.rows(source, rows)
            image = b.imap.is_image
            if not bool(image.any()):
                raise SpatialBiasError("path patching from the image tokens needs image tokens in every row")
            src = forward(lvlm, s, interventions, cache=[f"lm.blocks.{x}#input" for x in layers], last_only=True).cache
            recv = {}
            for x in layers:
                def swap(h, v=src[f"lm.blocks.{x}#input"]):
                    h = h.clone()
                    m = image.to(h.device)
                    h[m] = v.to(h.device, h.dtype)[m]
                    return h
                recv[x] = forward(lvlm, b, interventions, edits={f"lm.blocks.{x}#input": swap},
                                  cache=[head_site(x)], last_only=True).cache[head_site(x)]
            for k, head in enumerate(heads):
                lg = forward(lvlm, b, interventions, edits=_write([head], recv, "last"), last_only=True).logits
                out[rows, k] = _metric(lvlm, lg, correct[rows], candidates)
    return out


def head_ablations(lvlm: LVLM, base, source, sets: Sequence[Sequence[Head]], correct: torch.Tensor,
                   candidates: Sequence[int], interventions: Sequence = (),
                   batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(base metric (N, len(sets)), source metric (N, len(sets))) with each set of heads replaced,
    at every position, by the mean of the item's base and source outputs in both runs."""
    base, source = _check(lvlm, base, source, correct)
    layers = sorted({layer for s in sets for layer, _ in s})
    sites = [head_site(x) for x in layers]
    ob, os_ = np.zeros((base.rows, len(sets))), np.zeros((base.rows, len(sets)))
    with torch.no_grad():
        for rows in _chunks(base.rows, batch_size):
            b, s = lvlm.rows(base, rows), lvlm.rows(source, rows)
            cb = forward(lvlm, b, interventions, cache=sites, last_only=True).cache
            cs = forward(lvlm, s, interventions, cache=sites, last_only=True).cache
            mean = {x: (cb[head_site(x)].double() + cs[head_site(x)].to(cb[head_site(x)].device).double()) / 2
                    for x in layers}
            for k, heads in enumerate(sets):
                for inputs, out in ((b, ob), (s, os_)):
                    lg = forward(lvlm, inputs, interventions, edits=_write(heads, mean, "all"), last_only=True).logits
                    out[rows, k] = _metric(lvlm, lg, correct[rows], candidates)
    return ob, os_
