"""The main job: evaluate baseline, BaPA and AGCI(λ) on a grid probe and write a report.

Writes into ``out``: ``probe/`` (unless a probe is given), ``results.parquet`` + ``results.csv``
(one row per probe row × condition), ``summary.json``, ``figures/*.png|svg`` and ``index.html``.
"""
from __future__ import annotations

import base64
import html
import json
import platform
import time
from pathlib import Path
from typing import Sequence

import pandas as pd
import torch

import interp
from analyses import figures
from analyses.evaluate import score_probe, validate_probe
from analyses.metrics import cell_metrics
from probes.build import shapes_probe
from probes.format import atomic_write_bytes, atomic_write_text

DEFAULT_LAMBDAS = (0.25, 0.5, 1.0, 2.0)


def organism_record(lvlm: interp.LVLM) -> dict | None:
    """The training record shipped beside an organism checkpoint (``analyses.organisms.train``:
    recipe, description of how its bias was planted, seed, threads, steps, ...)."""
    if lvlm.source is None:
        return None
    p = Path(lvlm.source) / "training.json"
    return json.loads(p.read_text()) if p.is_file() else None


def checkpoint_note(lvlm: interp.LVLM) -> dict | None:
    """``provenance.json`` beside a checkpoint (e.g. a random-weight model saved for a pipeline
    demo: ``{"random_weights": true, "note": "..."}``), shown as a warning in the report."""
    if lvlm.source is None:
        return None
    p = Path(lvlm.source) / "provenance.json"
    return json.loads(p.read_text()) if p.is_file() else None


