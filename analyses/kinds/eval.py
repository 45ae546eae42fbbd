"""``eval``: score every probe row under the condition; per-cell accuracy and the statistics of
:func:`analyses.metrics.cell_metrics`. Figures: the verdict's and every condition's per-cell maps,
range against mean accuracy, AGCI against λ, accuracy against a continuous shift."""
from __future__ import annotations

import numpy as np

from analyses.registry import Analysis, FigureSpec, Section, having, model_probes, register, stem
from analyses.tasks import Context, probe_rows
from spatialbias.errors import SpatialBiasError

SCALARS = ("mean_accuracy", "mean_p_correct", "range", "range_debiased", "spread", "std", "cv", "chi2", "chi2_p",
           "paired_stat", "paired_p", "consistency")
"""The condition-level metrics written as rows (with their intervals where they have one)."""


def run(lvlm, cond, ctx: Context):
    from analyses.evaluate import check_probe, score_probe
    from analyses.metrics import cell_metrics
    opts = cond.options
    good, problems = check_probe(cond.probe_path)
    if problems and not opts.get("skip_bad"):
        raise problems[0]
    if not good:
        raise SpatialBiasError(f"{cond.probe_path}: no usable rows")
    ivs = cond.build()
    bs = probe_rows(lvlm, cond, ctx, [r for _, r in good])
    df = score_probe(lvlm, cond.probe_path, {cond.intervention: ivs}, batch_size=bs,
                     progress=ctx.progress, rows=[r for _, r in good], string_rule=opts.get("string_rule", False),
                     max_new_tokens=opts.get("max_new_tokens", 4))
    df["line"] = df["row"].map(dict(enumerate(n for n, _ in good)))
    m = cell_metrics(df, seed=cond.seed)
    rows = [{"metric": k, "value": m[k], **({"ci_low": m[f"{k}_ci"][0], "ci_high": m[f"{k}_ci"][1]}
                                            if f"{k}_ci" in m else {})} for k in SCALARS]
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


def _adaptive_lambdas(lvlm, cond, iv, rows, batch_size: int) -> list[float]:
    """λ per image that an :class:`interp.AdaptiveAGCI` picks over the probe."""
    from analyses.evaluate import probe_batches
    return [lam for _, _, _, inputs in probe_batches(lvlm, cond.probe_path, rows, batch_size)
            for lam in iv.lambdas(lvlm, inputs)]


def cost(cond, probe_rows: int, items: int, lm_layers: int) -> int:
    return probe_rows


def figures(df, tables) -> list[FigureSpec]:
    """The verdict's map (baseline vs BaPA, runs in table order), every condition's per-cell map,
    range against accuracy and AGCI against λ over all runs, shift curves."""
    from analyses.blocks import runs
    specs = []
    cells = having(df, "eval", "accuracy", cell=1)
    for m, p in runs(cells):  # in the order the verdict lists the runs
        present = set(cells[(cells.model == m) & (cells.probe == p)].intervention)
        shown = [iv for iv in ("baseline", "bapa") if iv in present]
        if shown:
            specs.append(FigureSpec("verdict", stem("verdict_cells_", m, p), "cell_heatmaps",
                                    {"model": m, "probe": p, "intervention": shown}, f"{m} · {p}"))
    for m, p in model_probes(cells):
        specs.append(FigureSpec("cell-accuracy", stem("cell_accuracy_", m, p), "cell_heatmaps",
                                {"model": m, "probe": p}, f"{m} · {p}"))
    scal = having(df, "eval", ["mean_accuracy", "range"])
    if len(scal) and scal.intervention.nunique() > 1:
        specs.append(FigureSpec("range-accuracy", "range_vs_accuracy", "range_vs_accuracy", {}, "all runs"))
    if scal.family.isin(["agci", "agci-adaptive"]).any():
        specs.append(FigureSpec("agci-lambda", "agci_lambda", "lambda_curves", {}, "all runs"))
    ev = tables.get("eval")
    if ev is not None and "offset" in ev.columns and ev["offset"].notna().any():
        for m, p in model_probes(ev[ev["offset"].notna()]):
            specs.append(FigureSpec("probe-side", stem("shift_", m, p), "shift_curves", {"model": m, "probe": p},
                                    f"shift · {m} · {p}", details="eval"))
    return specs


PROBE_SIDE = Section("probe-side", "Probe-side checks", "Caption vs image-token similarity per cell; occlusion maps; "
                     "accuracy against a continuous shift.")
"""The section the probe-side analyses (similarity, occlusion) and shift curves share."""

EVAL = register(Analysis(
    "eval", run, cost, options={"string_rule": False, "max_new_tokens": 4, "skip_bad": False}, figures=figures,
    sections=(Section("cell-accuracy", "Accuracy per grid cell", "Per-cell accuracy on the probe's grid, one panel "
                      "per condition."),
              Section("range-accuracy", "Range vs mean accuracy", "One point per condition, coloured by family."),
              Section("agci-lambda", "AGCI: accuracy and range against λ", "Fixed λ as lines, adaptive AGCI as marked "
                      "points, baseline and BaPA as reference lines."),
              PROBE_SIDE)))
