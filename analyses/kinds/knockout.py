"""``knockout``: the answer logit difference's change when the question tokens cannot attend to
the target's cell, a distractor cell or all image tokens, per layer and in every layer."""
from __future__ import annotations

import pandas as pd

from analyses import causal
from analyses.kinds.patching import causal_sizes
from analyses.registry import Analysis, FigureSpec, Section, having, model_probes, register, stem
from analyses.tasks import Context, pair_rows, pairs_of, rng_of


def run(lvlm, cond, ctx: Context):
    pairs = pairs_of(lvlm, cond, ctx)
    items = causal.knockout_items(lvlm, pairs, cond.build(), batch_size=ctx.rows(lvlm, "forward", pairs.clean,
                                                                                  "knockout"))
    return causal.knockout_rows(items, rng_of(cond)) + pair_rows(pairs), items


def cost(cond, probe_rows: int, items: int, lm_layers: int) -> int:
    """The unedited run and three blocked groups, each in every layer and in each layer alone."""
    _, n, auto = causal_sizes(cond, probe_rows, items)
    return n * (1 + 3 * (lm_layers + 1)) + auto


def summary(k: pd.DataFrame, order: list[str]) -> dict:
    from analyses.blocks import vci
    k = k[k.metric == "knockout_drop"]
    return {"knockout": {iv: [{"layers": "all" if pd.isna(r.layer) else int(r.layer), "blocked": r.group,
                               **vci(r._asdict())} for r in k[k.intervention == iv].itertuples()]
                         for iv in order if iv in set(k.intervention)}}


def claims(run: dict) -> list:
    return [(f"knockout of {r['blocked'] if r['blocked'] == 'all image tokens' else 'the ' + r['blocked']} in every "
             "layer: change of the logit difference (unedited − knocked out)", iv, r)
            for iv, rows in run["causal"].get("knockout", {}).items() for r in rows if r["layers"] == "all"]


def figures(df, tables) -> list[FigureSpec]:
    return [FigureSpec("knockout", stem("knockout_", m, p), "knockout_drops", {"model": m, "probe": p}, f"{m} · {p}")
            for m, p in model_probes(having(df, "knockout", "knockout_drop"))]


KNOCKOUT = register(Analysis(
    "knockout", run, cost, options={"items": None, "cells": None}, causal=True, summary=summary, claims=claims,
    figures=figures, sections=(Section("knockout", "Attention knockout", "Change of the logit difference when the "
                                       "question tokens cannot attend to a cell, per layer and in all layers."),)))
