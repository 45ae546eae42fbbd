"""Attribution patching: gradient-based estimates of the activation patches of
:mod:`interp.patching`, for every site × token group or every single (site, position) at once.

Notation: for one item, ``a_b`` / ``a_s`` are the activations at a site in the base and source
runs, ``Δa = a_s − a_b`` (per position, width D), ``m`` the answer logit difference at the last
position. The exact patch of positions G at a site gives ``m(patched) − m(base)``; every method
below estimates it as a sum over the positions in G of a per-position score (so one set of
passes scores every group and every single position), and divided by the source − base gap of
``m`` it estimates the normalised (denoising) restoration.

Methods (``method=``; ``steps`` = k):

* ``"atp"`` (default) — plain attribution patching, ``Δa · ∂m/∂a`` at the base run
  (Nanda 2023; Kramár et al. 2024): 1 forward of the source rows + 1 forward/backward of the
  base rows. Exact when ``m`` is affine in the patched activations. With ``k > 1`` the gradient
  is instead averaged over k runs whose pixels are interpolated from base to source
  (α = (j + ½)/k; EAP-IG-style input interpolation) and still multiplied by ``Δa`` — the
  estimator of earlier versions, kept for compatibility: it is *not* a line integral at the
  site (the site's path under pixel interpolation is curved), so it does not converge to the
  patch effect as k grows.
* ``"conductance"`` — integrated gradients along the pixel path, carried to every site by the
  chain rule (layer conductance, Dhamdhere et al. 2019): ``Σ_j ½(g_j + g_{j+1}) · (a_{j+1} −
  a_j)`` over k + 1 runs at α_j = j/k (trapezoid rule; α_0 is the base run, α_k the source run),
  with ``a_j``, ``g_j`` the site's activation and gradient at α_j. Because the score is
  ``∫ ∂m/∂a · da/dα dα`` it converges (as k → ∞) to the *exact* effect for every patch whose
  positions form a cut between the pixels and ``m`` (a whole vision block or the projector,
  every image token at ``lm.input``, the last token of the last block); for a part of a cut it
  is the share of the total change that flows through those positions along the path, which
  equals the single patch's effect only when the positions do not interact. k = 1 is
  symmetric AtP, ``½(g_base + g_source) · Δa``. Cost: k + 1 forward/backward passes.
* ``"site_ig"`` — integrated gradients in activation space, one site at a time: for each site,
  k runs in which only that site (all positions) is set to ``a_b + α Δa`` (α = (j + ½)/k,
  midpoint rule) and ``Δa · mean_α ∂m/∂a``. The straight path at the site makes this the
  exact line integral of the site's ``all`` patch (error O(1/k²)); for a subset of positions
  the gradient is taken with the other positions interpolated too (an approximation, as for
  conductance). Cost: k forward/backward passes of one row per (item, site), batched; it is
  not cheaper than exact patching at coarse granularity and is here to measure what an
  activation-space path buys.

Gradients are taken with :func:`torch.autograd.grad` w.r.t. the site tensors only (no weight
gradients are computed). Placements share the prompt, so only pixel values are interpolated.
Positions are indices into the padded batch (LM sites: sequence positions; vision sites and the
projector: the image's flattened patch / token positions), so rows must have equal lengths for
per-position averages to line up (placements of the same prompt do).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from interp.batch import concat, select_rows
from interp.dispatch import forward
from spatialbias.errors import SpatialBiasError
from interp.interventions import Intervention
from interp.model import LVLM
from interp.patching import Patch, logit_diff, run_patches, site_groups
from interp.patching.core import _check_site

METHODS = ("atp", "conductance", "site_ig")


def _capture(lvlm: LVLM, inputs, sites, interventions, grad: bool, extra_edits=None):
    """Forward ``inputs`` recording the tensors at ``sites`` (through the one dispatcher).

    Returns (prepared batch, last-position logits (B, V), {site: tensor}); with ``grad`` the
    graph is kept so that :func:`torch.autograd.grad` can reach the recorded tensors.
    ``extra_edits``: {site: fn} applied after the interventions' edits (and before recording).
    """
    if not grad:
        t = forward(lvlm, inputs, interventions, edits=extra_edits, cache=list(sites), last_only=True)
        return t.batch, t.logits[:, -1], t.cache
    with frozen(lvlm.model):  # gradients reach the sites only: no weight's input is kept for the backward
        t = forward(lvlm, inputs, interventions, edits=extra_edits, cache=list(sites), grad=True, leaves=True,
                    last_only=True)
    return t.batch, t.logits[:, -1], t.cache


@contextmanager
def frozen(model: torch.nn.Module):
    """The model's parameters with ``requires_grad`` off for one block of code, then as they were.
    Gradients with respect to activations are unchanged; autograd saves far less (a linear layer
    keeps its input only to form its weight's gradient)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    keep = {id(p) for p in head.parameters()} if head is not None else set()
    # the unembedding stays as it was: its backward keeps only the last position's (B, 1, D) input,
    # and a frozen head multiplies through another matmul path (last bit differs: the dispatched
    # model's logits would not equal the undispatched one's, tests/test_dispatch.py)
    names = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in keep]
    for n in names:
        model.get_parameter(n).requires_grad_(False)
    try:
        yield
    finally:  # by name: accelerate's offload hooks may have put new parameter objects in place
        for n in names:
            model.get_parameter(n).requires_grad_(True)


