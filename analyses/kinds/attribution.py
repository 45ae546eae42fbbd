"""``attribution``: attribution patching (gradient × difference; with ``steps`` k > 1, gradients
averaged along k pixel interpolation steps) against exact denoising patching of the same patches."""
from __future__ import annotations

import pandas as pd

from analyses import causal
from analyses.kinds.patching import causal_sizes
from analyses.registry import Analysis, register
from analyses.tasks import Context, pair_rows, pairs_of, rng_of


def run(lvlm, cond, ctx: Context):
    from interp import patching
    pairs, ivs = pairs_of(lvlm, cond, ctx), cond.build()
    exact = patching.run_patches(lvlm, pairs.corrupt, pairs.clean, patching.default_patches(lvlm), pairs.correct,
                                 pairs.candidates, pairs.targets, interventions=ivs,
                                 batch_size=ctx.rows(lvlm, "patching", pairs.clean, "attribution"),
                                 grid=pairs.grid).assign(direction="denoise")
    estimates = {("atp" if k == 1 else f"atp×{k}"): causal.attribution_items(
        lvlm, pairs, ivs, steps=k, batch_size=ctx.rows(lvlm, "attribution", pairs.clean, "attribution"))
                 for k in cond.options.get("steps", [1, 8])}
    details = pd.concat([causal._with_ids(exact, pairs).assign(method="exact")]
                        + [e.assign(method=name) for name, e in estimates.items()], ignore_index=True)
    return causal.attribution_rows(exact, estimates, rng_of(cond)) + pair_rows(pairs), details


def cost(cond, probe_rows: int, items: int, lm_layers: int) -> int:
    """Exact denoising patches with their two runs, then per step count k the gradient passes."""
    _, n, auto = causal_sizes(cond, probe_rows, items)
    patches = 4 * lm_layers + 6
    return n * (patches + 2) + sum(n * (2 if k == 1 else k + 1) for k in cond.options.get("steps", [1, 8])) + auto


def summary(a: pd.DataFrame, order: list[str]) -> dict:
    from analyses.blocks import vci
    a = a[a.metric == "attribution_spearman"]
    return {"attribution": {iv: {r.group: vci(r._asdict()) for r in a[a.intervention == iv].itertuples()}
                            for iv in order if iv in set(a.intervention)}} if len(a) else {}


def claims(run: dict) -> list:
    return [(f"attribution patching ({name}) vs exact: Spearman over all patches", iv, rho)
            for iv, rhos in run["causal"].get("attribution", {}).items() for name, rho in rhos.items()]


ATTRIBUTION = register(Analysis(
    "attribution", run, cost, options={"items": None, "cells": None, "steps": [1, 8]},
    profile=lambda opts: ("patching", "attribution"), baseline_only=True, causal=True, summary=summary,
    claims=claims))
