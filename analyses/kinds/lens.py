"""``lens``: the logit lens per placement cell. The residual stream after ``lm.input`` and every LM
block, read through the model's own final norm (``lm.final_norm``) and unembedding (``unembed``):
at the answer position, the answer margin (the correct candidate's logit minus the best other
candidate's: the eval's candidates, :func:`analyses.evaluate.answer_set`) per layer and placement
cell; and at the image tokens of each cell, the same margin decoded from each token, averaged over
the cell's tokens. Where along the depth the position-dependent gap appears.

Items: the first ``items`` items of the probe at *every* placement (as ``flow``), not the causal
pair: a gap that is present only between two cells would hide the ordering of the other seven.

Exact at the end: the lens at the last block is the model's own logit margin (the same norm and
unembedding, softcapping included), so its last row reproduces the eval's per-cell margins.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from analyses import causal
from analyses.kinds.patching import causal_sizes
from analyses.registry import Analysis, FigureSpec, Section, having, model_probes, register, stem
from analyses.tasks import Context, probe_rows, rng_of


def item_rows(rows, n_items: int | None):
    """The rows of the first ``n_items`` items (by first appearance), every placement, and their ids."""
    ids = list(dict.fromkeys(r.id for r in rows))[:n_items]
    keep = set(ids)
    return [r for r in rows if r.id in keep], ids


def batches(lvlm, cond, ctx: Context):
    """(probe, grid, answer set, rows, item ids) of the condition's items at every placement, and a
    generator of (start, rows, inputs) chunks sized under the memory budget (profile ``forward``)."""
    from analyses.evaluate import open_probe, probe_batches
    probe, rows, cands = open_probe(lvlm, cond.probe_path)
    grid = causal.probe_grid(rows, probe.rows_file)
    sel, ids = item_rows(rows, cond.options["items"])
    step = probe_rows(lvlm, cond, ctx, sel, "forward")
    gen = ((s, b, inputs) for s, b, _, inputs in probe_batches(lvlm, probe, sel, step))
    return grid, cands, sel, ids, gen


def lm_sites(lvlm) -> list[tuple[str, int | None]]:
    """(site, layer) of the LM residual stream: ``lm.input`` (layer None), then every block."""
    n = lvlm.adapter.layer_count(lvlm.model, "lm")
    return [("lm.input", None)] + [(f"lm.blocks.{i}", i) for i in range(n)]


def decoder(lvlm, candidates):
    """``fn(h) -> (…, C)`` candidate logits of residual vectors ``h`` (…, D): the model's final norm
    and unembedding rows of the candidates (with its bias and final-logit softcapping, if any). A
    block state of S streams (…, S·D) is first read out as the text model reads its last block's
    (:meth:`~interp.adapters.Adapter.readout`)."""
    norm = lvlm.adapter.module(lvlm.model, "lm.final_norm")
    head = lvlm.adapter.module(lvlm.model, "unembed")
    ids = torch.as_tensor(candidates, device=head.weight.device)
    w = head.weight[ids]
    b = head.bias[ids] if getattr(head, "bias", None) is not None else None
    tc = getattr(lvlm.model.config, "text_config", lvlm.model.config)
    cap = getattr(tc, "final_logit_softcapping", None)

    nd = next(norm.parameters(), w).device  # a dispatched model may hold them on other devices than h

    width = w.shape[-1]

    def fn(h):
        x = h.to(nd) if h.shape[-1] == width else lvlm.adapter.readout(lvlm.model, h.to(nd))
        z = torch.nn.functional.linear(norm.forward(x).to(w.device), w, b).float().to(h.device)
        return cap * torch.tanh(z / cap) if cap else z  # norm.forward: no hooks of a run fire
    return fn


def margin(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(…,) correct candidate's logit minus the best other's (:meth:`AnswerSet.score`'s ``logit_diff``)."""
    right = logits.gather(-1, target[..., None])[..., 0]
    others = logits.scatter(-1, target[..., None], float("-inf")).max(-1).values
    return right - others


