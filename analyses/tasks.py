"""What one condition computes: one function per analysis, each turning a loaded model and a
:class:`analyses.plan.Condition` into tidy metric rows and a per-row / per-item detail table.

Role: the analysis dispatch of the runner. May import: ``spatialbias``, ``interp``, ``probes``,
``analyses.{plan, evaluate, scoring, metrics, causal, similarity, occlusion}``.

Every row is ``{metric, value[, cell, layer, site, group, ci_low, ci_high]}``
(:data:`analyses.store.COLUMNS`); a value's ``ci_low``/``ci_high`` is its bootstrap 95% interval
over items. The causal analyses work between two cells of the probe: ``cells = "auto"`` takes the
baseline's best and worst cell by accuracy over the whole probe (first on ties), the same for every
intervention of a model, so conditions compare the same pairs.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import pandas as pd

from analyses import causal
from analyses.plan import Condition
from spatialbias.errors import SpatialBiasError

Result = tuple[list[dict], "pd.DataFrame | None"]


class Context:
    """What the conditions of one loaded model share: the auto-chosen cells per probe, the
    placement pairs per (probe, cells, items), the batch size and progress switch."""

    def __init__(self, batch_size: int = 64, progress: bool = False, budget: int | None = None):
        self.batch_size, self.progress = batch_size, progress
        self.budget = budget  # activation bytes per step (analyses.memory.budget); None: batch_size rows
        self.cells: dict = {}
        self.pairs: dict = {}

    def rows(self, lvlm, analysis: str, inputs, what: str = "") -> int:
        """Rows per forward of ``analysis`` on rows like ``inputs``: at most the batch size, and as
        many as the memory model fits in the budget (:func:`analyses.memory.rows`)."""
        from analyses import memory
        return memory.rows(lvlm, self.budget, analysis, inputs, self.batch_size, what)


def run_condition(lvlm, cond: Condition, ctx: Context | None = None) -> Result:
    """(metric rows, detail table or None) of one condition on a loaded model."""
    ctx = ctx or Context(batch_size=cond.options.get("batch_size", 64))
    task = TASKS.get(cond.analysis)
    if task is None:
        raise SpatialBiasError(f"unknown analysis {cond.analysis!r}; use {', '.join(TASKS)}")
    return task(lvlm, cond, ctx)


def _rng(cond: Condition) -> np.random.Generator:
    return np.random.default_rng(cond.seed)


# ------------------------------------------------------------------------------------------------
# eval: score every probe row under the condition


def eval_task(lvlm, cond: Condition, ctx: Context) -> Result:
    from analyses.evaluate import check_probe, score_probe
    from analyses.metrics import cell_metrics
    opts = cond.options
    good, problems = check_probe(cond.probe_path)
    if problems and not opts.get("skip_bad"):
        raise problems[0]
    if not good:
        raise SpatialBiasError(f"{cond.probe_path}: no usable rows")
    ivs = cond.build()
    bs = _probe_rows(lvlm, cond, ctx, [r for _, r in good])
    df = score_probe(lvlm, cond.probe_path, {cond.intervention: ivs}, batch_size=bs,
                     progress=ctx.progress, rows=[r for _, r in good], string_rule=opts.get("string_rule", False),
                     max_new_tokens=opts.get("max_new_tokens", 4))
    df["line"] = df["row"].map(dict(enumerate(n for n, _ in good)))
    m = cell_metrics(df, seed=cond.seed)
    rows = [{"metric": k, "value": m[k], **({"ci_low": m[f"{k}_ci"][0], "ci_high": m[f"{k}_ci"][1]}
                                            if f"{k}_ci" in m else {})}
            for k in ("mean_accuracy", "mean_p_correct", "range", "range_debiased", "spread", "std", "cv", "chi2",
                      "chi2_p", "paired_stat", "paired_p", "consistency")]
    rows += [{"metric": "n_rows", "value": len(df)}, {"metric": "n_items", "value": df["id"].nunique()},
             {"metric": "n_skipped", "value": len(problems)},
             {"metric": "grid_rows", "value": m["grid"][0]}, {"metric": "grid_cols", "value": m["grid"][1]}]
    for c, (a, lo, hi, pc, n) in enumerate(zip(m["cell_accuracy"], m["cell_ci_low"], m["cell_ci_high"],
                                               m["cell_p_correct"], m["cell_n"])):
        rows += [{"metric": "accuracy", "value": a, "cell": c, "ci_low": lo, "ci_high": hi},
                 {"metric": "p_correct", "value": pc, "cell": c}, {"metric": "n", "value": n, "cell": c}]
    if opts.get("string_rule"):
        rows += [{"metric": "accuracy_prefix", "value": float(df.correct_prefix.mean())},
                 {"metric": "accuracy_robust", "value": float(df.correct_robust.mean())}]
    if cond.family == "agci-adaptive":  # what the rule chose: λ per image, over the probe
        lams = _adaptive_lambdas(lvlm, cond, ivs[0], [r for _, r in good], bs)
        rows += [{"metric": k, "value": v} for k, v in (("lambda_mean", np.mean(lams)), ("lambda_min", np.min(lams)),
                                                         ("lambda_max", np.max(lams)))]
    return rows, df


def _probe_rows(lvlm, cond: Condition, ctx: Context, rows, analysis: str = "eval") -> int:
    """Rows per forward over a probe: the memory model on its first (up to 8) rows as one batch."""
    from analyses.evaluate import probe_batches
    if ctx.budget is None:
        return ctx.batch_size
    _, _, _, sample = next(probe_batches(lvlm, cond.probe_path, rows[:8], 8))
    return ctx.rows(lvlm, analysis, sample, f"{cond.analysis} on {cond.probe}")


def _adaptive_lambdas(lvlm, cond: Condition, iv, rows, batch_size: int) -> list[float]:
    """λ per image that an :class:`interp.AdaptiveAGCI` picks over the probe."""
    from analyses.evaluate import probe_batches
    return [lam for _, _, _, inputs in probe_batches(lvlm, cond.probe_path, rows, batch_size)
            for lam in iv.lambdas(lvlm, inputs)]


# ------------------------------------------------------------------------------------------------
# causal analyses


def _cells(lvlm, cond: Condition, ctx: Context) -> tuple[int, int]:
    """The clean and corrupt cells: given, or (auto) the baseline's best and worst cell by accuracy
    over the whole probe, computed once per model and probe."""
    cells = cond.options.get("cells", "auto")
    if cells != "auto":
        return int(cells[0]), int(cells[1])
    key = cond.probe_path
    if key not in ctx.cells:
        from analyses.evaluate import score_probe
        from analyses.metrics import cell_metrics
        from analyses.evaluate import check_probe
        good, _ = check_probe(cond.probe_path)
        df = score_probe(lvlm, cond.probe_path, {"baseline": []}, progress=False,
                         batch_size=_probe_rows(lvlm, cond, ctx, [r for _, r in good]))
        acc = np.asarray(cell_metrics(df, seed=cond.seed)["cell_accuracy"])
        best, worst = int(np.nanargmax(acc)), int(np.nanargmin(acc))
        ctx.cells[key] = (best, worst) if best != worst else (best, (best + 1) % len(acc))
    return ctx.cells[key]


def _pairs(lvlm, cond: Condition, ctx: Context) -> causal.Pairs:
    clean, corrupt = _cells(lvlm, cond, ctx)
    key = (cond.probe_path, clean, corrupt, cond.options["items"])
    if key not in ctx.pairs:
        ctx.pairs[key] = causal.placement_pairs(lvlm, cond.probe_path, clean, corrupt, n_items=cond.options["items"])
    return ctx.pairs[key]


def _pair_rows(pairs: causal.Pairs) -> list[dict]:
    return [{"metric": "clean_cell", "value": pairs.clean_cell}, {"metric": "corrupt_cell", "value": pairs.corrupt_cell},
            {"metric": "n_items", "value": len(pairs.ids)}]


def patching_task(lvlm, cond: Condition, ctx: Context) -> Result:
    """Activation patching (both directions, every default patch), the vision-side "moved" patch
    (``restoration_denoise`` at ``lm.input``, group ``moved``: the target's clean image tokens in
    the corrupt cell's slots, position ids kept) and position-id patching."""
    pairs, ivs, rng = _pairs(lvlm, cond, ctx), cond.build(), _rng(cond)
    patch_rows = ctx.rows(lvlm, "patching", pairs.clean, "patching")
    act = causal.activation_items(lvlm, pairs, ivs, batch_size=patch_rows, progress=ctx.progress,
                                  screen=cond.options.get("screen"))
    act = pd.concat([act, causal.moved_items(lvlm, pairs, ivs, patch_rows)], ignore_index=True)
    pos = causal.position_items(lvlm, pairs, ivs, batch_size=ctx.rows(lvlm, "forward", pairs.clean, "patching"))
    rows = causal.restoration_rows(act, rng) + causal.position_rows(pos, rng) + _pair_rows(pairs)
    return rows, pd.concat([act.assign(kind="activation"), pos.assign(kind="position")], ignore_index=True)


def knockout_task(lvlm, cond: Condition, ctx: Context) -> Result:
    pairs = _pairs(lvlm, cond, ctx)
    items = causal.knockout_items(lvlm, pairs, cond.build(), batch_size=ctx.rows(lvlm, "knockout", pairs.clean,
                                                                                  "knockout"))
    return causal.knockout_rows(items, _rng(cond)) + _pair_rows(pairs), items


def flow_task(lvlm, cond: Condition, ctx: Context) -> Result:
    items = causal.flow_items(lvlm, cond.probe_path, cond.build(), cond.options["items"],
                              cond.options.get("query", "last"), batch_size=_flow_rows(lvlm, cond, ctx))
    return causal.flow_rows(items, _rng(cond)), items


def _flow_rows(lvlm, cond: Condition, ctx: Context) -> int | None:
    if ctx.budget is None:
        return None  # one forward per target cell, as before
    from probes.format import read_rows
    return _probe_rows(lvlm, cond, ctx, read_rows(cond.probe_path)[:8], "flow")  # no cells needed (no pairs)


def attribution_task(lvlm, cond: Condition, ctx: Context) -> Result:
    """Attribution patching (gradient × difference; with ``steps`` k > 1, gradients averaged along
    k pixel interpolation steps) against exact denoising patching of the same patches."""
    from interp import patching
    pairs, ivs = _pairs(lvlm, cond, ctx), cond.build()
    exact = patching.run_patches(lvlm, pairs.corrupt, pairs.clean, patching.default_patches(lvlm), pairs.correct,
                                 pairs.candidates, pairs.targets, interventions=ivs,
                                 batch_size=ctx.rows(lvlm, "patching", pairs.clean, "attribution"),
                                 grid=pairs.grid).assign(direction="denoise")
    estimates = {("atp" if k == 1 else f"atp×{k}"): causal.attribution_items(
        lvlm, pairs, ivs, steps=k, batch_size=ctx.rows(lvlm, "attribution", pairs.clean, "attribution"))
                 for k in cond.options.get("steps", [1, 8])}
    details = pd.concat([causal._with_ids(exact, pairs).assign(method="exact")]
                        + [e.assign(method=name) for name, e in estimates.items()], ignore_index=True)
    return causal.attribution_rows(exact, estimates, _rng(cond)) + _pair_rows(pairs), details


# ------------------------------------------------------------------------------------------------
# probe-side analyses beside eval


def similarity_task(lvlm, cond: Condition, ctx: Context) -> Result:
    """Caption vs image-token cosine (the paper's similarity score), per cell and pooling."""
    from analyses.similarity import similarity_scores, similarity_summary
    df = similarity_scores(lvlm, cond.probe_path, batch_size=ctx.batch_size, progress=ctx.progress)
    rows = []
    for how, block in similarity_summary(df).items():
        for key in ("sim_image", "sim_cell"):
            rows += [{"metric": f"cell_{key}", "group": how, "cell": c, "value": v}
                     for c, v in enumerate(block[f"cell_{key}"])]
            rows.append({"metric": f"range_{key}", "group": how, "value": block[f"range_{key}"]})
    return rows, df


def occlusion_task(lvlm, cond: Condition, ctx: Context) -> Result:
    """Occlusion maps: the answer logit difference's change per occluder offset and region."""
    from analyses import occlusion as occ
    df = occ.occlusion_scores(lvlm, cond.probe_path, {cond.intervention: cond.build()}, steps=cond.options["steps"],
                              square=cond.options.get("square"), batch_size=ctx.batch_size, progress=ctx.progress)
    rows = [{"metric": "occlusion_mean_abs_delta", "cell": int(r.cell), "group": str(r.region),
             "value": float(r.mean_abs_delta)} for r in occ.region_table(df).itertuples()]
    return rows, df


TASKS: dict[str, Callable[..., Result]] = {
    "eval": eval_task, "patching": patching_task, "knockout": knockout_task, "flow": flow_task,
    "attribution": attribution_task, "similarity": similarity_task, "occlusion": occlusion_task,
}
