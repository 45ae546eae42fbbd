"""``attribution``: attribution patching (gradient × difference; with ``steps`` k > 1, gradients
averaged along k pixel interpolation steps) against exact denoising patching of the same patches.

Its accuracy is read as the per-patch absolute error in gap units (|estimated − exact restoration|),
averaged over the patches whose exact result is not 0 or 1 by construction (a patch that leaves
every item's run the base's or makes it the source's): a rank correlation over all patches is
dominated by those ties and says little about the patches that matter."""
from __future__ import annotations

import numpy as np
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
    return error_rows(exact, estimates, rng_of(cond)) + pair_rows(pairs), details


def cost(cond, probe_rows: int, items: int, lm_layers: int) -> int:
    """Exact denoising patches with their two runs, then per step count k the gradient passes."""
    _, n, auto = causal_sizes(cond, probe_rows, items)
    patches = 4 * lm_layers + 6
    return n * (patches + 2) + sum(n * (2 if k == 1 else k + 1) for k in cond.options.get("steps", [1, 8])) + auto


TRIVIAL = 1e-6
"""A patch is trivial when, for every item, its patched logit difference is within this (× (1 +
|value|)) of the base run's (restoration 0 by construction) or of the source run's (1)."""


def error_rows(exact: pd.DataFrame, estimates: dict[str, pd.DataFrame],
               rng: np.random.Generator | None = None, n_resamples: int = 2000) -> list[dict]:
    """Per estimator (``group``: e.g. "atp", "atp×8"): ``attribution_error``, the mean over the
    non-trivial patches (:data:`TRIVIAL`) of |estimated − exact denoising restoration| (gap units),
    with a percentile bootstrap 95 % interval over items (every patch's two ratios of item means
    recomputed per resample); ``attribution_error_max``, the largest of those errors;
    ``attribution_patches``, how many patches were compared; and each patch's estimate
    (``attribution_estimate``, site and token group in ``site``). Shapes: ``exact`` and each
    estimate hold one row per (item, site, group)."""
    from interp import attribution, patching
    exact = exact[exact.direction == "denoise"]
    keys = ["site", "group"]
    e = exact.pivot_table(index="item", columns=keys, values="metric", sort=False).sort_index()
    base = exact.pivot_table(index="item", columns=keys, values="base_metric", sort=False).sort_index()[e.columns]
    src = exact.pivot_table(index="item", columns=keys, values="source_metric", sort=False).sort_index()[e.columns]
    tol = TRIVIAL * (1 + e.abs())
    trivial = ((e - base).abs() <= tol).all() | ((e - src).abs() <= tol).all()
    cols = e.columns[~trivial.to_numpy()]
    ex = patching.restoration(exact, "denoise").set_index(keys)["restoration"]
    rows = []
    for name, est in estimates.items():
        at = attribution.estimated_restoration(est).set_index(keys)["estimate"]
        err = (at.reindex(cols) - ex.reindex(cols)).abs().to_numpy()
        lo = hi = float("nan")
        if rng is not None and len(cols) and len(e) > 1:
            a = est.pivot_table(index="item", columns=keys, values="attribution", sort=False).sort_index()[cols]
            idx = rng.integers(0, len(e), (n_resamples, len(e)))
            m = {k: v[cols].to_numpy()[idx].mean(1) for k, v in (("p", e), ("b", base), ("s", src))}
            with np.errstate(divide="ignore", invalid="ignore"):
                gap = m["s"] - m["b"]
                boot = np.abs(a.to_numpy()[idx].mean(1) / gap - (m["p"] - m["b"]) / gap).mean(1)  # (R,)
            boot = boot[np.isfinite(boot)]
            if len(boot):
                lo, hi = (float(v) for v in np.percentile(boot, [2.5, 97.5]))
        rows.append({"metric": "attribution_error", "group": name, "value": float(err.mean()) if len(err) else
                     float("nan"), "ci_low": lo, "ci_high": hi})
        rows.append({"metric": "attribution_error_max", "group": name,
                     "value": float(err.max()) if len(err) else float("nan")})
        rows.append({"metric": "attribution_patches", "group": name, "value": float(len(cols))})
        rows += [{"metric": "attribution_estimate", "group": name, "site": f"{site}:{group}", "value": float(v)}
                 for (site, group), v in at.items()]
    return rows


def summary(a: pd.DataFrame, order: list[str]) -> dict:
    """Per intervention and estimator: the mean absolute error with its interval, its maximum and
    the number of patches compared."""
    from analyses.blocks import vci
    out = {}
    for iv in order:
        g = a[a.intervention == iv]
        err = g[g.metric == "attribution_error"]
        if not len(err):
            continue
        extra = {m: dict(zip(g[g.metric == m].group, g[g.metric == m].value))
                 for m in ("attribution_error_max", "attribution_patches")}
        out[iv] = {r.group: {**vci(r._asdict()), "max": extra["attribution_error_max"].get(r.group),
                             "patches": extra["attribution_patches"].get(r.group)} for r in err.itertuples()}
    return {"attribution": out} if out else {}


def claims(run: dict) -> list:
    return [(f"attribution patching ({name}) vs exact: mean |error| in gap units over the "
             f"{int(err['patches'] or 0)} patches not 0 or 1 by construction", iv, err)
            for iv, errs in run["causal"].get("attribution", {}).items() for name, err in errs.items()]


ATTRIBUTION = register(Analysis(
    "attribution", run, cost, options={"items": None, "cells": None, "steps": [1, 8]},
    profile=lambda opts: ("patching", "attribution"), baseline_only=True, causal=True, summary=summary,
    claims=claims))
