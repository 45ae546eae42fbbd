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

from interp.batch import concat, select_rows
from interp.dispatch import forward, then
from interp.errors import SpatialBiasError
from interp.interventions import Intervention
from interp.model import LVLM
from interp.sites import resolve

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
    """(B, L) bool masks of every token group; ``targets[b]``: the target cells of row b (in every
    image of the row)."""
    batch = lvlm.batch(inputs)
    imap = imap if imap is not None else batch.imap
    mask = batch["attention_mask"].bool()
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


def _check_site(lvlm: LVLM, site: str):
    s = resolve(lvlm.adapter, lvlm.model, site)
    if s.canonical == "lm.rotary":
        raise SpatialBiasError("lm.rotary cannot be activation-patched; use position-id patching (PositionSwap)")
    if s.tokens is None or s.canonical == "unembed":
        raise SpatialBiasError(f"{site} has no token axis to patch; patch a residual, attention, MLP, head, "
                               "vision or projector site")
    return s


def site_groups(lvlm: LVLM, batch, site: str, targets: Sequence[Sequence[int]],
                grid: tuple[int, int] = (3, 3)) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The token groups of a site, read from the site's own token order.

    Returns ((B, T) flat indices of each row's T tokens in the site's order, {group: (B, T) bool}).
    LM sites have every group of :func:`group_masks` (T = L); vision-side sites (vision blocks,
    ``vision.out``, the projector) have ``all``, ``image`` (every token of the row's images) and
    ``target`` (patches whose cell is one of the row's targets on that site's patch grid).
    """
    s = _check_site(lvlm, site)
    smap = lvlm.token_map(batch, site)
    B = batch.rows
    rows = [(smap.batch_row == b).nonzero().flatten() for b in range(B)]
    if len({len(r) for r in rows}) > 1:
        raise SpatialBiasError(f"rows hold different numbers of tokens at {site}; patch rows of the same image size")
    idx = torch.stack(rows) if rows else torch.zeros(0, 0, dtype=torch.long)
    if s.tokens == "lm":
        return idx, group_masks(lvlm, batch, targets, grid=grid)
    cells = smap.cells(*grid)[idx]
    tgt = torch.zeros_like(idx, dtype=torch.bool)
    for b, ts in enumerate(targets):
        tgt[b] = torch.isin(cells[b], torch.as_tensor(list(ts), dtype=cells.dtype, device=cells.device))
    every = torch.ones_like(idx, dtype=torch.bool)
    return idx, {"all": every, "image": every.clone(), "target": tgt}


def _selection(idx: torch.Tensor, masks: dict, row: int, patch: "Patch") -> torch.Tensor:
    """(n,) flat token indices of ``patch``'s tokens of ``row``, in the site's order."""
    if patch.position is not None:
        if not 0 <= patch.position < idx.shape[1]:
            raise SpatialBiasError(f"position {patch.position} does not exist at {patch.site} "
                                   f"({idx.shape[1]} positions per row)")
        return idx[row, patch.position:patch.position + 1]
    if patch.group not in masks:
        raise SpatialBiasError(f"group {patch.group!r} is not defined at {patch.site} (a vision-side site); use "
                               f"{', '.join(masks)}")
    return idx[row][masks[patch.group][row]]


def run_patches(lvlm: LVLM, base: dict[str, torch.Tensor], source: dict[str, torch.Tensor], patches: Sequence[Patch],
                correct: torch.Tensor, candidates: Sequence[int], targets: Sequence[Sequence[int]],
                interventions: Sequence[Intervention] = (), batch_size: int = 32,
                progress: bool = False, grid: tuple[int, int] = (3, 3)) -> pd.DataFrame:
    """Metric (answer logit difference) of every patch on every item.

    Args:
        base, source: inputs with N rows (row i of both: item i in two placements, same prompt;
            any number of images per row, the same in both).
        patches: the (site, group) patches. LM sites take every group; vision-side sites
            (vision blocks, ``vision.out``, the projector) take ``all``, ``image`` and ``target``,
            whose cells are read from the site's own token order (:meth:`LVLM.token_map`).
        correct: (N,) correct answer token per item; candidates: the answer token ids.
        targets: per item, the target's cells (both placements), row-major on ``grid``; the
            ``target`` group needs one image per row.
        interventions: applied to every row (so patching runs on the BaPA/AGCI graph too).
    Returns:
        one row per (item, patch) with ``metric``, plus ``base_metric`` and ``source_metric``
        (the unpatched rows of the same forward).
    """
    base, source = lvlm.batch(base), lvlm.batch(source)
    N = base.rows
    if source["input_ids"].shape != base["input_ids"].shape or source.images_per_row != base.images_per_row:
        raise SpatialBiasError("base and source must have the same shape and images per row (same prompts)")
    if len(targets) != N or correct.shape[0] != N:
        raise SpatialBiasError(f"{N} rows but {len(targets)} target lists and {correct.shape[0]} answers")
    sites = {p.site: _check_site(lvlm, p.site) for p in patches}
    if any(p.group == "target" and p.position is None for p in patches):
        base.need_one_image_per_row("the 'target' token group")
    # work units: (item, slice of patches) of at most batch_size − 2 patches (+ source and base rows)
    per_unit = max(1, batch_size - 2)
    units = [(i, list(range(j, min(len(patches), j + per_unit)))) for i in range(N)
             for j in range(0, len(patches), per_unit)]
    both = concat(lvlm, base, source)
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
        chunk, iv_edits = lvlm.prepare(select_rows(lvlm, both, rows), interventions)
        row_targets = [targets[i] for i, s, js in layout for _ in range(2 + len(js))]
        groups = {site: site_groups(lvlm, chunk, site, row_targets, grid) for site in sites}
        ops: dict[str, tuple[list, list]] = {}
        for i, s, js in layout:
            for k, j in enumerate(js):
                p = patches[j]
                src = _selection(*groups[p.site], s, p)
                dst = _selection(*groups[p.site], s + 2 + k, p)
                if len(src) != len(dst):
                    raise SpatialBiasError(f"rows of item {i} hold different token layouts at {p.site}; patching "
                                           "needs placements of the same prompt and image size")
                d, sr = ops.setdefault(p.site, ([], []))
                d.append(dst)
                sr.append(src)
        edits = then(iv_edits, {site: (lambda x, n=groups[site][0].numel(), d=torch.cat(d), sr=torch.cat(sr):
                                       _copy(x, n, d, sr)) for site, (d, sr) in ops.items()})
        with torch.no_grad():
            logits = forward(lvlm, chunk, edits=edits, last_only=True).logits[:, -1]
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


def _copy(x: torch.Tensor, n: int, dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Copy tokens ``src`` onto tokens ``dst`` of ``x`` viewed as (n, …) (the site's token axis).
    In place when no graph is recorded (the module's fresh output feeds only the next module),
    else on a clone."""
    if x.requires_grad:
        x = x.clone()
    x = x.contiguous()
    view = x.view(n, -1)
    view[dst.to(x.device)] = view[src.to(x.device)]
    return x


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