def lens_items(lvlm, cond, ctx: Context) -> pd.DataFrame:
    """One row per item × placement × site: ``margin`` at the last position, and ``cell_0`` …
    ``cell_{n·m−1}``: the margin decoded from each cell's image tokens, mean over the cell's tokens."""
    from interp.tracing import trace
    grid, cands, sel, ids, gen = batches(lvlm, cond, ctx)
    decode, sites, n_cells = decoder(lvlm, cands.token_ids), lm_sites(lvlm), grid[0] * grid[1]
    ivs, frames = cond.build(), []
    for start, batch, inputs in gen:
        target = torch.tensor([cands.answers.index(r.answer) for r in batch])
        cells = lvlm.image_map(inputs).cells(*grid)  # (B, L) on the layout the forward runs

        def reduce(x, target=target, cells=cells):
            t, c = target.to(x.device), cells.to(x.device)
            last = margin(decode(x[:, -1]), t)  # (B,)
            b, pos = (c >= 0).nonzero(as_tuple=True)
            tok = margin(decode(x[b, pos]), t[b])  # (K,) per image token
            k = b * n_cells + c[b, pos]
            s = torch.zeros(len(t) * n_cells, device=x.device).index_add_(0, k, tok)
            n = torch.zeros(len(t) * n_cells, device=x.device).index_add_(0, k, torch.ones_like(tok))
            return torch.cat([last[:, None], (s / n).view(len(t), n_cells)], 1).cpu()

        tr = trace(lvlm, inputs, cache=[s for s, _ in sites], interventions=ivs,
                   reduce={s: reduce for s, _ in sites})
        for s, layer in sites:
            v = tr.cache[s].double().numpy()
            frames.append(pd.DataFrame({"row": np.arange(start, start + len(batch)), "id": [r.id for r in batch],
                                        "target_cell": [r.cell for r in batch], "site": s, "layer": layer,
                                        "margin": v[:, 0], **{f"cell_{c}": v[:, 1 + c] for c in range(n_cells)}}))
    d = pd.concat(frames, ignore_index=True)
    d["item"] = d["id"].map({i: k for k, i in enumerate(ids)})
    d["layer"] = d["layer"].astype("Int64")
    d["own_cell"] = [row[f"cell_{c}"] for row, c in zip(d.to_dict("records"), d.target_cell)]
    return d


def spread_rows(d: pd.DataFrame, value: str, metric: str, spread_metric: str, rng) -> list[dict]:
    """Per site: ``metric`` per placement cell (mean over items) and ``spread_metric``, its max − min
    over placements, items resampled jointly (only items present at every placement)."""
    rows = []
    for (site, layer), g in d.groupby(["site", "layer"], sort=False, dropna=False):
        layer = None if pd.isna(layer) else int(layer)
        for cell, h in g.groupby("target_cell", sort=True):
            rows.append({"metric": metric, "site": site, "layer": layer, "cell": int(cell),
                         **causal._point_ci({"x": h.sort_values("item")[value].to_numpy()}, lambda x: x, rng)})
        wide = g.pivot_table(index="item", columns="target_cell", values=value).dropna()
        arrays = {f"c{c}": wide[c].to_numpy() for c in wide.columns}
        spread = lambda **m: np.max(np.stack(list(m.values())), 0) - np.min(np.stack(list(m.values())), 0)  # noqa: E731
        rows.append({"metric": spread_metric, "site": site, "layer": layer, **causal._point_ci(arrays, spread, rng)})
    return rows


def run(lvlm, cond, ctx: Context):
    d, rng = lens_items(lvlm, cond, ctx), rng_of(cond)
    rows = spread_rows(d, "margin", "lens_margin", "lens_spread", rng)
    rows += spread_rows(d, "own_cell", "lens_cell_margin", "lens_cell_spread", rng)
    return rows + [{"metric": "n_items", "value": float(d["item"].nunique())}], d


def cost(cond, probe_rows_: int, items: int, lm_layers: int) -> int:
    """One forward per item and placement (every site read in it)."""
    cells, n, _ = causal_sizes(cond, probe_rows_, items)
    return cells * n


def summary(f: pd.DataFrame, order: list[str]) -> dict:
    """``lens``: per intervention and site the last position's margin at each placement;
    ``lens_spread``: its max − min over placements per site (``lens_cell_spread``: the same of the
    target cell's own image tokens)."""
    from analyses.blocks import vci
    out = {}
    a = f[f.metric == "lens_margin"]
    if len(a):
        out["lens"] = {iv: {s: [vci(r) for r in g.sort_values("cell").to_dict("records")]
                            for s, g in a[a.intervention == iv].groupby("site", sort=False)}
                       for iv in order if iv in set(a.intervention)}
    for m in ("lens_spread", "lens_cell_spread"):
        sp = f[f.metric == m]
        if len(sp):
            out[m] = {iv: {r.site: vci(r._asdict()) for r in sp[sp.intervention == iv].itertuples()}
                      for iv in order if iv in set(sp.intervention)}
    return out


def claims(run: dict) -> list:
    """The spread of the lens margin over placements at the LM input and after the last block."""
    out = []
    for iv, by_site in run["causal"].get("lens_spread", {}).items():
        sites = list(by_site)
        for s in dict.fromkeys([sites[0], sites[-1]]) if sites else []:
            out.append((f"logit lens at {s}: spread (max − min) of the answer margin over placements", iv, by_site[s]))
    return out


def figures(df, tables) -> list[FigureSpec]:
    return [FigureSpec("logit-lens", stem(f"{metric}_", m, p), "lens_margins", {"model": m, "probe": p, "metric": metric},
                       f"{what} · {m} · {p}")
            for metric, what in (("lens_margin", "answer position"), ("lens_cell_margin", "target's image tokens"))
            for m, p in model_probes(having(df, "lens", metric, cell=1))]


LENS = register(Analysis(
    "lens", run, cost, options={"items": None}, profile=lambda opts: "forward", causal=True, items_cap=50,
    summary=summary, claims=claims, figures=figures,
    sections=(Section("logit-lens", "Logit lens per cell", "The answer margin read through the model's final norm "
                      "and unembedding after every LM block, per placement of the target, and its spread over "
                      "placements."),)))