def run(model: str = "organism", out: str | Path = "out/demo", probe: str | Path | None = None,
        n_items: int = 300, lambdas: Sequence[float] = DEFAULT_LAMBDAS, seed: int = 0, batch_size: int = 64,
        device: str | None = None, progress: bool = True, causal: bool = True, causal_items: int = 100,
        trust_remote_code: bool = False) -> dict:
    """Run the whole job; returns the summary dict (also written to ``out/summary.json``)."""
    out = Path(out)
    conditions = {"baseline": [], "bapa": [interp.BaPA()]}
    conditions.update({f"agci λ={lam:g}": [interp.AGCI(lam=lam)] for lam in lambdas})  # validates λ first
    rows = validate_probe(probe) if probe is not None else None  # a bad probe fails before the model loads
    t = {}
    t0 = time.perf_counter()
    lvlm = interp.load(model, device=device, trust_remote_code=trust_remote_code)
    t["load_s"] = time.perf_counter() - t0
    org = organism_record(lvlm)
    note = checkpoint_note(lvlm)
    t0 = time.perf_counter()
    if probe is None:
        probe = shapes_probe(out / "probe", n_items=n_items, seed=seed, cell_px=16 if org else 112,
                             progress=progress).parent
        rows = validate_probe(probe)
    t["probe_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    df = score_probe(lvlm, probe, conditions, batch_size=batch_size, progress=progress, rows=rows)
    t["evaluate_s"] = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    _write_table(df, out)
    summaries = {name: cell_metrics(df[df.condition == name], seed=seed) for name in conditions}
    agci = [dict(summaries[f"agci λ={lam:g}"], **{"lambda": float(lam)}) for lam in lambdas]
    grid = summaries["baseline"]["grid"]
    summary = {
        "model": str(model), "probe": str(probe), "n_rows": int(df["row"].nunique()),
        "n_items": int(df["id"].nunique()), "seed": seed, "grid": grid,
        "conditions": {"baseline": summaries["baseline"], "bapa": summaries["bapa"], "agci": agci},
        "organism": org,
        "probe_sample": [r.to_json() for r in rows[:grid[0] * grid[1]]],
        "software": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                     "python": platform.python_version()},
    }
    t0 = time.perf_counter()
    fig_dir = out / "figures"
    figs = {
        "cell_accuracy": figures.cell_heatmaps(
            {"baseline": summaries["baseline"], "BaPA": summaries["bapa"],
             **{f"AGCI λ={c['lambda']:g}": c for c in agci}}, title="accuracy per grid cell"),
        "cell_p_correct": figures.cell_heatmaps(
            {"baseline": summaries["baseline"], "BaPA": summaries["bapa"],
             **{f"AGCI λ={c['lambda']:g}": c for c in agci}}, key="cell_p_correct",
            title="p(correct answer) per grid cell"),
    }
    if agci:
        figs["agci_lambda"] = figures.lambda_curve(agci, summaries["baseline"], summaries["bapa"])
    if "offset" in df.columns and df["offset"].notna().any():  # a continuous-shift probe
        from analyses.metrics import shift_curve
        curves = {name: shift_curve(df[df.condition == name], seed=seed) for name in ("baseline", "bapa")}
        summary["shift_curve"] = {k: v.to_dict("records") for k, v in curves.items()}
        figs["shift_accuracy"] = figures.shift_curves({"baseline": curves["baseline"], "BaPA": curves["bapa"]})
    t["figures_s"] = time.perf_counter() - t0
    if note:
        summary["model_note"] = note
    if causal:
        from analyses.causal import probe_grid
        try:
            probe_grid(rows, probe)
        except interp.SpatialBiasError as e:  # shift / irregular probes: no cells to patch between
            summary["causal_skipped"] = str(e)
            causal = False
    if causal:
        t0 = time.perf_counter()
        summary["attribution"], causal_figs = causal_section(lvlm, probe, summaries, lambdas, out, causal_items,
                                                             batch_size, progress)
        figs.update(causal_figs)
        t["causal_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for stem, fig in figs.items():
        figures.save(fig, fig_dir, stem)
    t["figures_s"] += time.perf_counter() - t0
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")  # no timings: same seed, same file
    atomic_write_text(out / "timings.json", json.dumps(t, indent=1) + "\n")
    summary["timings"] = t
    atomic_write_text(out / "index.html", render_html(summary, fig_dir, list(figs)))
    return summary


def _write_table(df: pd.DataFrame, out: Path, stem: str = "results") -> None:
    import io
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    atomic_write_bytes(out / f"{stem}.parquet", buf.getvalue())
    atomic_write_text(out / f"{stem}.csv", df.to_csv(index=False))


def causal_section(lvlm, probe, summaries, lambdas, out: Path, n_items: int, batch_size: int, progress: bool,
                   cells: tuple[int, int] | None = None):
    """Patching, position-id patching, attention flow, knockout and attribution patching between
    two cells (default: the baseline's best and worst), for baseline, BaPA and AGCI side by side.
    Writes ``out/causal/*.parquet|csv``; returns (the summary's ``attribution`` block, {stem: figure})."""
    import numpy as np

    from analyses import causal
    if cells is None:
        acc = np.asarray(summaries["baseline"]["cell_accuracy"])
        clean_cell, corrupt_cell = int(np.nanargmax(acc)), int(np.nanargmin(acc))
        if clean_cell == corrupt_cell:
            corrupt_cell = (clean_cell + 1) % len(acc)
    else:
        clean_cell, corrupt_cell = cells
    lam = 0.5 if 0.5 in lambdas else (lambdas[0] if lambdas else 0.5)
    conds = {"baseline": [], "bapa": [interp.BaPA()], f"agci λ={lam:g}": [interp.AGCI(lam=lam)]}
    pairs = causal.placement_pairs(lvlm, probe, clean_cell, corrupt_cell, n_items=n_items)
    ap = causal.activation_patching(lvlm, pairs, conds, batch_size=batch_size, progress=progress)
    pp = causal.position_patching(lvlm, pairs, conds)
    ko = causal.knockout_curves(lvlm, pairs, conds)
    fl = causal.flow_by_placement(lvlm, probe, conds, n_items=min(n_items, 50))
    atp, rho = causal.attribution_check(lvlm, pairs, ap)
    _, rho_ig = causal.attribution_check(lvlm, pairs, ap, steps=8)
    cdir = out / "causal"
    for stem, df in (("activation_patching", ap), ("position_patching", pp), ("knockout", ko),
                     ("attention_flow", fl), ("attribution_patching", atp)):
        _write_table(df, cdir, stem)
    den = ap[(ap.condition == "baseline") & (ap.direction == "denoise")]
    top = den.assign(abs_r=den.restoration.abs()).sort_values("abs_r", ascending=False).head(8)
    own = fl[fl.cell == fl.target_cell]
    block = {
        "clean_cell": clean_cell, "corrupt_cell": corrupt_cell, "n_items": len(pairs.ids),
        "conditions": list(conds), "sites": list(dict.fromkeys(ap.site)),
        "lm_layers": lvlm.adapter.layer_count(lvlm.model, "lm"),
        "restoration": {c: ap[ap.condition == c][["site", "group", "direction", "restoration", "clean", "corrupt"]]
                        .to_dict("records") for c in conds},
        "top_sites": top[["site", "group", "restoration"]].to_dict("records"),
        "attribution_patching": {"spearman_vs_exact": rho, "method": "gradient x activation difference (AtP)",
                                 "spearman_vs_exact_ig8": rho_ig, "patches": len(atp)},
        "position_patching": pp.to_dict("records"),
        "knockout": ko.to_dict("records"),
        "flow_to_target_by_placement": {c: {int(layer): own[(own.condition == c) & (own.layer == layer)]
                                            .sort_values("target_cell").mass.round(4).tolist()
                                            for layer in sorted(own.layer.unique())} for c in conds},
    }
    figs = {"patching_restoration": figures.restoration_heatmaps(ap, "denoise"),
            "patching_noising": figures.restoration_heatmaps(ap, "noise"),
            "position_patching": figures.position_patching_plot(pp),
            "attention_flow_target": figures.flow_target_by_placement(fl, pairs.grid),
            "attention_flow_layer_cell": figures.flow_layer_cell(fl),
            "knockout": figures.knockout_plot(ko)}
    return block, figs


def causal_conclusion(summary: dict) -> str:
    """The causal picture in words; every number is taken from the summary."""
    a = summary.get("attribution")
    if not a:
        return ""
    pp = {(r["condition"], r["layers"]): r for r in a["position_patching"]}
    base_all = pp[("baseline", "all")]
    layer_txt = ", ".join(f"layer {r['layers']} alone {r['restoration']:.0%}" for (c, w), r in pp.items()
                          if c == "baseline" and w != "all")
    rest = {(r["site"], r["group"], r["direction"]): r["restoration"] for r in a["restoration"]["baseline"]}
    n = a["lm_layers"]
    lines = [f"Moving the target from cell {a['clean_cell']} (the baseline's best) to cell {a['corrupt_cell']} "
             f"(its worst) lowers the answer logit difference from {base_all['clean']:.2f} to "
             f"{base_all['corrupt']:.2f} on {a['n_items']} items.",
             f"Position-id patching: giving the target's image tokens, unchanged, the position ids they have in the "
             f"clean placement restores {base_all['restoration']:.0%} of that gap ({layer_txt}); the converse swap "
             f"on the clean run removes {base_all['damage']:.0%} of it. The rotary position ids of the image "
             f"tokens carry the position-dependent difference."]
    per_layer = []
    for i in range(n):
        img, txt = rest.get((f"lm.blocks.{i}", "image", "denoise")), rest.get((f"lm.blocks.{i}", "text", "denoise"))
        if img is not None and txt is not None:
            per_layer.append(f"after block {i} the image tokens carry {img:.0%} and the text after the image "
                             f"{txt:.0%}")
    if per_layer:
        lines.append("Activation patching (clean → corrupt): at the LM input the target's cell tokens restore "
                     f"{rest.get(('lm.input', 'target', 'denoise'), float('nan')):.0%}; " + "; ".join(per_layer) +
                     ": the difference moves from the image tokens into the question tokens where attention reads "
                     "the image.")
    flows = a["flow_to_target_by_placement"]
    for c, by_layer in flows.items():
        parts = [f"layer {layer}: {min(v):.3f}–{max(v):.3f}" for layer, v in by_layer.items()]
        lines.append(f"Attention from the last token to the target's cell across the 9 placements ({c}): "
                     + ", ".join(parts) + ".")
    ko = [r for r in a["knockout"] if r["condition"] == "baseline" and r["layers"] == "all"]
    if ko:
        d = {r["blocked"]: r["drop"] for r in ko}
        lines.append("Knockout (question tokens blocked from a cell in every layer) changes the logit difference by "
                     f"{-d['target cell']:+.2f} for the target cell, {-d['distractor cell']:+.2f} for a distractor cell "
                     f"and {-d['all image tokens']:+.2f} for all image tokens.")
    for c in a["conditions"][1:]:
        r = pp.get((c, "all"))
        if r:
            lines.append(f"{c}: clean {r['clean']:.2f} vs corrupt {r['corrupt']:.2f} (gap {r['clean'] - r['corrupt']:.2f}); "
                         f"position-id patching restores {r['restoration']:.0%}.")
    at = a["attribution_patching"]
    lines.append(f"Attribution patching vs exact patching over {at['patches']} patches: Spearman "
                 f"{at['spearman_vs_exact']:.2f} for plain gradient × difference, {at['spearman_vs_exact_ig8']:.2f} "
                 "with gradients averaged along 8 pixel interpolation steps; exact patching is the reference here.")
    return " ".join(lines)


def conclusion(summary: dict) -> str:
    """The result in words, every number taken from the summary."""
    b, p = summary["conditions"]["baseline"], summary["conditions"]["bapa"]
    note = summary.get("model_note") or {}
    lines = ["[Random-weight model: these numbers measure the pipeline, not a model.]"] if note.get("random_weights") else []
    lines += [f"Baseline: mean accuracy {b['mean_accuracy']:.3f}, range across cells {b['range']:.3f} "
             f"(std {b['std']:.3f}; chi-square homogeneity p = {b['chi2_p']:.2g}).",
             f"BaPA: mean accuracy {p['mean_accuracy']:.3f}, range {p['range']:.3f} "
             f"(std {p['std']:.3f}; p = {p['chi2_p']:.2g}): the range is "
             f"{p['range'] / b['range']:.0%} of the baseline's." if b["range"] else
             f"BaPA: mean accuracy {p['mean_accuracy']:.3f}, range {p['range']:.3f}."]
    for c in summary["conditions"]["agci"]:
        lines.append(f"AGCI λ={c['lambda']:g}: mean accuracy {c['mean_accuracy']:.3f}, range {c['range']:.3f}.")
    return " ".join(lines)


BASIC_FIGURES = ("cell_accuracy", "cell_p_correct", "agci_lambda", "shift_accuracy")


def _figures_html(fig_dir: Path, stems: list[str]) -> str:
    e = html.escape
    return "".join(
        f"<figure><img alt='{e(s)}' src='data:image/png;base64,"
        f"{base64.b64encode((fig_dir / (s + '.png')).read_bytes()).decode()}'>"
        f"<figcaption>{e(s)} (figures/{e(s)}.png, .svg)</figcaption></figure>" for s in stems)


def render_html(summary: dict, fig_dir: Path, stems: list[str]) -> str:
    """A self-contained page (figures embedded); every string from data is HTML-escaped."""
    e = html.escape
    org = summary.get("organism")
    warn = ""
    if org:
        warn = (f"<p class='warn'><b>Model organism ({e(str(org.get('recipe', '')))}).</b> "
                f"{e(str(org.get('description', '')))} Trained from seed {org['seed']} on {org['threads']} "
                f"thread(s) for {org['steps']} steps.</p>")
    note = summary.get("model_note")
    if note:
        head = "Random weights." if note.get("random_weights") else "Note on this model."
        warn += f"<p class='warn'><b>{e(head)}</b> {e(str(note.get('note', '')))}</p>"
    if summary.get("causal_skipped"):
        warn += f"<p>Causal analyses skipped: {e(summary['causal_skipped'])}.</p>"
    grid = summary.get("grid", [3, 3])
    rows = [("baseline", summary["conditions"]["baseline"]), ("BaPA", summary["conditions"]["bapa"])]
    rows += [(f"AGCI λ={c['lambda']:g}", c) for c in summary["conditions"]["agci"]]
    table = "".join(
        f"<tr><td>{e(name)}</td><td>{c['mean_accuracy']:.3f}</td><td>{c['mean_p_correct']:.3f}</td>"
        f"<td>{c['range']:.3f}</td><td>{c['std']:.3f}</td><td>{c['cv']:.3f}</td><td>{c['chi2_p']:.3g}</td>"
        f"<td>{c['consistency']:.3f}</td></tr>" for name, c in rows)
    cells = "".join(
        f"<tr><td>{e(name)}</td>" + "".join(
            f"<td>{a:.2f} [{lo:.2f}, {hi:.2f}]</td>"
            for a, lo, hi in zip(c["cell_accuracy"], c["cell_ci_low"], c["cell_ci_high"])) + "</tr>"
        for name, c in rows)
    from probes.format import grid_positions
    sample = "".join(
        f"<tr><td>{e(str(r.get('id')))}</td><td>{e(str(r.get('position')))}</td><td>{e(str(r.get('image')))}</td>"
        f"<td>{e(str(r.get('caption', r.get('question'))))}</td><td>{e(str(r.get('answer')))}</td></tr>"
        for r in summary.get("probe_sample", []))
    imgs = _figures_html(fig_dir, [s for s in stems if s in BASIC_FIGURES])

    def causal_html(summary):
        if not summary.get("attribution"):
            return ""
        return (f"<h2>Where the difference comes from</h2><p>{e(causal_conclusion(summary))}</p>"
                + _figures_html(fig_dir, [s for s in stems if s not in BASIC_FIGURES])
                + "<p>Tables: causal/*.parquet|csv.</p>")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Spatial bias report: {e(summary['model'])}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}}
