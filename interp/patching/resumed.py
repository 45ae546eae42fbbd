"""The resumed scheme of :func:`interp.patching.run_patches`: residual-stream and pre-LM patches
start from the recorded input of the patched block instead of a full forward
(:func:`_resumed_patches`; :func:`_not_resumable` says when a model or an intervention cannot be
resumed exactly, and the run falls back to full forwards).
"""
from __future__ import annotations

import re

import torch
from tqdm.auto import tqdm

from interp.batch import select_rows
from interp.dispatch import forward, then
from interp.resume import RESUMABLE_IMPLS, capture_lm, injected_at
from interp.resume import resume as resume_lm
from interp.model import LVLM
from interp.patching.core import Patch, _copy_edits, _row, _selection, logit_diff, site_groups
from interp.patching.full import _full_patches
from interp.sites import resolve
from spatialbias.errors import SpatialBiasError


_SAFE_EDIT_SITES = re.compile(r"^(vision\..*|projector|lm\.embed|lm\.input|lm\.rotary(@.*)?|lm\.blocks\.\d+#\w+)$")
"""Sites an intervention may edit for a resumed run to stay exact: everything before block 0,
and block inputs that :func:`interp.resume.capture_lm` records after the edit (masks, rotary)."""


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
    block's input (:func:`interp.resume.capture_lm`: residual stream, masks, rotary, keys and
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
            tok, sources = lvlm.adapter.token_inputs(lvlm.model), lvlm.adapter.kv_sources(lvlm.model)
            for a, i in enumerate(items):
                for j in res:
                    p, s = patches[j], kinds[j][1]
                    pos = _selection(*groups[p.site], c + a, p) % L  # token positions in the row
                    jobs.append(_residual_job(st, a, c, s, pos, j, src_m, base_m, out, i, p, tok, sources))
            _run_jobs(*run[:2], [j for j in jobs if j is not None], *run[2:])
        bar.update(c)
    bar.close()
    return [out[(i, j)] for i in range(N) for j in range(len(patches))]


def _residual_job(st, a: int, c: int, start: int, pos: torch.Tensor, j: int, src_m, base_m, out, item: int,
                  patch: Patch, tok: tuple[str, ...] = (), sources: dict[int, int] | None = None):
    """Patch ``pos`` (token positions) of base row ``c + a`` with source row ``a`` at the residual
    entering block ``start``: a resumed job (p, start, a, j, None, pos), or None when the patched
    residual is the source's or the base's own (its metric is then that run's). Nothing of size L
    is kept per job: the residual is built when its batch runs. After the last block (``start`` = N)
    only the last position reaches the logits. What the text model adds after blocks
    ``start − 1``… (DeepStack) moves with the patched positions (:func:`_injected`), as in the
    full scheme (:func:`interp.patching.core.injection_edits`); so do the per-token block inputs
    ``tok`` of blocks ``start``… (Gemma3n's per-layer inputs: :meth:`Adapter.carried`) and the keys
    and values blocks ``start``… reuse from earlier blocks (``sources``: :meth:`Adapter.kv_sources`)."""
    sources = sources or {}
    base, src = st.residual[start][c + a], st.residual[start][a]
    differs = (base != src).any(-1)  # (L,) positions where the two runs' residuals differ
    for x in st.injected[max(0, start - 1):]:  # or what is still to be added there
        if x is not None:
            differs |= (x[c + a] != x[a]).any(-1).to(differs.device)
    for kw in st.kwargs[start:]:  # or a per-token input of a block still to come
        for name in tok:
            differs |= (kw[name][c + a] != kw[name][a]).any(-1).to(differs.device)
    for s in {s for k, s in sources.items() if k >= start and s < start}:  # or keys a later block reuses
        K, V = st.kv[s]
        differs |= ((K[c + a] != K[a]).any(-1) | (V[c + a] != V[a]).any(-1)).any(0).to(differs.device)
    patched = torch.zeros_like(differs)
    patched[pos.to(differs.device)] = True
    used = torch.zeros_like(differs)
    used[-1 if start == st.layers else slice(None)] = True
    if not (differs & used & ~patched).any() and st.same_inputs(a, c + a, start, injected=False, skip=tok):
        out[(item, j)] = _row(item, patch, src_m[a], base_m[a], src_m[a])
        return None
    changed = (differs & patched & used).nonzero().flatten()
    if not len(changed):
        out[(item, j)] = _row(item, patch, base_m[a], base_m[a], src_m[a])
        return None
    return (st.prefix(c + a, int(changed[0])), start, a, j, None, changed, None)


