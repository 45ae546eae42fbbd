"""``routing``: which experts a mixture-of-experts LM sends the target's image tokens to, per
placement cell and MoE layer, and whether that routing depends on where the target is.

For every item at every placement (the first ``items`` items, as ``lens``), under the condition's
interventions (baseline, BaPA, AGCI, …): at each MoE block's router (``lm.blocks.{i}.router``,
logits (B·L, E), :meth:`interp.adapters.Adapter.routing`) the top-k experts of each image token
of the cell that holds the target; per item, placement and layer the counts of each expert among
those choices (the detail table: ``count_0`` … ``count_{E-1}``, ``n_tokens``).

Rows (tidy: metric, layer, cell, site, group, value, ci_low, ci_high; 95 % item bootstrap):

* ``routing_freq`` (layer, cell, group ``e{k}``): the share of the target tokens' top-k choices
  that go to expert k (pooled over items; sums to 1 over experts);
* ``routing_js`` (layer, cell): Jensen–Shannon distance (base 2, in [0, 1]) between that cell's
  routing distribution and the one pooled over all placements;
* ``routing_js_mean`` (layer): the mean JS distance over the cell pairs — how much routing moves
  with the placement — with ``routing_js_null`` (the same with each item's placement labels
  permuted, ``permutations`` times: mean and 95 % range of the null) and ``routing_js_p`` (the
  share of permutations at least as large; (1 + #) / (1 + n)).

A dense LM has no router: the analysis refuses with one line.
"""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import torch

from analyses.kinds import lens
from analyses.registry import Analysis, register
from analyses.tasks import Context, probe_rows, rng_of
from spatialbias.errors import SpatialBiasError


def routing_of(lvlm):
    """The model's MoE routing (:class:`interp.adapters.Routing`); one error line on a dense LM."""
    r = lvlm.adapter.routing(lvlm.model)
    if r is None or not r.layers:
        raise SpatialBiasError(f"routing: {lvlm.adapter.name} has no mixture-of-experts router "
                               "(no lm.blocks.{i}.router site); run it on a MoE model, e.g. Qwen3-VL-MoE")
    return r


def batches(lvlm, cond, ctx: Context):
    """(grid, item ids, a generator of (start, rows, inputs) chunks sized under the memory budget) of
    the condition's items at every placement (``lens``'s selection; no answer candidates needed)."""
    from analyses import causal
    from analyses.evaluate import probe_batches, validate_probe
    from probes.format import find_probe
    probe = find_probe(cond.probe_path)
    rows = validate_probe(probe)
    sel, ids = lens.item_rows(rows, cond.options["items"])
    step = probe_rows(lvlm, cond, ctx, sel, "forward")
    return causal.probe_grid(rows, probe.rows_file), ids, ((s, b, x) for s, b, _, x in probe_batches(lvlm, probe, sel, step))


def routing_items(lvlm, cond, ctx: Context) -> pd.DataFrame:
    """One row per item × placement × MoE layer: ``n_tokens`` (the target cell's image tokens) and
    ``count_k``: how many of their top-k router choices are expert k (they sum to k · n_tokens)."""
    from interp.tracing import trace
    r = routing_of(lvlm)
    grid, ids, gen = batches(lvlm, cond, ctx)
    sites = {f"lm.blocks.{i}.router": i for i in r.layers}
    frames = []
    for start, batch, inputs in gen:
        cells = lvlm.image_map(inputs).cells(*grid)  # (B, L)
        own = cells == torch.tensor([row.cell for row in batch])[:, None]  # the target cell's image tokens

        def reduce(logits, own=own):  # (B·L, E) → (B, E + 1): expert counts, tokens
            top = logits.topk(r.top_k, dim=-1).indices.view(*own.shape, r.top_k).cpu()
            hits = torch.nn.functional.one_hot(top, r.experts).sum(2) * own[..., None]  # (B, L, E)
            return torch.cat([hits.sum(1), own.sum(1, keepdim=True)], 1)

        tr = trace(lvlm, inputs, cache=list(sites), interventions=cond.build(), reduce=dict.fromkeys(sites, reduce))
        for s, layer in sites.items():
            v = tr.cache[s].numpy()
            frames.append(pd.DataFrame({"row": np.arange(start, start + len(batch)), "id": [x.id for x in batch],
                                        "target_cell": [x.cell for x in batch], "site": s, "layer": layer,
                                        "n_tokens": v[:, -1], **{f"count_{k}": v[:, k] for k in range(r.experts)}}))
    d = pd.concat(frames, ignore_index=True)
    d["item"] = d["id"].map({i: k for k, i in enumerate(ids)})
    return d


