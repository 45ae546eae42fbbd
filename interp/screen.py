"""Screened activation patching: attribution patching (one forward and one backward per item)
ranks every patch, exact patching confirms the top K only (``--screen K``).

The table has the layout of :func:`interp.patching.run_patches` (one row per item × patch:
``metric``, ``base_metric``, ``source_metric``) plus ``method``: ``"exact"`` for the K confirmed
patches (``metric`` is the patched run's), ``"screen_estimate"`` for the rest (``metric`` =
base_metric + attribution, the first-order estimate; aggregated under their own metric name,
``screen_estimate_*``, never ``restoration_*``: :func:`analyses.causal.restoration_rows`). What
the screen can miss is measured by :func:`screen_misses` against full exact patching
(docs/benchmarks.md, section screen).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from spatialbias.errors import SpatialBiasError
from interp.patching import Patch, restoration, run_patches


EXACT, ESTIMATE = "exact", "screen_estimate"
"""The ``method`` of a screened table's rows: exactly patched, or the attribution estimate."""


def rank_patches(est: pd.DataFrame) -> list[tuple[str, str]]:
    """(site, group) of an attribution table, by |mean attribution / mean gap| over items, largest first."""
    from interp.attribution import estimated_restoration
    r = estimated_restoration(est)
    order = np.argsort(-r.estimate.abs().to_numpy(), kind="stable")
    return [(r.site.iloc[i], r.group.iloc[i]) for i in order]


def screened_patches(lvlm, base, source, patches: Sequence[Patch], correct, candidates, targets, k: int,
                     interventions=(), batch_size: int = 32, grid: tuple[int, int] = (3, 3),
                     attribution_batch_size: int | None = None) -> pd.DataFrame:
    """Denoising patches of ``base`` (N rows) with ``source``: attribution for all (its backward
    pass ``attribution_batch_size`` rows per step, default ``batch_size``), exact for the top
    ``k`` by attribution (see the module doc for the columns)."""
    from interp.attribution import attribution_patching
    if k < 1:
        raise SpatialBiasError(f"--screen {k}: confirm at least 1 patch (or leave --screen out for exact patching)")
    est = attribution_patching(lvlm, base, source, patches, correct, candidates, targets, interventions=interventions,
                               batch_size=attribution_batch_size or batch_size, grid=grid)
    top = set(rank_patches(est)[:k])
    keep = [p for p in patches if (p.site, p.group) in top]
    exact = run_patches(lvlm, base, source, keep, correct, candidates, targets, interventions=interventions,
                        batch_size=batch_size, grid=grid)
    rest = est[[(s, g) not in top for s, g in zip(est.site, est.group)]]
    rest = rest.assign(metric=rest.base_metric + rest.attribution).drop(columns="attribution")
    out = pd.concat([exact.assign(method=EXACT), rest.assign(method=ESTIMATE)], ignore_index=True)
    order = {(p.site, p.group): j for j, p in enumerate(patches)}
    out["_o"] = [order[(s, g)] for s, g in zip(out.site, out.group)]
    return out.sort_values(["item", "_o"], kind="stable").drop(columns="_o").reset_index(drop=True)


def screen_misses(exact: pd.DataFrame, est: pd.DataFrame, ks: Sequence[int], floor: float = 0.05) -> list[dict]:
    """Per K: the patches whose exact |restoration| ≥ ``floor`` (of the clean − corrupt gap, item
    means) that are not among the top K by attribution. ``exact``: run_patches (denoising),
    ``est``: attribution_patching of the same patches."""
    r = restoration(exact, "denoise")
    big = {(s, g) for s, g, v in zip(r.site, r.group, r.restoration) if abs(v) >= floor}
    ranked = rank_patches(est)
    out = []
    for k in ks:
        missed = sorted(big - set(ranked[:k]))
        out.append({"k": int(k), "patches": len(ranked), "effects": len(big), "missed": len(missed),
                    "miss_rate": len(missed) / max(len(big), 1), "missed_patches": [f"{s}/{g}" for s, g in missed]})
    return out