def _pre_jobs(lvlm, st, both, N: int, interventions, items, pre_patches, pre_idx, targets, grid, batch_size,
              run) -> None:
    """Patches before the LM: forwards of source rows and patched base rows (prepared afresh from
    the unprepared inputs ``both``) that stop once ``lm.input`` is recorded (vision side,
    projector, embedding scatter); each forward's patched rows are then resumed from block 0 from
    the first position where their LM input differs from the base's (or take the source's / base's
    metric when it equals theirs). What the text model adds between blocks (the adapter's
    ``injections``: DeepStack features, computed on the vision side) is recorded by the same
    forwards and resumed with each patched row (a patch before the LM changes it too)."""
    c = len(items)
    src_m, base_m, out = run[-3:]
    units = [(a, k) for a in range(c) for k in range(len(pre_patches))]
    per = max(1, batch_size - c)
    sites = {p.site for p in pre_patches}
    inj = lvlm.adapter.injections(lvlm.model)
    inj_sites = list(dict.fromkeys(inj.values()))
    for u0 in range(0, len(units), per):
        take = units[u0:u0 + per]
        srcs = sorted({a for a, _ in take})
        rows = [N + items[a] for a in srcs] + [items[a] for a, _ in take]  # sources, then patched bases
        sub, iv_edits = lvlm.prepare(select_rows(lvlm, both, rows), interventions)
        sub_targets = [targets[items[a]] for a in srcs] + [targets[items[a]] for a, _ in take]
        groups = {site: site_groups(lvlm, sub, site, sub_targets, grid) for site in sites}
        copies = [(pre_patches[k], srcs.index(a), len(srcs) + n) for n, (a, k) in enumerate(take)]
        with torch.no_grad():
            edits = then(iv_edits, _copy_edits(groups, copies, lvlm, sub["input_ids"]))
            t = forward(lvlm, sub, edits=edits, cache=["lm.input", *inj_sites], stop=True)
        x = t.cache["lm.input"]
        mask = lvlm.image_mask(sub["input_ids"])
        added = {jj: injected_at(t.cache[s], mask, x) for jj, s in inj.items()}  # per block: (rows, L, D)
        jobs = []
        for n, (a, k) in enumerate(take):
            r = len(srcs) + n
            h = x[r].to(st.residual[0].device)
            add = {jj: v[r].to(h.device) for jj, v in added.items()}
            i, j, p = items[a], pre_idx[k], pre_patches[k]
            base = st.residual[0][c + a]
            same_src = all(torch.equal(v, added[jj][srcs.index(a)].to(v.device)) for jj, v in add.items())
            if (torch.equal(h, x[srcs.index(a)].to(h.device)) or torch.equal(h, st.residual[0][a])) and same_src \
                    and st.same_inputs(a, c + a, 0):
                out[(i, j)] = _row(i, p, src_m[a], base_m[a], src_m[a])
                continue
            differs = (h != base).any(-1)
            for jj, v in add.items():  # a vision-side patch changes what DeepStack adds, too
                differs |= (v != st.injected[jj][c + a].to(v.device)).any(-1)
            changed = differs.nonzero().flatten()
            if not len(changed):
                out[(i, j)] = _row(i, p, base_m[a], base_m[a], src_m[a])
                continue
            jobs.append((st.prefix(c + a, int(changed[0])), 0, a, j, h, None, add or None))
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
        hidden = [_hidden(st, c, jb, p) for jb in batch]  # widths differ where lm.input is not block 0's input
        injected = None
        inj = lvlm.adapter.injections(lvlm.model)
        if inj and any(jb[6] or jb[5] is not None for jb in batch):  # patched DeepStack additions
            injected = {jj: torch.stack([_injected(st, c, jb, jj, p) for jb in batch]) for jj in inj}
        tok = lvlm.adapter.token_inputs(lvlm.model)
        carried = {k: {name: torch.stack([_carried(st, c, jb, k, name, p) for jb in batch]) for name in tok}
                   for k in range(min(jb[1] for jb in batch), st.layers)} if tok else None
        kv = {s: tuple(torch.stack(x) for x in zip(*[_carried_kv(st, c, jb, s) for jb in batch]))
              for s in set(lvlm.adapter.kv_sources(lvlm.model).values())} or None
        logits = resume_lm(lvlm, st, rows, torch.tensor([jb[1] for jb in batch]), hidden, p, injected, carried, kv)
        corr = torch.stack([correct[items[jb[2]]] for jb in batch])
        metric = logit_diff(logits, corr, candidates).cpu()
        for jb, v in zip(batch, metric):
            a, j = jb[2], jb[3]
            out[(items[a], j)] = _row(items[a], patches[j], v, base_m[a], src_m[a])