def js_distance(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen–Shannon distance (base 2) between distributions on the last axis: (…, E) → (…)."""
    m = (p + q) / 2

    def kl(a):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(a > 0, a * np.log2(a / m), 0.0).sum(-1)
    return np.sqrt(np.clip((kl(p) + kl(q)) / 2, 0, 1))


def _dists(pooled: np.ndarray) -> np.ndarray:
    """(…, cells, E) counts pooled over items → the cells' routing distributions (each sums to 1)."""
    return pooled / np.maximum(pooled.sum(-1, keepdims=True), 1)


def _pair_mean(dist: np.ndarray) -> np.ndarray:
    """(…, cells, E) → (…) mean JS distance over the cell pairs."""
    pairs = list(itertools.combinations(range(dist.shape[-2]), 2))
    return np.mean([js_distance(dist[..., a, :], dist[..., b, :]) for a, b in pairs], 0)


def _ci(boot: np.ndarray) -> tuple[float, float]:
    lo, hi = np.nanpercentile(boot, [2.5, 97.5], axis=0)
    return lo, hi


def layer_rows(counts: np.ndarray, cells: list[int], layer: int, site: str, rng, n_perm: int,
               n_boot: int = 1000) -> list[dict]:
    """The rows of one layer from its (items, cells, E) counts (items present at every placement)."""
    n, C, E = counts.shape
    rows = []
    weights = np.stack([np.bincount(i, minlength=n) for i in rng.integers(0, n, (n_boot, n))])  # items resampled
    boot = (weights @ counts.reshape(n, C * E)).reshape(n_boot, C, E)  # jointly: (n_boot, cells, E) pooled
    dist, bdist = _dists(counts.sum(0)), _dists(boot)
    lo, hi = _ci(bdist)
    pooled, bpooled = _dists(counts.sum((0, 1))), _dists(boot.sum(1))
    js_cell, bjs_cell = js_distance(dist, pooled), js_distance(bdist, bpooled[:, None])
    js_lo, js_hi = _ci(bjs_cell)
    for j, cell in enumerate(cells):
        base = {"layer": layer, "cell": cell, "site": site}
        rows += [{"metric": "routing_freq", **base, "group": f"e{k}", "value": float(dist[j, k]),
                  "ci_low": float(lo[j, k]), "ci_high": float(hi[j, k])} for k in range(E)]
        rows.append({"metric": "routing_js", **base, "value": float(js_cell[j]), "ci_low": float(js_lo[j]),
                     "ci_high": float(js_hi[j])})
    mean = float(_pair_mean(dist))
    m_lo, m_hi = _ci(_pair_mean(bdist))
    items = np.arange(n)[:, None]
    null = np.array([_pair_mean(_dists(counts[items, np.argsort(rng.random((n, C)), -1)].sum(0)))
                     for _ in range(n_perm)])  # each item's placement labels shuffled
    rows += [{"metric": "routing_js_mean", "layer": layer, "site": site, "value": mean, "ci_low": float(m_lo),
              "ci_high": float(m_hi)},
             {"metric": "routing_js_null", "layer": layer, "site": site, "value": float(null.mean()),
              "ci_low": float(np.percentile(null, 2.5)), "ci_high": float(np.percentile(null, 97.5))},
             {"metric": "routing_js_p", "layer": layer, "site": site,
              "value": float((1 + (null >= mean - 1e-12).sum()) / (1 + n_perm))}]
    return rows


def run(lvlm, cond, ctx: Context):
    d, rng = routing_items(lvlm, cond, ctx), rng_of(cond)
    E = sum(c.startswith("count_") for c in d.columns)
    cols = [f"count_{k}" for k in range(E)]
    rows = []
    for (layer, site), g in d.groupby(["layer", "site"], sort=True):
        cells = sorted(g.target_cell.unique())
        full = g.groupby("item").target_cell.nunique().eq(len(cells))  # items present at every placement
        g = g[g.item.isin(full[full].index)].sort_values(["item", "target_cell"])
        counts = g[cols].to_numpy(float).reshape(-1, len(cells), E)
        rows += layer_rows(counts, [int(c) for c in cells], int(layer), site, rng, cond.options["permutations"])
    return rows + [{"metric": "n_items", "value": float(d["item"].nunique())}], d


def check(opts: dict, where: str) -> dict:
    n = opts.get("permutations")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise SpatialBiasError(f"{where}: [analysis.routing] permutations must be a positive integer, got {n!r}")
    return opts


def summary(f: pd.DataFrame, order: list[str]) -> dict:
    """``routing``: per intervention and MoE layer the mean JS distance between placements' routing
    of the target's image tokens (with interval), its permutation null and p."""
    from analyses.blocks import vci
    out = {}
    for iv in order:
        g = f[f.intervention == iv]
        m = g[g.metric == "routing_js_mean"]
        if len(m):
            p = g[g.metric == "routing_js_p"].set_index("layer").value
            null = g[g.metric == "routing_js_null"].set_index("layer")
            out.setdefault("routing", {})[iv] = {
                int(r.layer): {**vci(r._asdict()), "null": float(null.value[r.layer]), "p": float(p[r.layer])}
                for r in m.itertuples()}
    return out


def claims(run: dict) -> list:
    """The placement dependence of routing at the first and the last MoE layer."""
    out = []
    for iv, by_layer in run["causal"].get("routing", {}).items():
        layers = list(by_layer)
        for layer in dict.fromkeys([layers[0], layers[-1]]) if layers else []:
            out.append((f"expert routing of the target's image tokens, layer {layer}: mean JS distance between "
                        f"placements (permutation p = {by_layer[layer]['p']:.3g})", iv, by_layer[layer]))
    return out


ROUTING = register(Analysis(
    "routing", run, lens.cost, options={"items": None, "permutations": 200}, check=check,
    profile=lambda opts: "forward", summary=summary, claims=claims))