def _rows(x: torch.Tensor, B: int) -> torch.Tensor:
    """A site tensor as (B, T, D): LM sites are (B, L, D) already (per-head sites (B, L, H, dh)
    join their heads); vision sites (images·crops, P, Dv) or (T, Dv) are flattened per row (one
    image per row, whose tokens the site holds contiguously)."""
    return x.flatten(2) if x.dim() == 4 else x.reshape(B, -1, x.shape[-1])


def _grads(metric: torch.Tensor, acts: dict[str, torch.Tensor], sites) -> dict[str, torch.Tensor]:
    """∂ metric.sum() / ∂ act for every site (zeros where the metric does not depend on it)."""
    live = [s for s in sites if acts[s].requires_grad]
    gs = torch.autograd.grad(metric.sum(), [acts[s] for s in live], allow_unused=True) if live else []
    out = {s: torch.zeros_like(acts[s]) for s in sites}
    for s, g in zip(live, gs):
        if g is not None:
            out[s] = g
    return out


def _mix(lvlm: LVLM, b_in, s_in, alphas: Sequence[float]):
    """Rows for every α (α-major, then item): pixel values α·source + (1 − α)·base, the rest
    from base (the prompts are equal)."""
    B = b_in["input_ids"].shape[0]
    both = concat(lvlm, b_in, s_in)
    rows = select_rows(lvlm, both, list(range(B)) * len(alphas))
    src = select_rows(lvlm, both, list(range(B, 2 * B)) * len(alphas))
    mixed = {}
    for k in rows:
        if k.startswith("pixel_values"):
            n = rows[k].shape[0] // len(alphas)
            a = torch.tensor(alphas, dtype=rows[k].dtype, device=rows[k].device).repeat_interleave(n)
            a = a.reshape(-1, *([1] * (rows[k].dim() - 1)))
            mixed[k] = torch.where(a == 1, src[k], torch.where(a == 0, rows[k], rows[k] + a * (src[k] - rows[k])))
    return rows.replace(**mixed)


