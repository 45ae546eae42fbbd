"""``heads``: which attention heads carry the best → worst gap. Every (layer, head) is scored by
attribution patching (its estimated share of the clean − corrupt gap of the answer logit
difference: :func:`interp.heads.head_attribution`); the ``top`` heads are then measured exactly
(:mod:`interp.heads`): each head patched from the clean run at every position, the path image
tokens → head → answer position, the top k patched together (the cumulative curve, k = 1 … top),
and the top k knocked out (both placements' outputs replaced by their mean, so the head carries
no difference between them) — the share of the gap that then disappears.

Held-out confirmation: the heads are ranked on the first half of the condition's items and
measured exactly on the other half (option ``split``), so the exact shares are not inflated by
choosing the heads on the same noise. Every ratio is gated by the gap (``gap``, ``gap_read``, on
all items): where its interval does not lie above :data:`analyses.causal.MIN_GAP` the shares are
"not read" (NaN), as the patching analysis' are.

Rows (``group`` = ``"head h"`` or ``"top k"``, ``layer`` the head's layer):
``head_share_estimate`` (every head, all items), ``head_rank`` (1 = largest estimate, the top
heads), ``head_restoration`` and ``head_path_restoration`` (top heads, exact, confirm items),
``head_cumulative_estimate`` / ``head_cumulative_restoration`` / ``head_knockout_removed`` (top k).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from analyses import causal
from analyses.kinds.patching import causal_sizes
from analyses.registry import Analysis, FigureSpec, Section, having, model_probes, register, stem
from analyses.tasks import Context, pair_rows, pairs_of, rng_of
from spatialbias.errors import SpatialBiasError

SHARES = ("head_share_estimate", "head_restoration", "head_path_restoration", "head_cumulative_estimate",
          "head_cumulative_restoration", "head_knockout_removed")
"""The ratios of the gap (gated by it)."""


def head_of(group: str) -> int:
    """The head index of a ``"head h"`` group."""
    return int(str(group).split()[-1])


def split_items(n: int, split: bool) -> tuple[list[int], list[int]]:
    """(items the heads are ranked on, items they are measured on): the first ⌈n/2⌉ and the rest,
    or all items twice without ``split``."""
    if not split:
        return list(range(n)), list(range(n))
    if n < 4:
        raise SpatialBiasError(f"heads: {n} item(s) cannot be split into ranking and confirmation halves; use "
                               "4 or more items (items = …), or split = false")
    k = -(-n // 2)
    return list(range(k)), list(range(k, n))


def _ratio(x, clean, corrupt):
    return x / (clean - corrupt)


def _restored(p, clean, corrupt):
    return (p - corrupt) / (clean - corrupt)


def _removed(kb, ks, clean, corrupt):
    return 1 - (ks - kb) / (clean - corrupt)


def measure(lvlm, pairs, ivs, top: int, split: bool, fwd: int, att: int):
    """Per-item tables of the analysis (module doc): (scores (N, layers, H), base (N,), source (N,),
    top heads [(layer, head)], rank items, confirm items, {kind: (n_confirm, K) metrics})."""
    from interp import heads as H
    scores, mb, ms = H.head_attribution(lvlm, pairs.corrupt, pairs.clean, pairs.correct, pairs.candidates, ivs, att)
    rank, confirm = split_items(len(mb), split)
    flat = np.nan_to_num(scores[rank].mean(0).reshape(-1), nan=-np.inf)  # layers without heads rank last
    n_heads = scores.shape[2]
    order = np.argsort(-flat, kind="stable")[:min(top, int(np.isfinite(flat).sum()))]
    tops = [(int(i // n_heads), int(i % n_heads)) for i in order]
    b, s = (lvlm.rows(lvlm.batch(x), confirm) for x in (pairs.corrupt, pairs.clean))
    correct = pairs.correct[confirm]
    cumulative = [tops[:k] for k in range(1, len(tops) + 1)]
    job = (correct, pairs.candidates, ivs)
    exact = {"exact": H.head_patches(lvlm, b, s, [[h] for h in tops], *job, scope="all", batch_size=fwd),
             "path": H.path_patches(lvlm, b, s, tops, *job, batch_size=fwd),
             "cumulative": H.head_patches(lvlm, b, s, cumulative, *job, scope="all", batch_size=fwd)}
    exact["knockout_base"], exact["knockout_source"] = H.head_ablations(lvlm, b, s, cumulative, *job, batch_size=fwd)
    return scores, mb, ms, tops, rank, confirm, exact


def rows_of(scores, mb, ms, tops, confirm, exact, rng) -> list[dict]:
    rows = []
    L, Hn = scores.shape[1:]
    for layer in range(L):
        if np.isnan(scores[:, layer]).all():  # no attention heads (a hybrid LM's recurrent layer)
            continue
        for h in range(Hn):
            rows.append({"metric": "head_share_estimate", "layer": layer, "group": f"head {h}",
                         "site": f"lm.blocks.{layer}.attn.heads",
                         **causal._point_ci({"x": scores[:, layer, h], "clean": ms, "corrupt": mb}, _ratio, rng)})
    cb, cs = mb[confirm], ms[confirm]
    for k, (layer, h) in enumerate(tops):
        key = {"layer": layer, "group": f"head {h}", "site": f"lm.blocks.{layer}.attn.heads"}
        rows.append({"metric": "head_rank", "value": float(k + 1), **key})
        for metric, kind in (("head_restoration", "exact"), ("head_path_restoration", "path")):
            rows.append({"metric": metric, **key, **causal._point_ci(
                {"p": exact[kind][:, k], "clean": cs, "corrupt": cb}, _restored, rng)})
    for k in range(len(tops)):
        top = {"group": f"top {k + 1}"}
        est = scores[confirm][:, [t[0] for t in tops[:k + 1]], [t[1] for t in tops[:k + 1]]].sum(1)
        rows.append({"metric": "head_cumulative_estimate", **top,
                     **causal._point_ci({"x": est, "clean": cs, "corrupt": cb}, _ratio, rng)})
        rows.append({"metric": "head_cumulative_restoration", **top, **causal._point_ci(
            {"p": exact["cumulative"][:, k], "clean": cs, "corrupt": cb}, _restored, rng)})
        rows.append({"metric": "head_knockout_removed", **top, **causal._point_ci(
            {"kb": exact["knockout_base"][:, k], "ks": exact["knockout_source"][:, k], "clean": cs, "corrupt": cb},
            _removed, rng)})
    return rows


def gap_of(mb, ms, rng) -> list[dict]:
    g = causal._point_ci({"clean": ms, "corrupt": mb}, lambda clean, corrupt: clean - corrupt, rng)
    read = g["ci_low"] == g["ci_low"] and g["ci_low"] >= causal.MIN_GAP
    return [{"metric": "gap", **g}, {"metric": "gap_read", "value": float(read)}]


def details_of(pairs, scores, mb, ms, tops, rank, confirm, exact) -> pd.DataFrame:
    """One row per item × head estimate, and per confirm item × exact measurement."""
    N, L, Hn = scores.shape
    ids = np.asarray(pairs.ids)
    part = np.where(np.isin(np.arange(N), rank), "rank", "confirm")
    est = pd.DataFrame({"item": np.repeat(np.arange(N), L * Hn), "layer": np.tile(np.repeat(np.arange(L), Hn), N),
                        "head": np.tile(np.arange(Hn), N * L), "k": -1, "kind": "estimate",
                        "value": scores.reshape(-1), "base_metric": np.repeat(mb, L * Hn),
                        "source_metric": np.repeat(ms, L * Hn), "part": np.repeat(part, L * Hn)})
    frames = [est]
    for kind, m in exact.items():
        per_head = kind in ("exact", "path")
        for k in range(m.shape[1]):
            frames.append(pd.DataFrame({"item": confirm, "layer": tops[k][0] if per_head else -1,
                                        "head": tops[k][1] if per_head else -1, "k": k + 1, "kind": kind,
                                        "value": m[:, k], "base_metric": mb[confirm], "source_metric": ms[confirm],
                                        "part": "confirm"}))
    d = pd.concat(frames, ignore_index=True)
    return d.assign(id=ids[d["item"].to_numpy()])


def run(lvlm, cond, ctx: Context):
    pairs, ivs, rng = pairs_of(lvlm, cond, ctx), cond.build(), rng_of(cond)
    fwd = ctx.rows(lvlm, "forward", pairs.clean, "heads")
    att = ctx.rows(lvlm, "attribution", pairs.clean, "heads")
    top, split = int(cond.options.get("top", 8)), bool(cond.options.get("split", True))
    scores, mb, ms, tops, rank, confirm, exact = measure(lvlm, pairs, ivs, top, split, fwd, att)
    gap = gap_of(mb, ms, rng)
    rows = rows_of(scores, mb, ms, tops, confirm, exact, rng)
    if not gap[1]["value"]:
        nan = float("nan")
        rows = [({**r, "value": nan, "ci_low": nan, "ci_high": nan} if r["metric"] in SHARES else r) for r in rows]
    rows += gap + [{"metric": "n_rank_items", "value": float(len(rank))},
                   {"metric": "n_confirm_items", "value": float(len(confirm))}]
    return rows + pair_rows(pairs), details_of(pairs, scores, mb, ms, tops, rank, confirm, exact)


def check(opts: dict, where: str) -> dict:
    top = opts.get("top", 8)
    if not isinstance(top, int) or isinstance(top, bool) or top < 1:
        raise SpatialBiasError(f"{where}: top = {top!r}; give the number of heads to measure exactly (1 or more)")
    if not isinstance(opts.get("split", True), bool):
        raise SpatialBiasError(f"{where}: split = {opts.get('split')!r}; use true (rank on half the items, confirm on "
                               "the other half) or false")
    return opts


def cost(cond, probe_rows: int, items: int, lm_layers: int) -> int:
    """Attribution (the clean rows, then the corrupt rows forward and backward: 3 per item); on the
    confirm items: the clean run, each top head alone, the top k together, the path's receiver runs
    (at most one per top head) and writes, and both placements per knockout set."""
    _, n, auto = causal_sizes(cond, probe_rows, items)
    k = cond.options.get("top", 8)
    c = n - n // 2 if cond.options.get("split", True) else n
    return 3 * n + c * (1 + k + k + (1 + 2 * k) + 2 * (1 + k)) + auto


def summary(h: pd.DataFrame, order: list[str]) -> dict:
    """``heads``: per intervention the top heads (layer, head, estimate, exact, path) and the
    cumulative curve (k, estimate, exact, knocked out)."""
    from analyses.blocks import vci
    if not (h.metric == "head_rank").any():
        return {}
    out = {}
    for iv in order:
        d = h[h.intervention == iv]
        if d.empty:
            continue
        at = {(r.metric, None if pd.isna(r.layer) else int(r.layer), r.group): r._asdict() for r in d.itertuples()}
        tops = d[d.metric == "head_rank"].sort_values("value")
        out[iv] = {"top": [{"layer": int(r.layer), "head": head_of(r.group),
                            **{k: vci(at[(m, int(r.layer), r.group)]) for k, m in (
                                ("estimate", "head_share_estimate"), ("exact", "head_restoration"),
                                ("path", "head_path_restoration"))}} for r in tops.itertuples()],
                   "cumulative": [{"k": k, **{name: vci(at[(m, None, f"top {k}")]) for name, m in (
                       ("estimate", "head_cumulative_estimate"), ("exact", "head_cumulative_restoration"),
                       ("knocked_out", "head_knockout_removed"))}} for k in range(1, len(tops) + 1)]}
    return {"heads": out}


def claims(run: dict) -> list:
    """The top head's exact share, and what the top k (all measured) restore and remove together."""
    out = []
    for iv, b in run["causal"].get("heads", {}).items():
        if not b["top"]:
            continue
        t, last = b["top"][0], b["cumulative"][-1]
        out.append((f"top head L{t['layer']}H{t['head']}: share of the gap its clean output restores (exact)", iv,
                    t["exact"]))
        out.append((f"top {last['k']} heads patched together: share of the gap restored (exact)", iv, last["exact"]))
        out.append((f"top {last['k']} heads knocked out: share of the gap removed", iv, last["knocked_out"]))
    return out


def figures(df, tables) -> list[FigureSpec]:
    return [FigureSpec("heads", stem("heads_", m, p), "head_shares", {"model": m, "probe": p}, f"{m} · {p}")
            for m, p in model_probes(having(df, "heads", "head_rank"))]


HEADS = register(Analysis(
    "heads", run, cost, options={"items": None, "cells": None, "top": 8, "split": True}, check=check,
    profile=lambda opts: ("attribution", "forward"), causal=True, summary=summary, claims=claims, figures=figures,
    sections=(Section("heads", "Attention heads", "Every head's share of the best → worst gap by attribution "
                      "patching; the top heads measured exactly (patched, path image tokens → head → answer, "
                      "knocked out), on items held out from their ranking."),)))
