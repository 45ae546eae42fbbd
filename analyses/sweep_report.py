"""``spatialbias report --from DIR``: a self-contained HTML report of a sweep's results table.

Reads ``DIR/results.parquet`` (and, when present, ``DIR/sweep.toml`` and ``DIR/conditions.jsonl``),
writes ``DIR/report/index.html`` (figures embedded as base64 PNG, a linked table of contents)
and ``DIR/report/figures/*.png|svg``. Every figure is one call of :mod:`analyses.sweep_figures`
on the results table; the report prints that call under the figure. Sections without data
say so instead of drawing an empty figure. The same input gives a byte-identical page.
"""
from __future__ import annotations

import base64
import html
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from analyses import figures, sweep_figures as sf
from interp.errors import SpatialBiasError
from probes.format import atomic_write_text

REPORT_DIR = "report"


@dataclass
class FigureSpec:
    """One figure of the report: ``sweep_figures.<function>(df, **kwargs)`` saved as ``stem``."""
    section: str
    stem: str
    function: str
    kwargs: dict = field(default_factory=dict)
    title: str = ""

    def command(self, parquet: str | Path) -> str:
        """The Python call that redraws this figure from the results table."""
        args = "".join(f", {k}={v!r}" for k, v in self.kwargs.items())
        return f"analyses.sweep_figures.{self.function}(pd.read_parquet({str(parquet)!r}){args})"

    def draw(self, df: pd.DataFrame):
        return getattr(sf, self.function)(df, **self.kwargs)


# (anchor, heading, what the section shows)
SECTIONS = (
    ("sweep", "Sweep", None),
    ("conditions", "Conditions", "Eval scalars per model × probe × intervention (mean over seeds; ± sd across "
                                 "seeds when there are several)."),
    ("cell-accuracy", "Accuracy per grid cell", "Per-cell accuracy on the probe's grid, one panel per "
                                                "intervention."),
    ("range-accuracy", "Range vs mean accuracy", "One point per condition, coloured by family: fixed-λ AGCI, "
                                                 "adaptive AGCI, BaPA and the baseline side by side."),
    ("agci-lambda", "AGCI: accuracy and range against λ", "Fixed λ as lines, adaptive AGCI as marked points at "
                                                          "its scale, baseline and BaPA as reference lines."),
    ("patching", "Activation patching", "Normalised restoration of the clean − corrupt logit difference per "
                                        "site × token group, between the best and the worst placement."),
    ("position-patching", "Position-id patching", "Share of the gap restored by giving the target's image tokens "
                                                  "their clean position ids, all layers and per layer."),
    ("attention-flow", "Attention to the target", "Attention mass from the last token to the target's cell, at "
                                                  "each placement of the target, per layer."),
    ("reproduce", "Reproduce", None),
)


# --------------------------------------------------------------------------- input

def load_results(src: str | Path) -> pd.DataFrame:
    """The results table of a sweep folder (or a results.parquet path), checked against the
    sweep schema; a missing, unreadable or wrong-shaped table raises :class:`SpatialBiasError`."""
    src = Path(src)
    path = src if src.suffix == ".parquet" else src / "results.parquet"
    if not src.exists():
        raise SpatialBiasError(f"--from {src}: no such file or folder; point --from at a sweep's output folder "
                               "(the one holding results.parquet)")
    if not path.is_file():
        raise SpatialBiasError(f"--from {src}: no results.parquet in {src}; point --from at a sweep's output "
                               "folder, or run `spatialbias sweep CONFIG --out DIR` first to write it")
    try:
        df = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SpatialBiasError(f"{path}: not a readable parquet file ({type(e).__name__}: {first}); re-run the "
                               "sweep to write it again") from None
    missing = [c for c in sf.COLUMNS if c not in df.columns]
    if missing:
        raise SpatialBiasError(f"{path}: not a sweep results table, missing column(s) {', '.join(missing)}; "
                               "re-run the sweep with this version of spatialbias")
    if df.empty:
        raise SpatialBiasError(f"{path}: the results table has no rows; re-run the sweep")
    return df


