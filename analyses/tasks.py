"""What the analyses share when they run: the :class:`Context` of one loaded model, the dispatch
of a condition to its registered analysis, and the cell pair the causal analyses work between.

Role: the runner's side of :mod:`analyses.registry`. May import: ``spatialbias``, ``interp``,
``probes``, ``analyses.{registry, evaluate, metrics, causal, memory}`` (a condition is an
:class:`analyses.plan.Condition`, read by attribute, never imported: the plan imports the analyses).

Every row an analysis returns is ``{metric, value[, cell, layer, site, group, ci_low, ci_high]}``
(:data:`analyses.store.COLUMNS`); a value's ``ci_low``/``ci_high`` is its bootstrap 95% interval
over items. The causal analyses work between two cells of the probe: ``cells = "auto"`` takes the
baseline's best and worst cell by accuracy over the whole probe (first on ties), the same for every
intervention of a model, so conditions compare the same pairs.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from analyses import causal, registry
from spatialbias.errors import SpatialBiasError

Result = tuple[list[dict], "pd.DataFrame | None"]
Condition = object
"""An :class:`analyses.plan.Condition` (read by attribute; not imported: the plan imports the analyses)."""


class Context:
    """What the conditions of one loaded model share: the auto-chosen cells per probe, the
    placement pairs per (probe, cells, items), the batch size and progress switch."""

    def __init__(self, batch_size: int = 64, progress: bool = False, budget: int | None = None):
        self.batch_size, self.progress = batch_size, progress
        self.budget = budget  # activation bytes per step (analyses.memory.budget); None: batch_size rows
        self.cells: dict = {}
        self.pairs: dict = {}

    def rows(self, lvlm, profile: str, inputs, what: str = "") -> int:
        """Rows per forward of a step with memory profile ``profile`` (or an analysis' name) on
        rows like ``inputs``: at most the batch size, and as many as the memory model fits in the
        budget (:func:`analyses.memory.rows`)."""
        from analyses import memory
        return memory.rows(lvlm, self.budget, profile, inputs, self.batch_size, what)


def run_condition(lvlm, cond: Condition, ctx: Context | None = None) -> Result:
    """(metric rows, detail table or None) of one condition on a loaded model."""
    ctx = ctx or Context(batch_size=cond.options.get("batch_size", 64))
    return registry.get(cond.analysis).run(lvlm, cond, ctx)


def rng_of(cond: Condition) -> np.random.Generator:
    """The condition's bootstrap generator (seeded by its plan seed)."""
    return np.random.default_rng(cond.seed)


def probe_rows(lvlm, cond: Condition, ctx: Context, rows, profile: str = "forward") -> int:
    """Rows per forward over a probe: the memory model on its first (up to 8) rows as one batch."""
    from analyses.evaluate import probe_batches
    if ctx.budget is None:
        return ctx.batch_size
    _, _, _, sample = next(probe_batches(lvlm, cond.probe_path, rows[:8], 8))
    return ctx.rows(lvlm, profile, sample, f"{cond.analysis} on {cond.probe}")


def patched_count(n_items: int, items: int) -> int:
    """How many of a probe's ``n_items`` items the causal analyses patch when asked for ``items``:
    at most ``items``, and never the last third (rounded up) of the probe, which is held out to
    choose the cells on (``cells = "auto"``)."""
    return max(0, min(items, n_items - -(-n_items // 3)))


def held_out(rows, items: int) -> list:
    """The probe rows of the items the causal analyses do not patch: every item after the first
    :func:`patched_count` (in probe order, the ones :func:`analyses.causal.placement_pairs` takes)."""
    ids = list(dict.fromkeys(r.id for r in rows))
    patched = set(ids[:patched_count(len(ids), items)])
    return [r for r in rows if r.id not in patched]


def held_out_accuracy(lvlm, cond: Condition, ctx: Context) -> np.ndarray:
    """(cells,) the baseline's accuracy per cell on the held-out items (:func:`held_out`: not the
    ones that are then patched, so a gap is not inflated by choosing cells on the same noise),
    computed once per model, probe and items."""
    key = (cond.probe_path, cond.options.get("items"))
    if key not in ctx.cells:
        from analyses.evaluate import check_probe, score_probe
        from analyses.metrics import cell_metrics
        good, _ = check_probe(cond.probe_path)
        rows = held_out([r for _, r in good], int(cond.options.get("items") or 0))
        if not rows or len(rows) == len(good):
            raise SpatialBiasError(f"{cond.probe}: cells = \"auto\" chooses the cells on held-out items and patches "
                                   f"the others, but the probe has {len({r.id for _, r in good})} item(s); build a "
                                   "probe of 2 or more items, or name the cells (patch_cells / --clean-cell "
                                   "--corrupt-cell)")
        df = score_probe(lvlm, cond.probe_path, {"baseline": []}, progress=False, rows=rows,
                         batch_size=probe_rows(lvlm, cond, ctx, rows))
        ctx.cells[key] = np.asarray(cell_metrics(df, seed=cond.seed)["cell_accuracy"], float)
    return ctx.cells[key]


def cells_of(lvlm, cond: Condition, ctx: Context) -> tuple[int, int]:
    """The clean and corrupt cells: given, or (auto) the baseline's best and worst cell by accuracy
    on the held-out items (:func:`held_out_accuracy`; first on ties)."""
    cells = cond.options.get("cells", "auto")
    if cells != "auto":
        return int(cells[0]), int(cells[1])
    acc = held_out_accuracy(lvlm, cond, ctx)
    best, worst = int(np.nanargmax(acc)), int(np.nanargmin(acc))
    return (best, worst) if best != worst else (best, (best + 1) % len(acc))


def pairs_of(lvlm, cond: Condition, ctx: Context, cells: tuple[int, int] | None = None) -> causal.Pairs:
    """The clean / corrupt placement pairs of the condition's items (cached per probe, cells, items):
    between :func:`cells_of`'s cells, or the given (clean, corrupt) ``cells`` on the same items."""
    clean, corrupt = cells if cells is not None else cells_of(lvlm, cond, ctx)
    key = (cond.probe_path, clean, corrupt, cond.options["items"])
    if key not in ctx.pairs:
        items = cond.options["items"]
        if cond.options.get("cells", "auto") == "auto":  # the held-out items chose the cells: patch the others
            from probes.format import read_rows
            items = patched_count(len({r.id for r in read_rows(cond.probe_path)}), items)
        ctx.pairs[key] = causal.placement_pairs(lvlm, cond.probe_path, clean, corrupt, n_items=items)
    return ctx.pairs[key]


def pair_rows(pairs: causal.Pairs) -> list[dict]:
    """The rows that say which cells and how many items a causal condition compared."""
    return [{"metric": "clean_cell", "value": pairs.clean_cell}, {"metric": "corrupt_cell", "value": pairs.corrupt_cell},
            {"metric": "n_items", "value": len(pairs.ids)}]
