"""What a plan will cost before it runs: forward rows per condition (a unit independent of the
machine) and, where earlier runs in the folder timed the same model and analysis, seconds.

Role: ``--dry-run``. May import: ``spatialbias``, ``probes.format``, ``analyses.{plan, store}``.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pandas as pd

from analyses.plan import Condition, Plan
from analyses.store import Store
from spatialbias.errors import SpatialBiasError


def forward_rows(cond: Condition, n_probe_rows: int, n_items: int, lm_layers: int | None) -> int:
    """Rows pushed through the model by one condition."""
    layers = lm_layers or 1
    cells = max(1, round(n_probe_rows / max(n_items, 1)))  # placements per item
    if cond.analysis in ("eval", "similarity"):
        return n_probe_rows
    if cond.analysis == "occlusion":
        return n_probe_rows * (cond.options.get("steps", 20) ** 2 + 1)
    n = min(cond.options.get("items", 20), n_items)
    auto = cells * n_items if cond.options.get("cells") == "auto" else 0  # the baseline pass that picks the cells
    if cond.analysis == "flow":
        return cells * n
    if cond.analysis == "knockout":
        return n * (1 + 3 * (layers + 1)) + auto
    patches = 4 * layers + 6  # default patches: vision blocks, projector, lm.input and LM blocks × 4 groups
    if cond.analysis == "attribution":
        steps = cond.options.get("steps", [1, 8])
        return n * (patches + 2) + sum(n * (2 if k == 1 else k + 1) for k in steps) + auto
    return n * (2 * (patches + 2) + 2 * (layers + 2) + 3) + auto  # both directions, position ids, moved (3 rows)


def estimate(plan: Plan, out: Path) -> pd.DataFrame:
    """One row per condition: status (done/pending), forward rows and, where earlier runs in ``out``
    timed the same model and analysis, an estimate of seconds (their seconds per row × rows)."""
    from probes.format import read_rows
    store = Store(out)
    done = store.done()
    probe_rows: dict[str, tuple[int, int]] = {}
    rows = []
    for c in plan.conditions:
        if c.probe_path not in probe_rows:
            try:
                rs = read_rows(c.probe_path)
                probe_rows[c.probe_path] = (len(rs), len({r.id for r in rs}))
            except SpatialBiasError:  # not built yet: use the build spec
                spec = plan.probes.get(c.probe, {})
                n = int(spec.get("n", 40))
                probe_rows[c.probe_path] = (9 * n * (2 if spec.get("negatives") else 1), n)
        nr, ni = probe_rows[c.probe_path]
        rows.append({"condition_id": c.id, "model": c.model, "probe": c.probe, "intervention": c.intervention,
                     "analysis": c.analysis, "seed": c.seed, "status": "done" if c.id in done else "pending",
                     "forward_rows": forward_rows(c, nr, ni, _lm_layers(c.model_path))})
    df = pd.DataFrame(rows)
    t = store.timings().merge(df[["condition_id", "forward_rows"]], on="condition_id")
    rate = (t.seconds / t.forward_rows).groupby([t.model, t.analysis]).median() if len(t) else pd.Series(dtype=float)
    df["est_seconds"] = [float(rate.get((m, a), np.nan)) * r for m, a, r in zip(df.model, df.analysis, df.forward_rows)]
    return df


@functools.cache
def _lm_layers(model_path: str) -> int | None:
    from interp.load import ALIASES
    p = Path(ALIASES.get(model_path, model_path)) / "config.json"
    if not p.is_file():
        return None
    cfg = json.loads(p.read_text())
    text = cfg.get("text_config", cfg)
    return text.get("num_hidden_layers")
