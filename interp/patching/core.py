"""What every patching scheme shares: a :class:`Patch` (site, token group, position), the token
groups (:data:`GROUPS`) and their masks per site, the metric (answer logit difference), the
restoration table, the default patches, and the row / edit helpers of the batched forwards.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import pandas as pd
import torch

from interp.dispatch import then
from interp.model import LVLM
from interp.sites import resolve
from spatialbias.errors import SpatialBiasError


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
    correct = correct.to(lg.device)
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


def _row(i: int, p: Patch, metric: float, base_metric: float, source_metric: float) -> dict:
    return {"item": i, "site": p.site, "group": p.group, "position": p.position, "metric": float(metric),
            "base_metric": float(base_metric), "source_metric": float(source_metric)}


def _copy_edits(groups: dict, copies: list[tuple["Patch", int, int]], lvlm: LVLM | None = None,
                input_ids: torch.Tensor | None = None) -> dict:
    """Edits copying, for every (patch, source row, patched row), the patch's tokens of the source
    row onto the patched row, at the patch's site (within one forward). With ``lvlm`` and the
    forward's ``input_ids``, an LM-side patch's image tokens also take the source's features of
    the injections still to come (:func:`injection_edits`), and a ``projector`` patch's tokens
    take the source's features of every injection (an injection site holds its tokens in the
    projector's order: Qwen3-VL's DeepStack mergers and its merger both emit merged raster order);
    a residual patch's tokens also take the source's per-token inputs of the blocks still to come
    (:func:`carried_sites`)."""
    ops: dict[str, tuple[list, list]] = {}
    kv_ops: dict[int, tuple[list, list]] = {}
    moves, sizes = [], {}
    for p, src_row, dst_row in copies:
        src = _selection(*groups[p.site], src_row, p)
        dst = _selection(*groups[p.site], dst_row, p)
        if len(src) != len(dst):
            raise SpatialBiasError(f"rows hold different token layouts at {p.site}; patching needs placements of "
                                   "the same prompt and image size")
        d, sr = ops.setdefault(p.site, ([], []))
        d.append(dst)
        sr.append(src)
        k0 = injection_start(lvlm, p.site) if lvlm is not None else None
        if k0 is not None:
            moves.append((src, dst, k0))
            for site in carried_sites(lvlm, p.site):  # per-token block inputs: the LM token layout too
                d, sr = ops.setdefault(site, ([], []))
                d.append(dst)
                sr.append(src)
                sizes[site] = groups[p.site][0].numel()
            for k in carried_kv(lvlm, p.site):  # keys and values made before the patch, read after it
                d, sr = kv_ops.setdefault(k, ([], []))
                d.append(dst)
                sr.append(src)
        elif lvlm is not None and p.site == "projector":  # the injections' tokens are in the projector's order
            for site in lvlm.adapter.injections(lvlm.model).values():
                d, sr = ops.setdefault(site, ([], []))
                d.append(dst)
                sr.append(src)
                sizes[site] = groups["projector"][0].numel()
    sizes.update({site: groups[site][0].numel() for site in ops if site in groups})
    edits = {site: (lambda x, n=sizes[site], d=torch.cat(d), sr=torch.cat(sr): _copy(x, n, d, sr))
             for site, (d, sr) in ops.items()}
    for k, (d, sr) in kv_ops.items():
        site, fn = lvlm.adapter.reused_kv_edit(lvlm.model, k, lambda x, d=torch.cat(d), sr=torch.cat(sr): _copy_kv(x, d, sr))
        edits = then(edits, {site: fn})
    if not moves:
        return edits
    return then(edits, injection_edits(lvlm, input_ids, moves))


def injection_start(lvlm: LVLM, site: str) -> int | None:
    """The first of the adapter's injections (:meth:`~interp.adapters.Adapter.injections`: added
    after LM block k) that a patch at ``site`` comes before: 0 at ``lm.input``, j at every site of
    LM block j (its input, its output — taken before the addition after block j — and its
    sub-layers); None elsewhere (vision side, ``lm.embed``, after the last block)."""
    s = resolve(lvlm.adapter, lvlm.model, site)
    if s.canonical == "lm.input":
        return 0
    m = re.match(r"lm\.blocks\.(\d+)([.#]|$)", s.canonical)
    return int(m.group(1)) if m else None


def carried_sites(lvlm: LVLM, site: str) -> list[str]:
    """The per-token block inputs (:meth:`~interp.adapters.Adapter.carried`, LM token layout) that a
    patch at ``site`` carries: a patch of the stream between blocks — ``lm.blocks.{j}`` (those of
    blocks j + 1…), ``lm.blocks.{j}#input`` (blocks j…) — and none for a patch of one component
    (attention, MLP, heads), which changes that output only, nor at ``lm.input``, from which the
    model derives them itself. [] on most architectures."""
    first = _stream_start(lvlm, site) if lvlm.adapter.token_inputs(lvlm.model) else None
    return [] if first is None else lvlm.adapter.carried(lvlm.model, first)


def carried_kv(lvlm: LVLM, site: str) -> list[int]:
    """The blocks that reuse keys and values (:meth:`~interp.adapters.Adapter.kv_sources`) made
    before a patch of the stream at ``site`` (``lm.blocks.{j}``: by blocks ≤ j; ``#input``: < j) and
    run after it: their keys and values at the patched tokens move with the patch, as everything a
    later block reads of those tokens does. [] elsewhere and on most architectures."""
    sources = lvlm.adapter.kv_sources(lvlm.model)
    first = _stream_start(lvlm, site) if sources else None
    return [] if first is None else [k for k, s in sources.items() if k >= first and s < first]


def _stream_start(lvlm: LVLM, site: str) -> int | None:
    """The first LM block after a patch of the stream between blocks at ``site``: j + 1 at
    ``lm.blocks.{j}``, j at ``lm.blocks.{j}#input``; None at every other site."""
    m = re.fullmatch(r"lm\.blocks\.(\d+)(#input)?", resolve(lvlm.adapter, lvlm.model, site).canonical)
    return None if m is None else int(m.group(1)) + (0 if m.group(2) else 1)


def _copy_kv(x: torch.Tensor, dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Tokens ``src`` copied onto ``dst`` (flat row · L + position indices) of keys or values
    (B, kv_heads, L, head_dim); a new tensor."""
    B, H, L, E = x.shape
    t = x.transpose(1, 2).reshape(B * L, H * E).clone()
    t[dst.to(x.device)] = t[src.to(x.device)]
    return t.view(B, L, H, E).transpose(1, 2).contiguous()


def injection_edits(lvlm: LVLM, input_ids: torch.Tensor, moves: list[tuple[torch.Tensor, torch.Tensor, int]]
                    ) -> dict:
    """Edits carrying the adapter's injections (Qwen3-VL's DeepStack features) with LM-side
    patches, so that a patched image token gets the source's later vision features with its
    residual: for every (src, dst, k0) — (n,) flat (row · L + position) LM token indices of
    ``input_ids`` (B, L), token ``src[i]`` moving onto ``dst[i]``, and the first injection the patch
    comes before (:func:`injection_start`) — the features of every injection k ≥ k0 at the image
    tokens among them are copied from source to destination. An injection site holds the batch's
    image tokens flattened in sequence order, (T, D); {} where the adapter declares none."""
    inj = lvlm.adapter.injections(lvlm.model)
    if not inj:
        return {}
    mask = lvlm.image_mask(input_ids).flatten().cpu()
    ordinal = mask.long().cumsum(0) - 1
    ops: dict[str, tuple[list, list]] = {}
    for src, dst, k0 in moves:
        src, dst = src.cpu(), dst.cpu()
        keep = mask[src] & mask[dst]
        for k, site in inj.items():
            if k >= k0 and keep.any():
                d, sr = ops.setdefault(site, ([], []))
                d.append(ordinal[dst[keep]])
                sr.append(ordinal[src[keep]])
    n = int(mask.sum())
    return {site: (lambda x, d=torch.cat(d), sr=torch.cat(sr): _copy(x, n, d, sr)) for site, (d, sr) in ops.items()}


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