def _chunk_scores(lvlm: LVLM, b_in, s_in, sites, corr, candidates, interventions, method: str, steps: int):
    """Per-position scores of one chunk of B items: ({site: (B, T_site)}, base metric (B,),
    source metric (B,)). See the module doc for the methods."""
    B = b_in["input_ids"].shape[0]
    if method == "atp":
        with torch.no_grad():
            _, s_lg, s_acts = _capture(lvlm, s_in, sites, interventions, grad=False)
        if steps == 1:
            _, lg, acts = _capture(lvlm, b_in, sites, interventions, grad=True)
            metric = logit_diff(lg, corr, candidates)
            grads = _grads(metric, acts, sites)
            b_acts = {s: v.detach() for s, v in acts.items()}
        else:
            with torch.no_grad():
                _, lg, b_acts = _capture(lvlm, b_in, sites, interventions, grad=False)
            metric = logit_diff(lg, corr, candidates)
            grads = {s: torch.zeros_like(b_acts[s]) for s in sites}
            for j in range(steps):
                _, lg_j, acts = _capture(lvlm, _mix(lvlm, b_in, s_in, [(j + 0.5) / steps]), sites, interventions,
                                         grad=True)
                for s, g in _grads(logit_diff(lg_j, corr, candidates), acts, sites).items():
                    grads[s] += g / steps
        scores = {s: (_rows(s_acts[s] - b_acts[s], B) * _rows(grads[s], B)).sum(-1) for s in sites}
        return scores, metric.detach(), logit_diff(s_lg, corr, candidates)
    if method == "conductance":
        alphas = [j / steps for j in range(steps + 1)]
        _, lg, acts = _capture(lvlm, _mix(lvlm, b_in, s_in, alphas), sites, interventions, grad=True)
        metric = logit_diff(lg, corr.repeat(len(alphas)), candidates)
        grads = _grads(metric, acts, sites)
        scores = {}
        for s in sites:
            a = _rows(acts[s].detach(), B * len(alphas)).reshape(len(alphas), B, -1, acts[s].shape[-1])
            g = _rows(grads[s], B * len(alphas)).reshape(a.shape)
            scores[s] = (0.5 * (g[1:] + g[:-1]) * (a[1:] - a[:-1])).sum((0, -1))
        m = metric.detach().reshape(len(alphas), B)
        return scores, m[0], m[-1]
    if method == "site_ig":
        with torch.no_grad():
            _, s_lg, s_acts = _capture(lvlm, s_in, sites, interventions, grad=False)
            _, b_lg, b_acts = _capture(lvlm, b_in, sites, interventions, grad=False)
        S, k = len(sites), steps
        alphas = torch.tensor([(j + 0.5) / k for j in range(k)])
        R = B * S * k  # rows ordered (site, α, item)
        big = select_rows(lvlm, lvlm.batch(b_in), list(range(B)) * (S * k))
        leaves, edits = {}, {}
        for si, s in enumerate(sites):
            ab, d = _rows(b_acts[s], B), _rows(s_acts[s] - b_acts[s], B)
            leaf = (ab[None] + alphas.to(ab)[:, None, None, None] * d[None]).reshape(k * B, *ab.shape[1:])
            leaves[s] = leaf.requires_grad_(True)

            def put(x, s=s, si=si):
                v = _rows(x, R).clone()
                v[si * k * B:(si + 1) * k * B] = leaves[s]
                return v.reshape(x.shape)
            edits[s] = put
        _, lg, _ = _capture(lvlm, big, [], interventions, grad=True, extra_edits=edits)
        gs = torch.autograd.grad(logit_diff(lg, corr.repeat(S * k), candidates).sum(), [leaves[s] for s in sites],
                                 allow_unused=True)
        scores = {}
        for s, g in zip(sites, gs):
            d = _rows(s_acts[s] - b_acts[s], B)
            g = torch.zeros((k * B, *d.shape[1:]), dtype=d.dtype, device=d.device) if g is None else g
            scores[s] = (d * g.reshape(k, *d.shape).mean(0)).sum(-1)
        return scores, logit_diff(b_lg, corr, candidates), logit_diff(s_lg, corr, candidates)
    raise SpatialBiasError(f"unknown attribution method {method!r}; use one of {', '.join(METHODS)}")


