"""Activation patching between two placements of the same items, batched.

``base`` and ``source`` are processor inputs with one row per item (row i of both = item i in
two placements, same prompt). A :class:`Patch` names a site and a token group; the patched run
is the base row with the source row's activation written at that site and group. All patches
run in forwards of at most ``batch_size`` rows: each item (or slice of its patches) contributes
its source row, its unpatched base row and one base row per patch, and every edit copies from
that source row inside the same forward (the source row is never edited, so it holds the source
activations).

Denoising (clean → corrupt): base = corrupt, source = clean; restoration
``(patched − corrupt) / (clean − corrupt)``. Noising (corrupt → clean): base = clean, source =
corrupt; restoration ``(clean − patched) / (clean − corrupt)`` (the share of the gap the
corrupt activation alone creates). Means over items are taken before the ratio.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from interp.errors import SpatialBiasError
from interp.hooks import edit_sites, then
from interp.interventions import Intervention
from interp.model import LVLM

GROUPS = ("target", "image", "text", "last", "all")
"""Token groups: ``target`` the image tokens of the target's cells (its cell in either
placement), ``image`` all image tokens, ``text`` the text after the image (the question and
chat suffix), ``last`` the final token, ``all`` every position."""


@dataclass(frozen=True)
class Patch:
    """A site and a token group, or (``position`` set) one position of the site: an index into
    the padded sequence at LM sites, into the row's flattened vision positions at vision sites
    and the projector."""
    site: str
    group: str = "all"
    position: int | None = None

    def __post_init__(self):
        if self.group not in GROUPS:
            raise SpatialBiasError(f"unknown token group {self.group!r}; use one of {', '.join(GROUPS)}")


def logit_diff(last_logits: torch.Tensor, correct: torch.Tensor, candidates: Sequence[int]) -> torch.Tensor:
    """(B,) logit of the correct token minus the best other candidate. ``correct``: (B,) token ids."""
    cand = torch.as_tensor(list(candidates), device=last_logits.device)
    lg = last_logits.float()
    right = lg.gather(1, correct[:, None])[:, 0]
    others = lg[:, cand].masked_fill(cand[None, :] == correct[:, None], float("-inf")).max(-1).values
    return right - others


def group_masks(lvlm: LVLM, inputs: dict[str, torch.Tensor], targets: Sequence[Sequence[int]],
                grid: tuple[int, int] = (3, 3), imap=None) -> dict[str, torch.Tensor]:
    """(B, L) bool masks of every token group; ``targets[b]``: the target cells of row b."""
    imap = imap if imap is not None else lvlm.image_map(inputs)
    mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).bool()
    cells = imap.cells(*grid)
    tgt = torch.zeros_like(mask)
    for b, ts in enumerate(targets):
        for t in ts:
            tgt[b] |= cells[b] == t
    after = torch.zeros_like(mask)
    for b in range(mask.shape[0]):
        img = imap.is_image[b].nonzero().flatten()
        if len(img):
            after[b, int(img[-1]) + 1:] = True
    last = torch.zeros_like(mask)
    last[:, -1] = True
    return {"target": tgt, "image": imap.is_image.clone(), "text": after & mask, "last": last, "all": mask}


def _site_kind(lvlm: LVLM, site: str) -> str:
    if site.startswith("lm.") and site not in ("lm.rotary",) or site in ("lm.input", "unembed"):
        return "lm"
    if site == "lm.rotary":
        raise SpatialBiasError("lm.rotary cannot be activation-patched; use position-id patching (PositionSwap)")
    return "vision"


def _copy(x: torch.Tensor, ops, B: int, kind: str) -> torch.Tensor:
    """Copy rows of ``x``: ops = [(dst, src, mask (L,) | (N,) | position | None)]. In place when no graph
    is recorded (the module's fresh output feeds only the next module), else on a clone."""
    if x.requires_grad:
        x = x.clone()
    view = x if kind == "lm" else x.reshape(B, -1, x.shape[-1])
    for dst, src, m in ops:
        if m is None:
            view[dst] = view[src]
        else:
            view[dst, m] = view[src, m]
    return x


def run_patches(lvlm: LVLM, base: dict[str, torch.Tensor], source: dict[str, torch.Tensor], patches: Sequence[Patch],
                correct: torch.Tensor, candidates: Sequence[int], targets: Sequence[Sequence[int]],
                interventions: Sequence[Intervention] = (), batch_size: int = 32,
                progress: bool = False, grid: tuple[int, int] = (3, 3)) -> pd.DataFrame:
    """Metric (answer logit difference) of every patch on every item.

    Args:
        base, source: inputs with N rows (one image per row, equal lengths across rows).
        patches: the (site, group) patches; vision and projector sites take ``all``, the
            projector also ``target``/``image`` where its tokens are the image tokens in order.
        correct: (N,) correct answer token per item; candidates: the answer token ids.
        targets: per item, the target's cells (both placements), row-major on ``grid``.
        interventions: applied to every row (so patching runs on the BaPA/AGCI graph too).
    Returns:
        one row per (item, patch) with ``metric``, plus ``base_metric`` and ``source_metric``
        (the unpatched rows of the same forward).
    """
    N = base["input_ids"].shape[0]
    if source["input_ids"].shape != base["input_ids"].shape:
        raise SpatialBiasError("base and source must have the same shape (same prompts, one image per row)")
    # work units: (item, slice of patches) of at most batch_size − 2 patches (+ source and base rows)
    per_unit = max(1, batch_size - 2)
    units = [(i, list(range(j, min(len(patches), j + per_unit)))) for i in range(N)
             for j in range(0, len(patches), per_unit)]
    both = {k: torch.cat([v, source[k]], 0) if isinstance(v, torch.Tensor) and v.dim() else v for k, v in base.items()}
    out = []
    bar = tqdm(total=len(units), desc="patching", unit="chunk", disable=not progress)
    u = 0
    while u < len(units):
        take, rows_needed = [], 0
        while u < len(units) and (not take or rows_needed + 2 + len(units[u][1]) <= batch_size):
            take.append(units[u])
            rows_needed += 2 + len(units[u][1])
            u += 1
        rows, layout = [], []
        for i, js in take:
            s = len(rows)
            rows += [N + i, i] + [i] * len(js)  # source, unpatched base, patched bases
            layout.append((i, s, js))
        chunk = lvlm.adapter.select_rows(both, rows)
        if len(rows) != chunk["input_ids"].shape[0]:
            raise SpatialBiasError("row selection failed; patching needs one image per row")
        chunk, iv_edits = lvlm.prepare(chunk, interventions)
        imap = lvlm.image_map(chunk)
        groups = group_masks(lvlm, chunk, [targets[i] for i, s, js in layout for _ in range(2 + len(js))],
                             grid=grid, imap=imap)
        ops: dict[str, list] = {}
        for i, s, js in layout:
            for k, j in enumerate(js):
                p = patches[j]
                dst = s + 2 + k
                kind = _site_kind(lvlm, p.site)
                if p.position is not None:
                    m = p.position
                elif kind == "lm":
                    m = groups[p.group][s]
                elif p.group == "all":
                    m = None
                elif p.site == "projector" and lvlm.adapter.name != "llava_next":
                    m = groups[p.group][s][imap.is_image[s]]
                else:
                    raise SpatialBiasError(f"group {p.group!r} is not defined at {p.site}; use 'all'")
                ops.setdefault(p.site, []).append((dst, s, m))
        B = len(rows)
        edits = then(iv_edits, {site: (lambda x, o=site_ops, k=_site_kind(lvlm, site): _copy(x, o, B, k))
                                for site, site_ops in ops.items()})
        with torch.no_grad(), edit_sites(lvlm.model, lvlm.adapter, edits):
            logits = lvlm.model(**chunk, use_cache=False, logits_to_keep=1).logits[:, -1]
        corr = torch.cat([correct[i].repeat(2 + len(js)) for i, s, js in layout]).to(logits.device)
        metric = logit_diff(logits, corr, candidates).cpu()
        for i, s, js in layout:
            for k, j in enumerate(js):
                p = patches[j]
                out.append({"item": i, "site": p.site, "group": p.group, "position": p.position,
                            "metric": float(metric[s + 2 + k]), "base_metric": float(metric[s + 1]),
                            "source_metric": float(metric[s])})
        bar.update(len(take))
    bar.close()
    return pd.DataFrame(out)


def restoration(df: pd.DataFrame, direction: str) -> pd.DataFrame:
    """Per (site, group): normalised restoration (see module doc), from item means.

    ``direction``: ``"denoise"`` (base = corrupt, source = clean) or ``"noise"`` (base = clean,
    source = corrupt). Columns: site, group, restoration, patched, clean, corrupt, n_items.
    """
    g = df.groupby(["site", "group"], sort=False)[["metric", "base_metric", "source_metric"]].mean()
    if direction == "denoise":
        clean, corrupt = g["source_metric"], g["base_metric"]
        r = (g["metric"] - corrupt) / (clean - corrupt)
    elif direction == "noise":
        clean, corrupt = g["base_metric"], g["source_metric"]
        r = (clean - g["metric"]) / (clean - corrupt)
    else:
        raise SpatialBiasError(f"direction {direction!r}: use 'denoise' or 'noise'")
    res = pd.DataFrame({"restoration": r, "patched": g["metric"], "clean": clean, "corrupt": corrupt})
    res["n_items"] = df.groupby(["site", "group"], sort=False)["item"].nunique()
    res["direction"] = direction
    return res.reset_index()


def default_patches(lvlm: LVLM, groups: Sequence[str] = ("target", "image", "text", "last")) -> list[Patch]:
    """Vision blocks and projector (``all``), then every LM block output × ``groups``."""
    a, m = lvlm.adapter, lvlm.model
    out = [Patch(f"vision.blocks.{i}") for i in range(a.layer_count(m, "vision"))]
    out.append(Patch("projector"))
    out += [Patch("lm.input", g) for g in groups]
    out += [Patch(f"lm.blocks.{i}", g) for i in range(a.layer_count(m, "lm")) for g in groups]
    return out
