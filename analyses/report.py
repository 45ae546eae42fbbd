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
    """The training record shipped beside an organism checkpoint (how its bias was planted)."""
    if lvlm.source is None:
        return None
    p = Path(lvlm.source) / "training.json"
    return json.loads(p.read_text()) if p.is_file() else None


def run(model: str = "organism", out: str | Path = "out/demo", probe: str | Path | None = None,
        n_items: int = 300, lambdas: Sequence[float] = DEFAULT_LAMBDAS, seed: int = 0, batch_size: int = 64,
        device: str | None = None, progress: bool = True) -> dict:
    """Run the whole job; returns the summary dict (also written to ``out/summary.json``)."""
    out = Path(out)
    conditions = {"baseline": [], "bapa": [interp.BaPA()]}
    conditions.update({f"agci λ={lam:g}": [interp.AGCI(lam=lam)] for lam in lambdas})  # validates λ first
    if probe is not None:
        validate_probe(probe)  # a bad probe fails before the model loads
    t = {}
    t0 = time.perf_counter()
    lvlm = interp.load(model, device=device)
    t["load_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if probe is None:
        org = organism_record(lvlm)
        probe = shapes_probe(out / "probe", n_items=n_items, seed=seed, cell_px=16 if org else 112,
                             progress=progress).parent
    t["probe_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    df = score_probe(lvlm, probe, conditions, batch_size=batch_size, progress=progress)
    t["evaluate_s"] = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    _write_table(df, out)
    summaries = {name: cell_metrics(df[df.condition == name], seed=seed) for name in conditions}
    agci = [dict(summaries[f"agci λ={lam:g}"], **{"lambda": float(lam)}) for lam in lambdas]
    summary = {
        "model": str(model), "probe": str(probe), "n_rows": int(df["row"].nunique()),
        "n_items": int(df["id"].nunique()), "seed": seed,
        "conditions": {"baseline": summaries["baseline"], "bapa": summaries["bapa"], "agci": agci},
        "organism": organism_record(lvlm),
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
    for stem, fig in figs.items():
        figures.save(fig, fig_dir, stem)
    t["figures_s"] = time.perf_counter() - t0
    summary["timings"] = t
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    atomic_write_text(out / "index.html", render_html(summary, fig_dir, list(figs)))
    return summary


def _write_table(df: pd.DataFrame, out: Path) -> None:
    import io
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    atomic_write_bytes(out / "results.parquet", buf.getvalue())
    atomic_write_text(out / "results.csv", df.to_csv(index=False))


def conclusion(summary: dict) -> str:
    """The result in words, every number taken from the summary."""
    b, p = summary["conditions"]["baseline"], summary["conditions"]["bapa"]
    lines = [f"Baseline: mean accuracy {b['mean_accuracy']:.3f}, range across cells {b['range']:.3f} "
             f"(std {b['std']:.3f}; chi-square homogeneity p = {b['chi2_p']:.2g}).",
             f"BaPA: mean accuracy {p['mean_accuracy']:.3f}, range {p['range']:.3f} "
             f"(std {p['std']:.3f}; p = {p['chi2_p']:.2g}): the range is "
             f"{p['range'] / b['range']:.0%} of the baseline's." if b["range"] else
             f"BaPA: mean accuracy {p['mean_accuracy']:.3f}, range {p['range']:.3f}."]
    for c in summary["conditions"]["agci"]:
        lines.append(f"AGCI λ={c['lambda']:g}: mean accuracy {c['mean_accuracy']:.3f}, range {c['range']:.3f}.")
    return " ".join(lines)


def render_html(summary: dict, fig_dir: Path, stems: list[str]) -> str:
    """A self-contained page (figures embedded); every string from data is HTML-escaped."""
    e = html.escape
    org = summary.get("organism")
    warn = ""
    if org:
        warn = (f"<p class='warn'><b>Model organism.</b> This model's spatial bias was {e(org['bias_planted'])}. "
                f"Trained from seed {org['config']['seed']} on {org['config']['threads']} thread(s) for "
                f"{org['steps']} steps.</p>")
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
    from probes.format import POSITIONS
    imgs = "".join(
        f"<figure><img alt='{e(s)}' src='data:image/png;base64,"
        f"{base64.b64encode((fig_dir / (s + '.png')).read_bytes()).decode()}'>"
        f"<figcaption>{e(s)} (figures/{e(s)}.png, .svg)</figcaption></figure>" for s in stems)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Spatial bias report: {e(summary['model'])}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}}
table{{border-collapse:collapse;font-size:13px}}td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}}
td:first-child{{text-align:left}}.warn{{background:#fff4d6;padding:8px;border-left:4px solid #e0a800}}
img{{max-width:100%}}</style></head><body>
<h1>Spatial bias report</h1>
<p>Model: <code>{e(summary['model'])}</code> · probe: <code>{e(summary['probe'])}</code> ·
{summary['n_items']} items × 9 positions · seed {summary['seed']}</p>
{warn}
<h2>Conclusion</h2><p>{e(conclusion(summary))}</p>
<h2>Summary per condition</h2>
<table><tr><th>condition</th><th>mean acc</th><th>mean p(correct)</th><th>range</th><th>std</th><th>CV</th>
<th>χ² p</th><th>consistency</th></tr>{table}</table>
<h2>Accuracy per cell with bootstrap 95% intervals</h2>
<table><tr><th>condition</th>{''.join(f'<th>{e(p)}</th>' for p in POSITIONS)}</tr>{cells}</table>
<h2>Figures</h2>{imgs}
<p>Made by <code>spatialbias report --model {e(summary['model'])}</code>. Per-row scores: results.parquet / results.csv.</p>
</body></html>
"""