def _hidden(st, c: int, job, p: int) -> torch.Tensor:
    """(L − p, D): a job's residual entering its start block, positions p…: the patched LM input it
    carries, or the base residual with the source's at its changed positions."""
    _, start, a, _, h, pos, _ = job
    if h is not None:
        return h[p:]
    x = st.residual[start][c + a][p:].clone()
    pos = pos.to(x.device)
    x[pos - p] = st.residual[start][a][pos]
    return x


def _injected(st, c: int, job, jj: int, p: int) -> torch.Tensor:
    """(L − p, D): what a job's row gets added after block ``jj``, positions p…: a patched vision
    side's own additions, or the base row's with the source's at the positions a residual patch
    moves when the patch comes before that addition (``jj ≥ start − 1``), else the base row's."""
    _, start, a, _, _, pos, add = job
    if add:
        return add[jj][p:]
    x = st.injected[jj][c + a][p:]
    if pos is None or jj < start - 1:
        return x
    x = x.clone()
    pos = pos.to(x.device)
    x[pos - p] = st.injected[jj][a][pos]
    return x


def _carried(st, c: int, job, k: int, name: str, p: int) -> torch.Tensor:
    """(L − p, …): block ``k``'s per-token input ``name`` for a job's row, positions p…: the base
    row's, with the source's at the positions a residual patch moves when the patch comes before
    block ``k`` (a row that starts at block 0 derives its own: :meth:`Adapter.enter`)."""
    _, start, a, _, _, pos, _ = job
    x = st.kwargs[k][name][c + a][p:]
    if pos is None or k < start:
        return x
    x = x.clone()
    pos = pos.to(x.device)
    x[pos - p] = st.kwargs[k][name][a][pos]
    return x


def _carried_kv(st, c: int, job, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block ``s``'s (keys, values), each (kv_heads, L, head_dim), that a later block reuses for a
    job's row when the row does not run block ``s`` (it starts after it): the base row's, with the
    source's at the positions a residual patch after block ``s`` moves."""
    _, start, a, _, _, pos, _ = job
    K, V = st.kv[s]
    if pos is None or start <= s:
        return K[c + a], V[c + a]
    K, V = K[c + a].clone(), V[c + a].clone()
    pos = pos.to(K.device)
    K[:, pos], V[:, pos] = st.kv[s][0][a][:, pos], st.kv[s][1][a][:, pos]
    return K, V


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