# --------------------------------------------------------------------------- plan

def _slug(*labels) -> str:
    """A file-name-safe stem from labels, made unique by a short hash of the exact labels."""
    import hashlib
    text = "_".join(re.sub(r"[^a-z0-9]+", "-", str(x).lower()).strip("-")[:24] for x in labels)
    return f"{text}_{hashlib.sha1(repr(labels).encode()).hexdigest()[:6]}"


def _has(df: pd.DataFrame, analysis: str, metric: str | list[str], **extra) -> pd.DataFrame:
    d = sf.select(df, analysis=analysis, metric=metric)
    for col, want in extra.items():
        d = d[d[col].notna()] if want == "notna" else d[d[col] == want]
    return d


def plan(df: pd.DataFrame) -> tuple[list[FigureSpec], dict[str, str]]:
    """The figures this table supports, and for each section without data the reason.
    Returns (specs in report order, {section anchor: why it is skipped})."""
    specs: list[FigureSpec] = []
    skipped: dict[str, str] = {}
    pairs = lambda d: sorted(set(zip(d.model, d.probe)))  # noqa: E731

    cells = _has(df, "eval", "accuracy", cell="notna")
    for m, p in pairs(cells):
        specs.append(FigureSpec("cell-accuracy", "cell_accuracy_" + _slug(m, p), "cell_heatmaps",
                                {"model": m, "probe": p}, f"{m} · {p}"))
    if cells.empty:
        skipped["cell-accuracy"] = "no eval rows with per-cell accuracy in this sweep."
    scal = _has(df, "eval", ["mean_accuracy", "range"])
    if not scal.empty:
        specs.append(FigureSpec("range-accuracy", "range_vs_accuracy", "range_vs_accuracy", {},
                                "all models and probes"))
    else:
        skipped["range-accuracy"] = "no eval mean_accuracy / range rows in this sweep."
    if scal.family.isin(["agci", "agci-adaptive"]).any():
        specs.append(FigureSpec("agci-lambda", "agci_lambda", "lambda_curves", {}, "all models and probes"))
    else:
        skipped["agci-lambda"] = "no AGCI conditions (fixed λ or adaptive) with eval results in this sweep."
    for direction in ("denoise", "noise"):
        for m, p in pairs(_has(df, "patching", f"restoration_{direction}")):
            specs.append(FigureSpec("patching", f"restoration_{direction}_" + _slug(m, p), "restoration_heatmaps",
                                    {"model": m, "probe": p, "direction": direction},
                                    f"{direction} · {m} · {p}"))
    if not any(s.section == "patching" for s in specs):
        skipped["patching"] = "no restoration_denoise / restoration_noise rows (analysis 'patching' not run)."
    pos = _has(df, "patching", "position_restoration")
    for m, p in pairs(pos):
        specs.append(FigureSpec("position-patching", "position_restoration_" + _slug(m, p), "position_restoration",
                                {"model": m, "probe": p}, f"{m} · {p}"))
    if pos.empty:
        skipped["position-patching"] = "no position_restoration rows (analysis 'patching' not run)."
    flow = _has(df, "flow", "attention_to_target", cell="notna", layer="notna")
    for m, p in pairs(flow):
        specs.append(FigureSpec("attention-flow", "attention_to_target_" + _slug(m, p), "attention_to_target",
                                {"model": m, "probe": p}, f"{m} · {p}"))
    if flow.empty:
        skipped["attention-flow"] = "no attention_to_target rows (analysis 'flow' not run)."
    if sf.conditions_table(df).empty:
        skipped["conditions"] = "no eval scalars (mean_accuracy, range, …) in this sweep."
    return specs, skipped


# --------------------------------------------------------------------------- HTML

def _fmt(v, sd=float("nan"), fmt=".3f") -> str:
    """``v`` (``—`` when missing), with ``± sd`` when there is a seed spread."""
    if pd.isna(v):
        return "—"
    s = f"{v:{fmt}}"
    return s if pd.isna(sd) else f"{s} ± {sd:{'.1g' if fmt.endswith('g') else fmt}}"