def position_scores(lvlm: LVLM, base: dict[str, torch.Tensor], source: dict[str, torch.Tensor], sites: Sequence[str],
                    correct: torch.Tensor, candidates: Sequence[int], interventions: Sequence[Intervention] = (),
                    batch_size: int = 32, steps: int = 1, method: str = "atp",
                    progress: bool = False) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Estimated effect of patching each single position of each site, for every item.

    Args:
        base, source: inputs with N rows (same prompts; one image per row).
        sites: canonical site names (``vision.blocks.i``, ``projector``, ``lm.input``, ``lm.blocks.i``).
        correct: (N,) answer token ids; candidates: the answer token ids.
        batch_size: rows per forward; a chunk of items takes 1 + 1 rows (``atp``), k + 1
            (``conductance``) or k · len(sites) (``site_ig``) per item.
        steps, method: see the module doc.
    Returns:
        ({site: (N, T_site) estimated m(patched) − m(base)}, base metric (N,), source metric (N,)),
        on the CPU. T_site = L for LM sites, the flattened vision positions per row otherwise.
    """
    if method not in METHODS:
        raise SpatialBiasError(f"unknown attribution method {method!r}; use one of {', '.join(METHODS)}")
    if steps < 1:
        raise SpatialBiasError(f"steps must be ≥ 1, got {steps}")
    if source["input_ids"].shape != base["input_ids"].shape:
        raise SpatialBiasError("base and source must have the same shape (same prompts, one image per row)")
    sites = list(dict.fromkeys(sites))
    base, source = lvlm.batch(base), lvlm.batch(source)
    base.need_one_image_per_row("attribution")
    for s in sites:
        _check_site(lvlm, s)  # refuses lm.rotary and sites without tokens
    per_item = {"atp": 2, "conductance": steps + 1, "site_ig": steps * len(sites)}[method]
    chunk = max(1, batch_size // per_item)
    N = base["input_ids"].shape[0]
    parts, bm, sm = [], [], []
    for start in tqdm(range(0, N, chunk), desc=f"attribution ({method})", disable=not progress):
        rows = list(range(start, min(N, start + chunk)))
        sc, b, s = _chunk_scores(lvlm, select_rows(lvlm, base, rows), select_rows(lvlm, source, rows),
                                 sites, correct[rows].to(lvlm.device), candidates, interventions, method, steps)
        parts.append({k: v.detach().float().cpu() for k, v in sc.items()})
        bm.append(b.detach().float().cpu())
        sm.append(s.detach().float().cpu())
    return {s: torch.cat([p[s] for p in parts]) for s in sites}, torch.cat(bm), torch.cat(sm)


def attribution_patching(lvlm: LVLM, base: dict[str, torch.Tensor], source: dict[str, torch.Tensor],
                         patches: Sequence[Patch], correct: torch.Tensor, candidates: Sequence[int],
                         targets: Sequence[Sequence[int]], interventions: Sequence[Intervention] = (),
                         batch_size: int = 32, steps: int = 1, method: str = "atp",
                         grid: tuple[int, int] = (3, 3)) -> pd.DataFrame:
    """Estimated effect of every (site, group) patch on every item (sums of :func:`position_scores`
    over the group's positions).

    Same arguments as :func:`interp.patching.run_patches`, plus ``steps`` and ``method`` (module
    doc). Returns one row per (item, patch) with ``attribution`` (estimated metric(patched) −
    metric(base)), ``base_metric`` and ``source_metric``.
    """
    sites = list(dict.fromkeys(p.site for p in patches))
    scores, bm, sm = position_scores(lvlm, base, source, sites, correct, candidates, interventions,
                                     batch_size, steps, method)
    prepared, _ = lvlm.prepare(base, interventions)
    groups = {site: site_groups(lvlm, prepared, site, targets, grid)[1] for site in sites}
    N = bm.shape[0]
    out = []
    for p in patches:
        per_pos = scores[p.site]  # (N, T_site): each row's tokens in the site's order
        masks = groups[p.site]
        if p.group not in masks:
            raise SpatialBiasError(f"group {p.group!r} is not defined at {p.site}; use {', '.join(masks)}")
        score = (per_pos * masks[p.group].float().cpu()).sum(-1)
        for i in range(N):
            out.append({"item": i, "site": p.site, "group": p.group, "attribution": float(score[i]),
                        "base_metric": float(bm[i]), "source_metric": float(sm[i])})
    return pd.DataFrame(out)


def position_attribution(lvlm: LVLM, base: dict[str, torch.Tensor], source: dict[str, torch.Tensor],
                         sites: Sequence[str], correct: torch.Tensor, candidates: Sequence[int],
                         interventions: Sequence[Intervention] = (), batch_size: int = 32, steps: int = 1,
                         method: str = "atp") -> pd.DataFrame:
    """:func:`position_scores` as a table: one row per (item, site, position) with
    ``attribution``, ``base_metric``, ``source_metric`` (the layout of :func:`run_position_patches`)."""
    scores, bm, sm = position_scores(lvlm, base, source, sites, correct, candidates, interventions,
                                     batch_size, steps, method)
    frames = []
    for s, v in scores.items():
        N, T = v.shape
        frames.append(pd.DataFrame({"item": torch.arange(N).repeat_interleave(T).numpy(), "site": s,
                                    "position": torch.arange(T).repeat(N).numpy(), "attribution": v.flatten().numpy(),
                                    "base_metric": bm.repeat_interleave(T).numpy(),
                                    "source_metric": sm.repeat_interleave(T).numpy()}))
    return pd.concat(frames, ignore_index=True)


def position_sites(lvlm: LVLM) -> list[str]:
    """Every patchable site in forward order: vision blocks, projector, ``lm.input``, then per
    LM block its token mixer's output (attention; a hybrid LM's recurrent mixer), MLP output and residual stream (the per-position granularity
    of :func:`run_position_patches` / :func:`position_attribution`)."""
    a, m = lvlm.adapter, lvlm.model
    out = [f"vision.blocks.{i}" for i in range(a.layer_count(m, "vision"))] + ["projector", "lm.input"]
    for i in range(a.layer_count(m, "lm")):
        out += [a.mixer_site(m, i), f"lm.blocks.{i}.mlp", f"lm.blocks.{i}"]
    return out


def site_positions(lvlm: LVLM, inputs: dict[str, torch.Tensor], sites: Sequence[str]) -> dict[str, int]:
    """T_site: the number of positions of each site for one row of ``inputs`` (one forward of one row)."""
    with torch.no_grad():
        _, _, acts = _capture(lvlm, select_rows(lvlm, lvlm.batch(inputs), [0]), list(sites), (), grad=False)
    return {s: _rows(acts[s], 1).shape[1] for s in sites}


def run_position_patches(lvlm: LVLM, base: dict[str, torch.Tensor], source: dict[str, torch.Tensor],
                         sites: Sequence[str], correct: torch.Tensor, candidates: Sequence[int],
                         interventions: Sequence[Intervention] = (), batch_size: int = 64,
                         positions: dict[str, Sequence[int]] | None = None, progress: bool = False) -> pd.DataFrame:
    """Exact activation patching of single positions: for every item, site and position, the base
    row with the source row's activation at that one position (:func:`interp.patching.run_patches`
    with ``Patch(site, position=p)``).

    Args:
        sites: canonical sites; positions: {site: positions} (default every position, T_site of
            :func:`site_positions`; LM sites index the padded sequence, vision sites and the
            projector the row's flattened vision positions).
        batch_size: rows per forward (at least 3).
    Returns:
        one row per (item, site, position) with ``metric``, ``base_metric``, ``source_metric``.
    """
    sites = list(dict.fromkeys(sites))
    if positions is None:
        positions = {s: range(t) for s, t in site_positions(lvlm, base, sites).items()}
    patches = [Patch(s, position=int(p)) for s in sites for p in positions[s]]
    df = run_patches(lvlm, base, source, patches, correct, candidates, [()] * base["input_ids"].shape[0],
                     interventions=interventions, batch_size=batch_size, progress=progress)
    return df.drop(columns="group").astype({"position": int})


def position_restoration(df: pd.DataFrame) -> pd.DataFrame:
    """Per (site, position) of :func:`run_position_patches`: denoising restoration
    (mean patched − mean base) / (mean source − mean base)."""
    g = df.groupby(["site", "position"], sort=False)[["metric", "base_metric", "source_metric"]].mean()
    r = (g["metric"] - g["base_metric"]) / (g["source_metric"] - g["base_metric"])
    return pd.DataFrame({"restoration": r}).reset_index()


def estimated_restoration(df: pd.DataFrame, keys: Sequence[str] = ("site", "group")) -> pd.DataFrame:
    """Per ``keys`` (``("site", "position")`` for :func:`position_attribution`): mean attribution
    / mean (source − base) gap (denoising direction)."""
    g = df.groupby(list(keys), sort=False)[["attribution", "base_metric", "source_metric"]].mean()
    return pd.DataFrame({"estimate": g["attribution"] / (g["source_metric"] - g["base_metric"])}).reset_index()
