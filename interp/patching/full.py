"""The reference scheme of :func:`interp.patching.run_patches`: one full forward per patched row
(:func:`_full_patches`), also what the resumed scheme runs for the patches it cannot resume.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from interp.batch import select_rows
from interp.dispatch import forward, then
from interp.patching.core import _copy_edits, _row, logit_diff, site_groups


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
        edits = then(iv_edits, _copy_edits(groups, copies, lvlm, chunk["input_ids"]))
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
