"""The summary of a run folder: per (model, probe) its conditions' metrics, its causal block (one
key per analysis, every number with its bootstrap 95% interval), the findings in words and as a
table of claims — all read from ``results.parquet``; every number comes from the table.

Role: ``summary.json`` and the report's text. May import: ``spatialbias``, ``analyses.store``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from analyses.blocks import _f, position_of, restoration_of, runs, vci  # noqa: F401 (re-exported)

EVAL_SCALARS = ("mean_accuracy", "mean_p_correct", "range", "range_debiased", "spread", "std", "cv", "chi2",
                "chi2_p", "paired_stat", "paired_p", "consistency", "n_rows", "n_items", "lambda_mean",
                "accuracy_prefix", "accuracy_robust")
ALPHA = 0.01
"""The homogeneity test's level for the verdict's "biased" / "no significant bias" (as the diagnosis')."""


def eval_block(d: pd.DataFrame) -> dict:
    """Per intervention label (display order): the scalars and per-cell lists of the eval rows of
    one (model, probe), mean over seeds."""
    from analyses.figures.common import intervention_order
    e = d[d.analysis == "eval"]
    out = {}
    for iv in intervention_order(e) if len(e) else []:
        x = e[e.intervention == iv]
        scal = x[x.cell.isna()]
        s = scal.groupby("metric")["value"].mean()
        block = {k: _f(s[k]) for k in EVAL_SCALARS if k in s.index}
        ci = scal.groupby("metric")[["ci_low", "ci_high"]].mean()
        for k in ("mean_accuracy", "range", "spread"):
            if k in ci.index and pd.notna(ci.loc[k, "ci_low"]):
                block[f"{k}_ci"] = [_f(ci.loc[k, "ci_low"]), _f(ci.loc[k, "ci_high"])]
        cells = x[x.cell.notna()].groupby(["metric", "cell"])[["value", "ci_low", "ci_high"]].mean()
        for name, key in (("accuracy", "cell_accuracy"), ("p_correct", "cell_p_correct")):
            if name in cells.index.get_level_values(0):
                c = cells.loc[name].sort_index()
                block[key] = [_f(v) for v in c.value]
                if name == "accuracy":
                    block["cell_ci_low"] = [_f(v) for v in c.ci_low]
                    block["cell_ci_high"] = [_f(v) for v in c.ci_high]
        block["family"] = str(x.family.iloc[0])
        block["lambda"] = _f(x["lambda"].iloc[0])
        out[iv] = block
    return out


def causal_block(d: pd.DataFrame) -> dict:
    """The cells the causal analyses compared, and one key (or two) per registered analysis that
    ran on this (model, probe), each per intervention label (:attr:`Analysis.summary`)."""
    import analyses.kinds  # noqa: F401  (registers the analyses)
    from analyses import registry
    from analyses.figures.common import intervention_order
    out: dict = {}
    c = d[d.analysis != "eval"]
    if c.empty:
        return out
    for r in c[c.metric.isin(["clean_cell", "corrupt_cell", "n_items"])].drop_duplicates("metric").itertuples():
        out.setdefault("cells", {})[{"clean_cell": "clean", "corrupt_cell": "corrupt"}.get(r.metric, r.metric)] = \
            int(r.value)
    order = intervention_order(c)
    for a in registry.analyses().values():
        rows = c[c.analysis == a.name]
        if a.summary is not None and len(rows):
            out.update(a.summary(rows, order))
    return out


def build(src: str | Path, df: pd.DataFrame | None = None) -> dict:
    """The summary of a run folder (also what :mod:`analyses.report` writes to ``summary.json``)."""
    from analyses.store import versions
    src = Path(src)
    df = pd.read_parquet(src / "results.parquet") if df is None else df
    out_runs = []
    for model, probe in runs(df):
        d = df[(df.model == model) & (df.probe == probe)]
        cfg = json.loads(d.config.iloc[0])
        run = {"model": model, "probe": probe, "model_path": cfg.get("model_path"), "probe_path": cfg.get("probe_path"),
               "seeds": sorted(int(s) for s in d.seed.unique()), "conditions": eval_block(d), "causal": causal_block(d)}
        g = d[d.metric.isin(["grid_rows", "grid_cols"])].groupby("metric").value.first()
        run["grid"] = [int(g["grid_rows"]), int(g["grid_cols"])] if len(g) == 2 else [3, 3]
        for name, note in (("organism", "training.json"), ("model_note", "provenance.json")):
            rec = _beside_checkpoint(cfg.get("model_path"), note)
            if rec is not None:
                run[name] = rec
        sim = d[(d.analysis == "similarity") & d.metric.str.startswith("cell_")]
        if len(sim):
            run["similarity"] = {how: {m: [_f(v) for v in g2.sort_values("cell").value] for m, g2 in g.groupby("metric")}
                                 for how, g in sim.groupby("group")}
        run["diagnosis"] = _diagnosis(df, model, probe, run.get("organism"))
        run["findings"] = findings(run)
        run["verdict"] = verdict(run)
        run["conclusion"] = conclusion(run)
        run["causal_conclusion"] = causal_conclusion(run)
        out_runs.append(run)
    plan = src / "plan.json"
    return {"runs": out_runs, "software": versions(),
            "plan": json.loads(plan.read_text()) if plan.is_file() else None}


def _diagnosis(df: pd.DataFrame, model: str, probe: str, training: dict | None) -> dict | None:
    """:func:`analyses.diagnosis.diagnose` of the run under its condition, or None when the rows
    it needs (eval, and patching where there is a bias) were not run. The diagnosis is per plan
    seed: a run of several seeds is diagnosed on its lowest seed, picked here explicitly and
    named in the result's ``seed``."""
    from analyses.diagnosis import diagnose
    from spatialbias.errors import SpatialBiasError
    d = df[(df.model == model) & (df.probe == probe)]
    try:
        return diagnose(df, model, probe, "baseline", seed=int(d.seed.min()) if len(d) else None)
    except SpatialBiasError:
        return None


def _beside_checkpoint(model_path: str, name: str) -> dict | None:
    """``training.json`` (an organism's record: how its bias was planted) or ``provenance.json``
    (e.g. random weights) beside a checkpoint folder."""
    from interp.load import checkpoint_folder
    folder = checkpoint_folder(model_path) if model_path else None
    p = folder / name if folder is not None else None
    return json.loads(p.read_text()) if p is not None and p.is_file() else None


# ------------------------------------------------------------------------------------------------
# words and claims, every number from the run's blocks


def _pct(x: dict | None) -> str:
    if not x:
        return "n/a"
    if x.get("value") is None:
        return "not read (gap too small)"
    ci = "" if x.get("ci_low") is None else f" [{x['ci_low']:.0%}, {x['ci_high']:.0%}]"
    return f"{x['value']:.0%}{ci}"


def _num(x: dict | None, fmt: str = "+.2f") -> str:
    if not x or x.get("value") is None:
        return "n/a"
    ci = "" if x.get("ci_low") is None else f" [{x['ci_low']:{fmt}}, {x['ci_high']:{fmt}}]"
    return f"{x['value']:{fmt}}{ci}"


def homogeneity_p(c: dict) -> tuple[float | None, str]:
    """(p, its name) of a condition's primary homogeneity test: the paired (within-item) test
    where the table has it, else the χ² test of older tables."""
    if c.get("paired_p") is not None:
        return c["paired_p"], "paired test p"
    return c.get("chi2_p"), "χ² p"


def _range_text(c: dict) -> str:
    """The range across cells: debiased with its calibrated interval where the table has it (and
    the raw max − min beside it), else the raw range with the table's interval."""
    ci = c.get("range_ci")
    ci_text = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and ci[0] is not None else ""
    if c.get("range_debiased") is not None:
        return f"{c['range_debiased']:.3f}{ci_text} (debiased; raw max − min {c['range']:.3f})"
    return f"{c['range']:.3f}{ci_text}"


def verdict(run: dict) -> str:
    """The run's answer in two or three sentences, for the top of the report: is there a spatial
    bias under the baseline (primary homogeneity test at :data:`ALPHA`), and what BaPA and AGCI do
    to the range across cells. Every number from the run's eval block."""
    conds = {k: v for k, v in run["conditions"].items() if v.get("range") is not None}
    if not conds:
        return "No eval results in this run: nothing to conclude about spatial bias."
    name = "baseline" if "baseline" in conds else next(iter(conds))
    b = conds[name]
    p, test = homogeneity_p(b)
    n_cells = run["grid"][0] * run["grid"][1]
    if p is None:
        head = f"{name}: accuracy ranges {_range_text(b)} across the {n_cells} cells (no homogeneity test in the table)."
    elif p < ALPHA:
        head = (f"Spatially biased ({name}): accuracy ranges {_range_text(b)} across the {n_cells} cells "
                f"({test} {p:.2g} < {ALPHA:g}); mean accuracy {b['mean_accuracy']:.3f}.")
    else:
        head = (f"No significant spatial bias ({name}): {test} {p:.2g} ≥ {ALPHA:g}; accuracy ranges "
                f"{_range_text(b)} across the {n_cells} cells; mean accuracy {b['mean_accuracy']:.3f}.")
    note = ("[Random-weight model: these numbers measure the pipeline, not a model.] "
            if (run.get("model_note") or {}).get("random_weights") else
            "[Model organism: its bias was planted by its training data; not a fact about pretrained LVLMs.] "
            if run.get("organism") else "")
    return note + head + (f" {interventions_text(conds, name)}" if len(conds) > 1 else "")


def interventions_text(conds: dict, base: str = "baseline") -> str:
    """BaPA's range and test, and AGCI's ranges and mean accuracies over λ, in one sentence."""
    out = []
    for iv, c in conds.items():
        if iv != base and c["family"] != "agci":
            q, qt = homogeneity_p(c)
            out.append(f"{iv}: range {_range_text(c)}" + (f" ({qt} {q:.2g})" if q is not None else "")
                       + f", mean {c['mean_accuracy']:.3f}")
    agci = [(iv, c) for iv, c in conds.items() if c["family"] == "agci"]
    if agci:
        lams, rng, acc = (" / ".join(x) for x in zip(*[(iv.split(":", 1)[-1], f"{c['range']:.3f}",
                                                         f"{c['mean_accuracy']:.3f}") for iv, c in agci]))
        out.append(f"AGCI λ {lams}: range {rng}, mean {acc}")
    return "; ".join(out) + "." if out else ""


def conclusion(run: dict) -> str:
    """The eval result in words."""
    conds = run["conditions"]
    lines = ["[Random-weight model: these numbers measure the pipeline, not a model.]"] \
        if (run.get("model_note") or {}).get("random_weights") else []
    b = conds.get("baseline")
    for iv, c in conds.items():
        if c.get("mean_accuracy") is None:
            continue
        share = f"; the range is {c['range'] / b['range']:.0%} of the baseline's" if b and iv != "baseline" and \
            b.get("range") and c["family"] == "bapa" else ""
        p = f"; χ² homogeneity p = {c['chi2_p']:.2g}" if c.get("chi2_p") is not None else ""
        lines.append(f"{iv}: mean accuracy {c['mean_accuracy']:.3f}, range across cells {c['range']:.3f} "
                     f"(std {c['std']:.3f}{p}){share}.")
    return " ".join(lines)


def findings(run: dict) -> list[dict]:
    """The causal findings as claims, one row each: {claim, intervention, value, ci_low, ci_high};
    each registered analysis contributes its own (:attr:`Analysis.claims`)."""
    import analyses.kinds  # noqa: F401  (registers the analyses)
    from analyses import registry
    out = []
    for a in registry.analyses().values():
        for claim, iv, x in (a.claims(run) if a.claims else []):
            if x:  # a ratio present with no value was gated by its gap: "not read" (analyses.causal.gate)
                out.append({"claim": claim, "intervention": iv, "value": x.get("value"), "ci_low": x.get("ci_low"),
                            "ci_high": x.get("ci_high"), "read": x.get("value") is not None})
    return out


def causal_conclusion(run: dict) -> str:
    """The causal picture of the baseline (and the other conditions' gaps) in words."""
    c = run["causal"]
    if not c.get("patching"):
        return ""
    cells = c.get("cells", {})
    base = "baseline" if "baseline" in c["patching"] else next(iter(c["patching"]))
    p = c["patching"][base]
    lines = [f"Moving the target from cell {cells.get('clean')} (the baseline's best) to cell {cells.get('corrupt')} "
             f"(its worst) lowers the answer logit difference from {_num(p['logit_diff_clean'], '.2f')} to "
             f"{_num(p['logit_diff_corrupt'], '.2f')} on {cells.get('n_items')} items (95% bootstrap intervals)."]
    layer_txt = ", ".join(f"layer {r['layers']} alone {_pct(r)}" for r in c["position_patching"][base]
                          if r["layers"] != "all" and r["what"] == "restoration")
    lines.append(f"Position-id patching: giving the target's image tokens, unchanged, the position ids they have in the "
                 f"clean placement restores {_pct(position_of(run, base, 'all', 'restoration'))} of that gap "
                 f"({layer_txt}); the converse swap on the clean run removes "
                 f"{_pct(position_of(run, base, 'all', 'damage'))} of it.")
    n = max((int(r["site"].split(".")[2]) for r in p["restoration"] if r["site"].startswith("lm.blocks.")), default=-1)
    per_layer = [f"after block {i} the image tokens carry {_pct(restoration_of(run, base, f'lm.blocks.{i}', 'image'))} "
                 f"and the text after the image {_pct(restoration_of(run, base, f'lm.blocks.{i}', 'text'))}"
                 for i in range(n + 1)]
    lines.append(f"Activation patching (clean → corrupt): the target cell's tokens at the LM input restore "
                 f"{_pct(restoration_of(run, base, 'lm.input', 'target'))}; " + "; ".join(per_layer) + ".")
    for iv, by_layer in c.get("flow", {}).items():
        parts = [f"layer {layer}: {min(v['value'] for v in cl):.3f}–{max(v['value'] for v in cl):.3f}"
                 for layer, cl in by_layer.items()]
        lines.append(f"Attention from the last token to the target's cell across the placements ({iv}): "
                     + ", ".join(parts) + ".")
    ko = {r["blocked"]: r for r in c.get("knockout", {}).get(base, []) if r["layers"] == "all"}
    if ko:
        lines.append("Knockout (question tokens blocked from a cell in every layer) changes the logit difference by "
                     + ", ".join(f"{-(r['value']):+.2f} for {'the ' if b != 'all image tokens' else ''}{b}"
                                 for b, r in ko.items()) + ".")
    for iv, q in c["patching"].items():
        if iv != base:
            gap = q["logit_diff_clean"]["value"] - q["logit_diff_corrupt"]["value"]
            lines.append(f"{iv}: clean {q['logit_diff_clean']['value']:.2f} vs corrupt "
                         f"{q['logit_diff_corrupt']['value']:.2f} (gap {gap:.2f}); position-id patching restores "
                         f"{_pct(position_of(run, iv, 'all', 'restoration'))}.")
    for iv, errs in c.get("attribution", {}).items():
        n = next(iter(errs.values()))["patches"]
        lines.append(f"Attribution patching vs exact patching ({iv}): mean |error| "
                     + ", ".join(f"{_num(err, '.2f')} (max {_num({'value': err['max']}, '.2f')}; {name})" for name, err in errs.items())
                     + f" of the gap over the {int(n or 0)} patches that are not 0 or 1 by construction; exact "
                     "patching is the reference.")
    return " ".join(lines)


def numbers(summary: dict) -> np.ndarray:
    """Every number of a summary, flattened (to compare two runs)."""
    out = []

    def walk(x):
        if isinstance(x, dict):
            for k in sorted(x, key=str):
                walk(x[k])
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, (int, float)) and not isinstance(x, bool) and x is not None:
            out.append(float(x))
    walk(summary.get("runs"))
    return np.asarray(out)