table{{border-collapse:collapse;font-size:13px}}td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}}
td:first-child{{text-align:left}}.warn{{background:#fff4d6;padding:8px;border-left:4px solid #e0a800}}
img{{max-width:100%}}</style></head><body>
<h1>Spatial bias report</h1>
<p>Model: <code>{e(summary['model'])}</code> · probe: <code>{e(summary['probe'])}</code> ·
{summary['n_items']} items × {grid[0] * grid[1]} positions ({grid[0]}×{grid[1]} grid) · seed {summary['seed']}</p>
{warn}
<h2>Conclusion</h2><p>{e(conclusion(summary))}</p>
<h2>Summary per condition</h2>
<table><tr><th>condition</th><th>mean acc</th><th>mean p(correct)</th><th>range</th><th>std</th><th>CV</th>
<th>χ² p</th><th>consistency</th></tr>{table}</table>
<h2>Accuracy per cell with bootstrap 95% intervals</h2>
<table><tr><th>condition</th>{''.join(f'<th>{e(p)}</th>' for p in grid_positions(*grid))}</tr>{cells}</table>
<h2>Probe sample</h2>
<table><tr><th>id</th><th>position</th><th>image</th><th>caption / question</th><th>answer</th></tr>{sample}</table>
<h2>Figures</h2>{imgs}
{causal_html(summary)}
<p>Made by <code>spatialbias report --model {e(summary['model'])}</code>. Per-row scores: results.parquet / results.csv.</p>
</body></html>
"""
