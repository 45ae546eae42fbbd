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

import re
from dataclasses import dataclass
from typing import Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from interp.batch import concat, select_rows
from interp.dispatch import RESUMABLE_IMPLS, capture_lm, forward, then
from interp.dispatch import resume as resume_lm
from spatialbias.errors import SpatialBiasError
from interp.interventions import Intervention
from interp.interventions.base import lm_input_edit
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


def run_patches(lvlm: LVLM, base: dict[str, torch.Tensor], source: dict[str, torch.Tensor], patches: Sequence[Patch],
                correct: torch.Tensor, candidates: Sequence[int], targets: Sequence[Sequence[int]],
                interventions: Sequence[Intervention] = (), batch_size: int = 32,
                progress: bool = False, grid: tuple[int, int] = (3, 3), resume: bool | None = None) -> pd.DataFrame:
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
        batch_size: rows per forward (the unpatched runs of ⌊batch_size/2⌋ items, or resumed rows).
        resume: how residual-stream patches (``lm.input``, ``lm.blocks.{i}``) and patches before
            the LM (vision blocks, projector) run. True: resumed (:func:`_resumed_patches`: one
            unpatched run per item records every block's input; a patch at block ℓ then runs blocks
            ℓ+1… only, over the positions from its first patched one on); False: one full forward
            per patch row (the reference scheme); None (default): resumed, unless the model or an
            intervention cannot be resumed exactly (checked per chunk: a resumed unpatched row must
            give the run's own logits), then full.
    Returns:
        one row per (item, patch) with ``metric``, plus ``base_metric`` and ``source_metric``
        (the unpatched rows); ``df.attrs["engine"]`` says which scheme ran ("resumed" or "full").
    """
    base, source = lvlm.batch(base), lvlm.batch(source)
    N = base.rows
    if source["input_ids"].shape != base["input_ids"].shape or source.images_per_row != base.images_per_row:
        raise SpatialBiasError("base and source must have the same shape and images per row (same prompts)")
    if len(targets) != N or correct.shape[0] != N:
        raise SpatialBiasError(f"{N} rows but {len(targets)} target lists and {correct.shape[0]} answers")
    for p in patches:
        _check_site(lvlm, p.site)
    if any(p.group == "target" and p.position is None for p in patches):
        base.need_one_image_per_row("the 'target' token group")
    if batch_size < 3:
        raise SpatialBiasError(f"batch_size={batch_size}: patching needs at least 3 rows per forward (source, base, "
                               "one patched row)")
    both = concat(lvlm, base, source)
    job = (lvlm, both, N, patches, correct, candidates, targets, interventions, batch_size, progress, grid)
    why = None if resume is False else _not_resumable(lvlm, patches, interventions, both)
    if resume is True and why:
        raise SpatialBiasError(f"resume=True: {why}; use resume=None (falls back to full forwards) or False")
    out = _resumed_patches(*job, strict=resume is True) if why is None and resume is not False else None
    engine = "resumed"
    if out is None:
        out, engine = _full_patches(*job), "full"
    df = pd.DataFrame(out)
    df.attrs["engine"] = engine
    return df


def _row(i: int, p: Patch, metric: float, base_metric: float, source_metric: float) -> dict:
    return {"item": i, "site": p.site, "group": p.group, "position": p.position, "metric": float(metric),
            "base_metric": float(base_metric), "source_metric": float(source_metric)}


def _full_patches(lvlm, both, N, patches, correct, candidates, targets, interventions, batch_size, progress,
                  grid) -> list[dict]:
    """The reference scheme: forwards of at most ``batch_size`` rows; each item (or slice of its
    patches) contributes its source row, its unpatched base row and one base row per patch, and
    every edit copies from that source row inside the same forward (the source row is never
    edited, so it holds the source activations)."""
    sites = {p.site for p in patches}
    per_unit = max(1, batch_size - 2)
    units = [(i, list(range(j, min(len(patches), j + per_unit)))) for i in range(N)
             for j in range(0, len(patches), per_unit)]
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
        copies = [(p, s, s + 2 + k) for i, s, js in layout for k, p in enumerate(patches[j] for j in js)]
        edits = then(iv_edits, _copy_edits(groups, copies))
        with torch.no_grad():
            logits = forward(lvlm, chunk, edits=edits, last_only=True).logits[:, -1]
        corr = torch.cat([correct[i].repeat(2 + len(js)) for i, s, js in layout]).to(logits.device)
        metric = logit_diff(logits, corr, candidates).cpu()
        for i, s, js in layout:
            for k, j in enumerate(js):
                out.append(_row(i, patches[j], metric[s + 2 + k], metric[s + 1], metric[s]))
        bar.update(len(take))
    bar.close()
    return out


def _copy_edits(groups: dict, copies: list[tuple["Patch", int, int]]) -> dict:
    """Edits copying, for every (patch, source row, patched row), the patch's tokens of the source
    row onto the patched row, at the patch's site (within one forward)."""
    ops: dict[str, tuple[list, list]] = {}
    for p, src_row, dst_row in copies:
        src = _selection(*groups[p.site], src_row, p)
        dst = _selection(*groups[p.site], dst_row, p)
        if len(src) != len(dst):
            raise SpatialBiasError(f"rows hold different token layouts at {p.site}; patching needs placements of "
                                   "the same prompt and image size")
        d, sr = ops.setdefault(p.site, ([], []))
        d.append(dst)
        sr.append(src)
    return {site: (lambda x, n=groups[site][0].numel(), d=torch.cat(d), sr=torch.cat(sr): _copy(x, n, d, sr))
            for site, (d, sr) in ops.items()}


# ------------------------------------------------------------------------------------------------
# the resumed scheme


_SAFE_EDIT_SITES = re.compile(r"^(vision\..*|projector|lm\.embed|lm\.input|lm\.rotary(@.*)?|lm\.blocks\.\d+#\w+)$")
"""Sites an intervention may edit for a resumed run to stay exact: everything before block 0,
and block inputs that :func:`interp.dispatch.capture_lm` records after the edit (masks, rotary)."""


def _kind(lvlm: LVLM, site: str) -> tuple[str, int]:
    """("residual", start block) for ``lm.input`` / ``lm.blocks.{i}``; ("pre", 0) for sites before
    the LM (vision side, projector, ``lm.embed``); ("other", -1) for the rest (sub-block sites)."""
    s = resolve(lvlm.adapter, lvlm.model, site)
    if s.canonical == "lm.input":
        return "residual", 0
    m = re.fullmatch(r"lm\.blocks\.(\d+)", s.canonical)
    if m and s.hook == "output" and s.call is None:
        return "residual", int(m.group(1)) + 1
    if s.tokens == "vision" or s.canonical == "lm.embed":
        return "pre", 0
    return "other", -1


def _not_resumable(lvlm: LVLM, patches, interventions, both) -> str | None:
    """Why the resumed scheme cannot run here (None: it can)."""
    impl = lvlm.model.config.text_config._attn_implementation
    if impl not in RESUMABLE_IMPLS:
        return f"the {impl!r} attention implementation takes no tensor mask to slice"
    if lvlm.adapter.rope_kind(lvlm.model) == "none":
        return "an LM without rotary embeddings (learned positions) is resumed by no recorded input"
    if not any(_kind(lvlm, p.site)[0] != "other" for p in patches):
        return "no patch is at lm.input, an LM block output or before the LM"
    _, edits = lvlm.prepare(select_rows(lvlm, both, [0]), interventions)
    bad = [e for e in edits if not _SAFE_EDIT_SITES.match(e)]
    if bad:
        return f"an intervention edits {bad[0]} inside the LM blocks, which a resumed run does not re-apply"
    return None


def _resumed_patches(lvlm, both, N, patches, correct, candidates, targets, interventions, batch_size, progress,
                     grid, strict: bool = False) -> list[dict] | None:
    """Residual and pre-LM patches by resuming (other patches: :func:`_full_patches`).

    Per chunk of ⌊batch_size/2⌋ items, one forward over their source and base rows records every
    block's input (:func:`interp.dispatch.capture_lm`: residual stream, masks, rotary, keys and
    values). A patch of positions G at ``lm.blocks.ℓ`` (``lm.input``: ℓ = −1) then starts from the
    base residual after block ℓ with the source's at G and runs blocks ℓ+1… over positions
    p… only, where p is the first position of G moved back to the start of any bidirectional
    span it falls in (:meth:`LMStates.prefix`): earlier positions are unchanged (causal attention),
    so their keys and values are the base run's. Patches before the LM run the vision side and the
    embedding scatter only (the forward stops at ``lm.input``), then resume from block 0 from the
    first position where their LM input differs from the base's. A patched start that equals the
    source's (every differing token patched, e.g. ``all`` at a block) or the base's (nothing
    changed) takes that run's metric, when the two rows give the blocks equal masks and rotary.
    Returns None when the first chunk's check fails (a resumed unpatched row must reproduce the
    run's logits) and ``strict`` is off."""
    kinds = [_kind(lvlm, p.site) for p in patches]
    rest = [j for j, (k, _) in enumerate(kinds) if k == "other"]
    out: dict[tuple[int, int], dict] = {}
    if rest:
        full = _full_patches(lvlm, both, N, [patches[j] for j in rest], correct, candidates, targets, interventions,
                             batch_size, False, grid)
        for n, r in enumerate(full):  # item-major, then patch order
            out[(n // len(rest), rest[n % len(rest)])] = r
    per = max(1, batch_size // 2)
    chunks = [list(range(a, min(N, a + per))) for a in range(0, N, per)]
    bar = tqdm(total=N, desc="patching", unit="item", disable=not progress)
    pre = [j for j, (k, _) in enumerate(kinds) if k == "pre"]
    res = [j for j, (k, _) in enumerate(kinds) if k == "residual"]
    for items in chunks:
        c = len(items)
        rows = [N + i for i in items] + list(items)  # sources, then bases
        chunk, iv_edits = lvlm.prepare(select_rows(lvlm, both, rows), interventions)
        with torch.no_grad():
            _, st = capture_lm(lvlm, chunk, edits=iv_edits)
            m = logit_diff(st.logits, correct[items].repeat(2), candidates).cpu()
            if not _resume_check(lvlm, st, c, chunk):
                if strict:
                    raise SpatialBiasError("resume=True: resuming an unpatched row does not reproduce the model's "
                                           "logits on this model; use resume=None or False")
                return None
            src_m, base_m = m[:c], m[c:]
            row_targets = [targets[i] for i in items] * 2
            groups = {p.site: site_groups(lvlm, chunk, p.site, row_targets, grid) for j, p in enumerate(patches)
                      if kinds[j][0] == "residual"}
            L = chunk["input_ids"].shape[1]
            run = (lvlm, st, batch_size, correct, candidates, items, patches, src_m, base_m, out)
            if pre:  # run as they come: at most one forward's rows of patched LM inputs held at once
                _pre_jobs(lvlm, st, both, N, interventions, items, [patches[j] for j in pre], pre, targets, grid,
                          batch_size, run)
            jobs = []
            for a, i in enumerate(items):
                for j in res:
                    p, s = patches[j], kinds[j][1]
                    pos = _selection(*groups[p.site], c + a, p) % L  # token positions in the row
                    jobs.append(_residual_job(st, a, c, s, pos, j, src_m, base_m, out, i, p))
            _run_jobs(*run[:2], [j for j in jobs if j is not None], *run[2:])
        bar.update(c)
    bar.close()
    return [out[(i, j)] for i in range(N) for j in range(len(patches))]


def _residual_job(st, a: int, c: int, start: int, pos: torch.Tensor, j: int, src_m, base_m, out, item: int,
                  patch: Patch):
    """Patch ``pos`` (token positions) of base row ``c + a`` with source row ``a`` at the residual
    entering block ``start``: a resumed job (p, start, a, j, None, pos), or None when the patched
    residual is the source's or the base's own (its metric is then that run's). Nothing of size L
    is kept per job: the residual is built when its batch runs. After the last block (``start`` = N)
    only the last position reaches the logits."""
    base, src = st.residual[start][c + a], st.residual[start][a]
    differs = (base != src).any(-1)  # (L,) positions where the two runs' residuals differ
    patched = torch.zeros_like(differs)
    patched[pos.to(differs.device)] = True
    used = torch.zeros_like(differs)
    used[-1 if start == st.layers else slice(None)] = True
    if not (differs & used & ~patched).any() and st.same_inputs(a, c + a, start):
        out[(item, j)] = _row(item, patch, src_m[a], base_m[a], src_m[a])
        return None
    changed = (differs & patched & used).nonzero().flatten()
    if not len(changed):
        out[(item, j)] = _row(item, patch, base_m[a], base_m[a], src_m[a])
        return None
    return (st.prefix(c + a, int(changed[0])), start, a, j, None, changed)


def _pre_jobs(lvlm, st, both, N: int, interventions, items, pre_patches, pre_idx, targets, grid, batch_size,
              run) -> None:
    """Patches before the LM: forwards of source rows and patched base rows (prepared afresh from
    the unprepared inputs ``both``) that stop once ``lm.input`` is recorded (vision side,
    projector, embedding scatter); each forward's patched rows are then resumed from block 0 from
    the first position where their LM input differs from the base's (or take the source's / base's
    metric when it equals theirs)."""
    c = len(items)
    src_m, base_m, out = run[-3:]
    units = [(a, k) for a in range(c) for k in range(len(pre_patches))]
    per = max(1, batch_size - c)
    sites = {p.site for p in pre_patches}
    for u0 in range(0, len(units), per):
        take = units[u0:u0 + per]
        srcs = sorted({a for a, _ in take})
        rows = [N + items[a] for a in srcs] + [items[a] for a, _ in take]  # sources, then patched bases
        sub, iv_edits = lvlm.prepare(select_rows(lvlm, both, rows), interventions)
        sub_targets = [targets[items[a]] for a in srcs] + [targets[items[a]] for a, _ in take]
        groups = {site: site_groups(lvlm, sub, site, sub_targets, grid) for site in sites}
        copies = [(pre_patches[k], srcs.index(a), len(srcs) + n) for n, (a, k) in enumerate(take)]
        with torch.no_grad():
            t = forward(lvlm, sub, edits=then(iv_edits, _copy_edits(groups, copies)), cache=["lm.input"], stop=True)
        x = t.cache["lm.input"]
        jobs = []
        for n, (a, k) in enumerate(take):
            h = x[len(srcs) + n].to(st.residual[0].device)
            i, j, p = items[a], pre_idx[k], pre_patches[k]
            base = st.residual[0][c + a]
            if (torch.equal(h, x[srcs.index(a)].to(h.device)) or torch.equal(h, st.residual[0][a])) \
                    and st.same_inputs(a, c + a, 0):
                out[(i, j)] = _row(i, p, src_m[a], base_m[a], src_m[a])
                continue
            changed = (h != base).any(-1).nonzero().flatten()
            if not len(changed):
                out[(i, j)] = _row(i, p, base_m[a], base_m[a], src_m[a])
                continue
            jobs.append((st.prefix(c + a, int(changed[0])), 0, a, j, h, None))
        del t, x
        _run_jobs(*run[:2], jobs, *run[2:])


def _run_jobs(lvlm, st, jobs, batch_size, correct, candidates, items, patches, src_m, base_m, out) -> None:
    """Resumed runs of ``jobs`` in batches of at most ``batch_size`` rows: jobs sorted by their first
    position p, a batch closed when the next job's suffix (L − p) is under half the batch's (rows of
    a batch all run from its smallest p, so a ``last``-token job never pays for an ``image`` one)."""
    L = st.residual[0].shape[1]
    jobs = sorted(jobs, key=lambda jb: (jb[0], jb[1]))
    batches, cur = [], []
    for jb in jobs:
        if cur and (len(cur) == batch_size or 2 * (L - jb[0]) < L - cur[0][0]):
            batches.append(cur)
            cur = []
        cur.append(jb)
    if cur:
        batches.append(cur)
    c = len(items)
    for batch in batches:
        batch = sorted(batch, key=lambda jb: jb[1])
        p = min(jb[0] for jb in batch)
        rows = torch.tensor([c + jb[2] for jb in batch])
        hidden = torch.stack([_hidden(st, c, jb, p) for jb in batch])
        logits = resume_lm(lvlm, st, rows, torch.tensor([jb[1] for jb in batch]), hidden, p)
        corr = torch.stack([correct[items[jb[2]]] for jb in batch])
        metric = logit_diff(logits, corr, candidates).cpu()
        for jb, v in zip(batch, metric):
            a, j = jb[2], jb[3]
            out[(items[a], j)] = _row(items[a], patches[j], v, base_m[a], src_m[a])


def _hidden(st, c: int, job, p: int) -> torch.Tensor:
    """(L − p, D): a job's residual entering its start block, positions p…: the patched LM input it
    carries, or the base residual with the source's at its changed positions."""
    _, start, a, _, h, pos = job
    if h is not None:
        return h[p:]
    x = st.residual[start][c + a][p:].clone()
    pos = pos.to(x.device)
    x[pos - p] = st.residual[start][a][pos]
    return x


def _resume_check(lvlm, st, c: int, chunk) -> bool:
    """Resume the first base row from block 0 with its own LM input for its last two positions
    (every block: the masks sliced to two queries, rotary, the reused keys and values, the head):
    the logits must be the run's own (fp32: within 1e-4 relative; half types: 2e-2), else resuming
    is not exact on this model. Costs two positions of one row."""
    L = chunk["input_ids"].shape[1]
    p = st.prefix(c, max(0, L - 2))
    h = st.residual[0][c:c + 1, p:]
    got = resume_lm(lvlm, st, torch.tensor([c]), torch.tensor([0]), h, p).float()
    ref = st.logits[c:c + 1].float()
    tol = 1e-4 if st.residual[0].dtype == torch.float32 else 2e-2
    return bool((got - ref.to(got.device)).abs().max() <= tol * (1 + ref.abs().max()))


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


# ------------------------------------------------------------------------------------------------
# the vision-side restoration: the target's image tokens moved, position ids kept


def cell_keys(imap, row: int, cell: int, grid: tuple[int, int] = (3, 3)) -> tuple[torch.Tensor, torch.Tensor]:
    """Row ``row``'s image tokens in ``cell``: ((k,) sequence positions, (k, 3) keys (view,
    row in cell, col in cell)), sorted by key (stably): each view's patch coordinates measured
    from that view's top-left patch of the cell, so two cells' tokens of the same view and
    relative place get the same key whatever the LM's token order."""
    cells = imap.cells(*grid)[row]
    pos = (cells == cell).nonzero().flatten()
    if not len(pos):
        return pos, torch.zeros(0, 3, dtype=torch.long, device=pos.device)
    view, r, c = imap.view[row][pos], imap.row[row][pos], imap.col[row][pos]
    for v in view.unique():
        sel = view == v
        r[sel] -= r[sel].min()
        c[sel] -= c[sel].min()
    keys = torch.stack([view, r, c], 1)
    flat = torch.zeros_like(pos)
    for part in keys.T:
        flat = flat * (int(part.max()) + 1) + part  # lexicographic: view, then row, then col
    order = flat.argsort(stable=True)
    return pos[order], keys[order]


def moved_slots(imap, src_row: int, dst_row: int, src_cell: int, dst_cell: int,
                grid: tuple[int, int] = (3, 3)) -> tuple[torch.Tensor, torch.Tensor]:
    """((k,) source positions, (k,) destination positions): token ``src[i]`` of ``src_cell`` in row
    ``src_row`` moves onto token ``dst[i]`` of ``dst_cell`` in row ``dst_row``, the one of the same
    view and the same place inside its cell. Refuses (one line) unless the two cells' keys match
    one to one."""
    src, ks = cell_keys(imap, src_row, src_cell, grid)
    dst, kd = cell_keys(imap, dst_row, dst_cell, grid)
    if not len(src) or ks.shape != kd.shape or not torch.equal(ks, kd):
        raise SpatialBiasError(f"cells {src_cell} and {dst_cell} hold {len(src)} and {len(dst)} image tokens of "
                               "different (view, row, col) layouts; moving the target needs cells of one shape in "
                               f"every view (a grid {grid} that divides each view's patch grid evenly)")
    return src, dst


def run_moved(lvlm: LVLM, base: dict[str, torch.Tensor], source: dict[str, torch.Tensor], base_cell: int,
              source_cell: int, correct: torch.Tensor, candidates: Sequence[int],
              interventions: Sequence[Intervention] = (), batch_size: int = 32,
              grid: tuple[int, int] = (3, 3)) -> pd.DataFrame:
    """The target's image tokens moved between placements at ``lm.input``, position ids kept.

    Row i of ``source`` holds item i's target at ``source_cell`` (the good, clean cell) and row i
    of ``base`` the same item at ``base_cell`` (the bad, corrupt cell). The patched run is the base
    row with its LM input at ``base_cell``'s image-token slots, (k, D), replaced by the source
    row's LM input at ``source_cell``'s slots, each token onto the one of the same view and the
    same place inside its cell (:func:`moved_slots`; refused when the cells' shapes differ): the content as the
    vision tower and projector produced it at the good cell, read by the LM at the bad cell's
    sequence slots and position ids (the base row's prepared inputs, interventions included,
    are otherwise unchanged). Each forward holds, per item, its source row, its unpatched base
    row and its patched row; the edit copies from the source row of the same forward.

    On an LM with learned absolute positions (GPT-2), whose ``lm.input`` already holds the
    position embeddings, the moved tokens are the source's ``lm.input`` minus the source slots'
    position embeddings plus the base slots' (``lm.positions``, recorded in the same forward),
    so the position ids stay the base row's there too.

    Returns one row per item: ``metric`` (patched), ``base_metric``, ``source_metric`` (answer
    logit differences); denoising restoration is (metric − base) / (source − base).
    """
    base, source = lvlm.batch(base), lvlm.batch(source)
    N = base.rows
    if source["input_ids"].shape != base["input_ids"].shape:
        raise SpatialBiasError("base and source must have the same shape (same prompts)")
    if correct.shape[0] != N:
        raise SpatialBiasError(f"{N} rows but {correct.shape[0]} answers")
    base.need_one_image_per_row("moving the target's image tokens")
    if batch_size < 3:
        raise SpatialBiasError(f"batch_size={batch_size}: the moved patch needs at least 3 rows per forward")
    both = concat(lvlm, base, source)
    per = max(1, batch_size // 3)
    out = []
    for a in range(0, N, per):
        items = list(range(a, min(N, a + per)))
        rows = [r for i in items for r in (N + i, i, i)]  # source, unpatched base, patched base
        chunk, iv_edits = lvlm.prepare(select_rows(lvlm, both, rows), interventions)
        imap = lvlm.batch(chunk).imap
        dst, src = [], []
        L = chunk["input_ids"].shape[1]
        for k in range(len(items)):
            s, d = moved_slots(imap, 3 * k, 3 * k + 2, source_cell, base_cell, grid)
            src.append(s + 3 * k * L)
            dst.append(d + (3 * k + 2) * L)
        n = len(rows) * chunk["input_ids"].shape[1]
        move = _move_edits(lvlm, n, torch.cat(dst), torch.cat(src))
        with torch.no_grad():
            logits = forward(lvlm, chunk, edits=then(iv_edits, move), last_only=True).logits[:, -1]
        corr = torch.cat([correct[i].repeat(3) for i in items]).to(logits.device)
        m = logit_diff(logits, corr, candidates).cpu()
        out += [{"item": i, "metric": float(m[3 * k + 2]), "base_metric": float(m[3 * k + 1]),
                 "source_metric": float(m[3 * k])} for k, i in enumerate(items)]
    return pd.DataFrame(out)


def _move_edits(lvlm: LVLM, n: int, dst: torch.Tensor, src: torch.Tensor) -> dict:
    """Edits copying tokens ``src`` onto tokens ``dst`` of ``lm.input`` viewed as (n, D); with
    learned absolute positions the source slots' position embeddings are swapped for the
    destination slots' (:func:`interp.interventions.base.lm_input_edit`)."""
    def move(x, pos):
        if pos is None:
            return _copy(x, n, dst, src)
        x = x.clone()
        view, p = x.view(n, -1), pos.reshape(n, -1)
        d, s = dst.to(x.device), src.to(x.device)
        view[d] = view[s] - p[s] + p[d]
        return x
    return lm_input_edit(lvlm, move)