def _sd(r: dict, col: str) -> float:
    return float("nan") if col == "n_rows" else r.get(col + "_sd", float("nan"))


def _table_html(t: pd.DataFrame) -> str:
    e = html.escape
    cols = [("mean_accuracy", "mean acc", ".3f"), ("range", "range", ".3f"), ("std", "std", ".3f"),
            ("cv", "CV", ".3f"), ("chi2_p", "χ² p", ".2g"), ("consistency", "consistency", ".3f"),
            ("mean_p_correct", "mean p(correct)", ".3f"), ("n_rows", "rows", ".0f")]
    cols = [c for c in cols if c[0] in t.columns]
    head = ("<tr><th>model</th><th>probe</th><th>intervention</th><th>family</th><th>λ</th><th>seeds</th>"
            + "".join(f"<th>{e(h)}</th>" for _, h, _ in cols) + "</tr>")
    rows = []
    for r in t.to_dict("records"):
        lam = "" if pd.isna(r["lambda"]) else f"{r['lambda']:g}"
        rows.append(f"<tr><td>{e(str(r['model']))}</td><td>{e(str(r['probe']))}</td>"
                    f"<td>{e(str(r['intervention']))}</td><td>{e(str(r['family']))}</td><td>{e(lam)}</td>"
                    f"<td>{int(r['n_seeds'])}</td>"
                    + "".join(f"<td>{e(_fmt(r.get(c), _sd(r, c), f))}</td>" for c, _, f in cols)
                    + "</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _sweep_html(df: pd.DataFrame, src: Path) -> str:
    e = html.escape
    n_cond = df.condition_id.nunique()
    by_analysis = df.groupby("analysis").condition_id.nunique().sort_index()
    parts = [f"<p>Results: <code>{e(str(src / 'results.parquet'))}</code> · {n_cond} conditions ("
             + ", ".join(f"{e(str(a))}: {n}" for a, n in by_analysis.items()) + f") · {len(df)} rows.</p>",
             "<table><tr><th>what</th><th>labels</th></tr>"]
    for col in ("model", "probe", "intervention", "family", "seed"):
        vals = (sf.intervention_order(df) if col == "intervention" else sf.family_sorted(df[col].dropna())
                if col == "family" else sorted(df[col].dropna().unique()))
        parts.append(f"<tr><td>{col}</td><td>{e(', '.join(map(str, vals)))}</td></tr>")
    parts.append("</table>")
    conds = src / "conditions.jsonl"
    if conds.is_file():
        n = sum(1 for ln in conds.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip())
        parts.append(f"<p><code>conditions.jsonl</code>: {n} conditions.</p>")
    toml = src / "sweep.toml"
    if toml.is_file():
        parts.append("<p>The sweep's configuration (<code>sweep.toml</code>):</p><pre>"
                     + e(toml.read_text(encoding="utf-8", errors="replace")) + "</pre>")
    else:
        parts.append("<p>No <code>sweep.toml</code> beside the results.</p>")
    if "versions" in df.columns:
        vs = sorted(set(df.versions.dropna()))
        rows = []
        for v in vs:
            try:
                d = json.loads(v)
                v = ", ".join(f"{k} {d[k]}" for k in sorted(d))
            except (ValueError, TypeError, AttributeError):
                pass
            rows.append(f"<li>{e(str(v))}</li>")
        if rows:
            parts.append("<p>Software versions in the table:</p><ul>" + "".join(rows) + "</ul>")
    return "".join(parts)


def _figure_html(spec: FigureSpec, png: bytes, parquet: Path) -> str:
    e = html.escape
    return (f"<figure id='fig-{e(spec.stem)}'><img alt='{e(spec.function)}: {e(spec.title)}' "
            f"src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
            f"<figcaption><b>{e(spec.title)}</b> — <code>{e(spec.command(parquet))}</code> "
            f"(<a href='figures/{e(spec.stem)}.png'>PNG</a>, <a href='figures/{e(spec.stem)}.svg'>SVG</a>)"
            f"</figcaption></figure>")


def render(df: pd.DataFrame, src: Path, specs: list[FigureSpec], pngs: dict[str, bytes],
           skipped: dict[str, str]) -> str:
    """The page. Every label from the data is HTML-escaped; nothing depends on the clock."""
    e = html.escape
    parquet = src / "results.parquet"
    toc, body = [], []
    for anchor, heading, blurb in SECTIONS:
        mine = [s for s in specs if s.section == anchor]
        sub = "".join(f"<li><a href='#fig-{e(s.stem)}'>{e(s.title)}</a></li>" for s in mine)
        toc.append(f"<li><a href='#{anchor}'>{e(heading)}</a>" + (f"<ol>{sub}</ol>" if sub else "") + "</li>")
        body.append(f"<section id='{anchor}'><h2>{e(heading)}</h2>")
        if anchor in skipped:
            body.append(f"<p class='skip'>Skipped: {e(skipped[anchor])}</p></section>")
            continue
        if blurb:
            body.append(f"<p>{e(blurb)}</p>")
        if anchor == "sweep":
            body.append(_sweep_html(df, src))
        elif anchor == "conditions":
            body.append(_table_html(sf.conditions_table(df)))
        elif anchor == "reproduce":
            body.append(
                "<p>Each figure above is one call on the results table; in Python or a notebook run "
                "<code>import pandas as pd, analyses.sweep_figures</code> first, then the call printed under the "
                f"figure. The whole report: <code>{e('spatialbias report --from ' + str(src))}</code>; from Python "
                f"<code>{e(f'analyses.sweep_report.build({str(src)!r})')}</code>. The figures are also written as "
                "PNG and SVG under <code>figures/</code> beside this page.</p>")
        body.extend(_figure_html(s, pngs[s.stem], parquet) for s in mine)
        body.append("</section>")
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>Sweep report: {e(str(src))}</title>
<style>{CSS}</style></head><body>
<h1>Sweep report</h1>
<nav id="toc"><h2>Contents</h2><ol>{''.join(toc)}</ol></nav>
{''.join(body)}
</body></html>
"""


#: The page's style sheet (no external resources).
CSS = ('body{font-family:sans-serif;max-width:1150px;margin:2em auto;line-height:1.4;color:#111}'
       'table{border-collapse:collapse;font-size:12px;margin:0.5em 0}'
       'td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}'
       'td:nth-child(-n+4),th:nth-child(-n+4){text-align:left}'
       'td:nth-child(n+5){white-space:nowrap}'
       'pre{background:#f5f5f5;padding:8px;overflow-x:auto;font-size:12px}'
       'figure{margin:1.5em 0}'
       'img{max-width:100%}'
       'figcaption{font-size:12px;color:#333}'
       'code{word-break:break-all}'
       '.skip{background:#f0f0f0;padding:6px;border-left:4px solid #999}'
       'nav ol{margin:0.2em 0}')


# --------------------------------------------------------------------------- build

def build(src: str | Path, out: str | Path | None = None) -> Path:
    """Write ``<out>/index.html`` and ``<out>/figures/*.png|svg`` (default ``out``: ``src/report``)
    for the sweep in ``src``; returns the page's path. Figures of an earlier run that this table
    no longer makes are removed from ``<out>/figures``."""
    src = Path(src)
    df = load_results(src)
    src = (src.parent if src.suffix == ".parquet" else src).resolve()  # the printed calls work from anywhere
    out = Path(out) if out is not None else src / REPORT_DIR
    fig_dir = out / "figures"
    specs, skipped = plan(df)
    pngs = {}
    for spec in specs:
        png, _svg = figures.save(spec.draw(df), fig_dir, spec.stem)
        pngs[spec.stem] = png.read_bytes()
    keep = {f"{s.stem}.{ext}" for s in specs for ext in ("png", "svg")}
    if fig_dir.is_dir():
        for p in sorted(fig_dir.iterdir()):
            if p.suffix in (".png", ".svg") and p.name not in keep:
                p.unlink()
    page = out / "index.html"
    atomic_write_text(page, render(df, src, specs, pngs, skipped))
    return page
