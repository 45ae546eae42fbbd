"""The one renderer: a run folder's results table → ``summary.json``, figures and a self-contained
``index.html``. The demo (``spatialbias report --model M``) and ``report --from DIR`` are this code.

Role: views of the table. May import: ``spatialbias``, ``probes.format``, ``analyses.{store,
summary, figures, registry}`` (each registered analysis brings its report sections and figures). Writes into the run folder: ``summary.json``, ``index.html``,
``figures/*.png|svg``, ``results.csv`` and ``tables/{analysis}.parquet|csv`` (the per-row / per-item
detail tables of every condition, concatenated). Every figure is one call of
:mod:`analyses.figures` on those tables; the page prints under it a caption saying what to read
from it (the first paragraph of the figure function's docstring: :func:`analyses.figures.caption`)
and then the call. Figures are sized for the page's 1150 px (see :mod:`analyses.figures.common`).
The same input gives byte-identical files (no clock, fixed SVG hash salt).
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import pandas as pd

import analyses.kinds  # noqa: F401  (registers the analyses, whose sections and figures the report draws)
from analyses import figures, registry, store, summary as summ
from analyses.registry import FigureSpec, Section
from spatialbias.errors import SpatialBiasError
from spatialbias.files import atomic_write_bytes, atomic_write_text


VERDICT = Section("verdict", "Verdict")
DETAILS = Section("details", "Numbers in detail")
REPRODUCE = Section("reproduce", "Reproduce")


def sections() -> list[Section]:
    """The page top-down: the verdict (what was measured, the answer, the diagnosis) with the
    per-cell maps right under it, then the registered analyses' sections in registry order, then
    the tables and the numbers in words folded under "Numbers in detail", then how to reproduce."""
    out = [VERDICT]
    for a in registry.analyses().values():
        out += [x for x in a.sections if x not in out]
    return out + [DETAILS, REPRODUCE]


TEXT_SECTIONS = ("verdict", "details", "reproduce")
"""Sections that are text and tables, never skipped for want of figures."""


def load_results(src: str | Path) -> pd.DataFrame:
    """The results table of a run folder (or a results.parquet path), checked against the schema;
    a missing, unreadable or wrong-shaped table raises one clear error line."""
    src = Path(src)
    path = src if src.suffix == ".parquet" else src / "results.parquet"
    if not src.exists():
        raise SpatialBiasError(f"--from {src}: no such file or folder; point --from at a run's output folder "
                               "(the one holding results.parquet)")
    if not path.is_file():
        raise SpatialBiasError(f"--from {src}: no results.parquet in {src}; point --from at a run's output "
                               "folder, or run `spatialbias sweep CONFIG --out DIR` first to write it")
    try:
        df = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SpatialBiasError(f"{path}: not a readable parquet file ({type(e).__name__}: {first}); re-run to "
                               "write it again") from None
    missing = [c for c in store.COLUMNS if c not in df.columns]
    if missing:
        raise SpatialBiasError(f"{path}: not a results table of this version, missing column(s) {', '.join(missing)}; "
                               "re-run with this version of spatialbias")
    if df.empty:
        raise SpatialBiasError(f"{path}: the results table has no rows; re-run")
    return df


def plan_figures(df: pd.DataFrame, tables: dict[str, pd.DataFrame]) -> tuple[list[FigureSpec], dict[str, str]]:
    """The figures this folder supports (each registered analysis' ``figures``), each with its
    caption, and for each section without data the reason."""
    specs = [spec for a in registry.analyses().values() if a.figures for spec in a.figures(df, tables)]
    order = {run: k for k, run in enumerate(summ.runs(df))}
    top = sorted((x for x in specs if x.section == "verdict"), key=lambda x: (
        order.get((x.kwargs.get("model"), x.kwargs.get("probe")), len(order)), x.function != "causal_graph"))
    specs = top + [x for x in specs if x.section != "verdict"]  # page order: per run, its causal graph first
    for s in specs:
        s.caption = s.caption or figures.caption(s.function)
    skipped = {x.anchor: "no rows for it in this run (its analysis was not run, or has too little to show)."
               for x in sections() if x.anchor not in TEXT_SECTIONS and not any(s.section == x.anchor for s in specs)}
    return specs, skipped


def write_tables(src: Path, df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """``results.csv`` and ``tables/{analysis}.parquet|csv``: each analysis' detail tables,
    concatenated and tagged with their condition; returns them by analysis."""
    atomic_write_text(src / "results.csv", df.drop(columns=["config", "versions"]).to_csv(index=False))
    out = {}
    for analysis in sorted(df.analysis.unique()):
        t = store.read_details(src, df, analysis)
        if t.empty:
            continue
        buf = io.BytesIO()
        t.to_parquet(buf, index=False)
        atomic_write_bytes(src / "tables" / f"{analysis}.parquet", buf.getvalue())
        atomic_write_text(src / "tables" / f"{analysis}.csv", t.to_csv(index=False))
        out[analysis] = t
    return out


# ------------------------------------------------------------------------------------------------
# HTML


def _fmt(v, fmt=".3f") -> str:
    return "—" if v is None or pd.isna(v) else f"{v:{fmt}}"


def _warnings_html(run: dict, full: bool = False) -> str:
    """The model's provenance notes: an organism's planted bias (one line, or with ``full`` its
    recipe's description and training), a random-weight model."""
    e = html.escape
    parts = []
    org, note = run.get("organism"), run.get("model_note")
    if org:
        more = (f"{e(str(org.get('description', '')))} Trained from seed {org.get('seed')} on {org.get('threads')} "
                f"thread(s) for {org.get('steps')} steps. " if full else "")
        parts.append(f"<p class='warn'><b>Model organism ({e(str(org.get('recipe', 'planted-lm')))}):</b> its spatial "
                     f"bias was planted by its training data. {more}It says nothing about pretrained LVLMs.</p>")
    if note:
        head = "Random weights." if note.get("random_weights") else "Note on this model."
        parts.append(f"<p class='warn'><b>{e(head)}</b> {e(str(note.get('note', '')))}</p>")
    return "".join(parts)


def measured(run: dict) -> str:
    """What was measured, in one line: items × positions, conditions, analyses, seeds."""
    r, c = run["grid"]
    n_items = next((x.get("n_items") for x in run["conditions"].values() if x.get("n_items")), None)
    conds = ", ".join(run["conditions"]) or "none"
    analyses = ["eval"] * bool(run["conditions"]) + [k for k in ("patching", "knockout", "flow", "attribution")
                                                     if run["causal"].get(k)]
    return (f"{'' if n_items is None else f'{int(n_items)} items × '}{r * c} positions ({r}×{c} grid); conditions "
            f"{conds}; analyses {', '.join(analyses)}; seeds {', '.join(map(str, run['seeds']))}.")


def _verdict_html(run: dict) -> str:
    """The top of a run: its name, what was measured, the warnings, the verdict and the diagnosis."""
    e = html.escape
    parts = [f"<div class='verdict'><h3>{e(run['model'])} · {e(run['probe'])}</h3>",
             f"<p class='measured'>Measured: {e(measured(run))}</p>", _warnings_html(run),
             f"<p class='answer'><b>{e(_without_note(run.get('verdict') or ''))}</b></p>"]
    if run.get("diagnosis"):
        parts.append(f"<p>{e(run['diagnosis']['text'])} <span class='rule'>(rule: analyses/diagnosis.py)</span></p>")
    return "".join(parts) + "</div>"


def _without_note(verdict: str) -> str:
    """The verdict without its leading "[…]" provenance note (the page shows it in its own box)."""
    return verdict.split("] ", 1)[1] if verdict.startswith("[") and "] " in verdict else verdict


def _details_html(run: dict) -> str:
    """One run's numbers folded under its name: the results in words, per-condition and per-cell
    tables, a probe sample and the causal findings."""
    e = html.escape
    parts = [f"<p>Model <code>{e(str(run.get('model_path')))}</code> · probe <code>{e(str(run.get('probe_path')))}"
             f"</code></p>", _warnings_html(run, full=True), f"<p>{e(run['conclusion'])}</p>"]
    if run.get("causal_conclusion"):
        parts.append(f"<p>{e(run['causal_conclusion'])}</p>")
    conds = run["conditions"]
    if conds:
        cols = [("mean_accuracy", "mean acc"), ("mean_p_correct", "mean p(correct)"), ("range", "range"),
                ("std", "std"), ("cv", "CV"), ("paired_p", "paired p"), ("chi2_p", "χ² p"),
                ("consistency", "consistency")]
        cols = [(k, h) for k, h in cols if any(c.get(k) is not None for c in conds.values())]
        rows = "".join(f"<tr><td>{e(iv)}</td>" + "".join(
            f"<td>{_fmt(c.get(k), '.2g' if k.endswith('_p') else '.3f')}</td>" for k, _ in cols) + "</tr>"
            for iv, c in conds.items())
        parts.append("<table><tr><th>condition</th>" + "".join(f"<th>{e(h)}</th>" for _, h in cols) + f"</tr>{rows}</table>")
        from probes.format import grid_positions
        names = grid_positions(*run["grid"])
        cells = "".join(f"<tr><td>{e(iv)}</td>" + "".join(
            f"<td>{_fmt(a, '.2f')} [{_fmt(lo, '.2f')}, {_fmt(hi, '.2f')}]</td>"
            for a, lo, hi in zip(c.get("cell_accuracy", []), c.get("cell_ci_low", []), c.get("cell_ci_high", [])))
            + "</tr>" for iv, c in conds.items())
        parts.append("<p>Accuracy per cell with bootstrap 95% intervals:</p><table><tr><th>condition</th>"
                     + "".join(f"<th>{e(n)}</th>" for n in names) + f"</tr>{cells}</table>")
    parts.append(_sample_html(run))
    if run["findings"]:
        rows = "".join(f"<tr><td>{e(f['claim'])}</td><td>{e(f['intervention'])}</td>" + (
            f"<td>{_fmt(f['value'])}</td><td>{_fmt(f['ci_low'])} – {_fmt(f['ci_high'])}</td></tr>"
            if f.get("read", True) else "<td colspan='2'>not read: the gap is not clearly above the minimum "
                                        "(per-item numbers in tables/)</td></tr>") for f in run["findings"])
        parts.append("<p>Causal findings (95% bootstrap intervals over items):</p><table><tr><th>claim</th>"
                     f"<th>condition</th><th>value</th><th>interval</th></tr>{rows}</table>")
    return (f"<details><summary>{e(run['model'])} · {e(run['probe'])}: results in words, per-condition and "
            f"per-cell tables, causal findings</summary>{''.join(parts)}</details>")


def _sd_fmt(v, sd, fmt=".3f") -> str:
    """``v`` (``—`` when missing), with ``± sd`` when there is a seed spread."""
    if v is None or pd.isna(v):
        return "—"
    s = f"{v:{fmt}}"
    return s if sd is None or pd.isna(sd) else f"{s} ± {sd:{'.1g' if fmt.endswith('g') else fmt}}"


def _conditions_html(t: pd.DataFrame) -> str:
    e = html.escape
    cols = [("mean_accuracy", "mean acc", ".3f"), ("range", "range", ".3f"), ("std", "std", ".3f"),
            ("cv", "CV", ".3f"), ("chi2_p", "χ² p", ".2g"), ("consistency", "consistency", ".3f"),
            ("mean_p_correct", "mean p(correct)", ".3f"), ("n_rows", "rows", ".0f")]
    cols = [c for c in cols if c[0] in t.columns]
    head = ("<tr><th>model</th><th>probe</th><th>condition</th><th>family</th><th>λ</th><th>seeds</th>"
            + "".join(f"<th>{e(h)}</th>" for _, h, _ in cols) + "</tr>")
    rows = []
    for r in t.to_dict("records"):
        lam = "" if pd.isna(r["lambda"]) else f"{r['lambda']:g}"
        rows.append(f"<tr><td>{e(str(r['model']))}</td><td>{e(str(r['probe']))}</td>"
                    f"<td>{e(str(r['intervention']))}</td><td>{e(str(r['family']))}</td><td>{e(lam)}</td>"
                    f"<td>{int(r['n_seeds'])}</td>"
                    + "".join(f"<td>{e(_sd_fmt(r.get(c), None if c == 'n_rows' else r.get(c + '_sd'), f))}</td>"
                              for c, _, f in cols) + "</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _sample_html(run: dict, size: int = 96) -> str:
    """One item at every position of the probe's grid: thumbnails with the caption or question."""
    from PIL import Image

    from probes.format import find_probe, read_rows
    e = html.escape
    try:
        probe = find_probe(run["probe_path"])
        rows = read_rows(probe)
    except (SpatialBiasError, TypeError):
        return ""
    first = [x for x in rows if x.id == rows[0].id][:run["grid"][0] * run["grid"][1]]
    cells = []
    for x in first:
        try:
            im = Image.open(probe.image_path(x)).convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, format="PNG", optimize=True)
            src = base64.b64encode(buf.getvalue()).decode()
        except (OSError, SpatialBiasError):
            continue
        cells.append(f"<figure class='thumb'><img alt='{e(x.position)}' src='data:image/png;base64,{src}'>"
                     f"<figcaption>{e(x.position)} · answer {e(x.answer)}</figcaption></figure>")
    text = e(str(first[0].caption if first and first[0].caption is not None else first[0].question if first else ""))
    return (f"<p>Probe sample: item {e(str(rows[0].id))} at every position — “{text}”</p>"
            f"<div class='sample'>{''.join(cells)}</div>") if cells else ""


def _figure_html(spec: FigureSpec, png: bytes, src: Path) -> str:
    e = html.escape
    return (f"<figure id='fig-{e(spec.stem)}'><img alt='{e(spec.function)}: {e(spec.title)}' "
            f"src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
            f"<figcaption><b>{e(spec.title)}</b> — <span class='caption'>{e(spec.caption)}</span>"
            f"<br>Redraw: <code>{e(spec.command(src))}</code> "
            f"(<a href='figures/{e(spec.stem)}.png'>PNG</a>, <a href='figures/{e(spec.stem)}.svg'>SVG</a>)"
            f"</figcaption></figure>")


CSS = ('body{font-family:sans-serif;max-width:1150px;margin:2em auto;line-height:1.4;color:#111}'
       'table{border-collapse:collapse;font-size:12px;margin:0.5em 0}'
       'td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}'
       'td:first-child,th:first-child{text-align:left}'
       'pre{background:#f5f5f5;padding:8px;overflow-x:auto;font-size:12px}'
       'figure{margin:1.5em 0}img{max-width:100%}figcaption{font-size:12px;color:#333}code{word-break:break-all}'
       '.skip{background:#f0f0f0;padding:6px;border-left:4px solid #999}'
       '.warn{background:#fff4d6;padding:8px;border-left:4px solid #e0a800}'
       '.sample{display:flex;flex-wrap:wrap;gap:6px}.thumb{margin:0;text-align:center;font-size:11px}'
       '.thumb img{width:96px;image-rendering:pixelated;border:1px solid #ccc}'
       'nav ol{display:flex;flex-wrap:wrap;gap:0 1.2em;padding:0;margin:0.2em 0;list-style:none;font-size:13px}'
       '.verdict{border-left:5px solid #2a6;background:#f3faf5;padding:4px 12px;margin:0.6em 0}'
       '.verdict h3{margin:0.3em 0}.answer{font-size:17px}.measured,.rule{color:#444;font-size:13px}'
       'details{margin:0.6em 0}summary{cursor:pointer;font-weight:bold}')


def render(src: Path, df: pd.DataFrame, summary: dict, specs: list[FigureSpec], pngs: dict[str, bytes],
           skipped: dict[str, str]) -> str:
    """The page. Every label from the data is HTML-escaped; nothing depends on the clock."""
    e = html.escape
    toc, body = [], []
    for anchor, heading, blurb in ((x.anchor, x.heading, x.blurb) for x in sections()):
        mine = [s for s in specs if s.section == anchor]
        if anchor not in skipped:
            toc.append(f"<li><a href='#{anchor}'>{e(heading)}</a></li>")
        if anchor in skipped:
            continue
        body.append(f"<section id='{anchor}'><h2>{e(heading)}</h2>")
        if blurb:
            body.append(f"<p>{e(blurb)}</p>")
        if anchor == "verdict":
            for r in summary["runs"]:
                body.append(_verdict_html(r))
                body.extend(_figure_html(x, pngs[x.stem], src) for x in mine
                            if (x.kwargs.get("model"), x.kwargs.get("probe")) == (r["model"], r["probe"]))
            mine = []  # drawn beside their runs
        elif anchor == "details":
            n = df.condition_id.nunique()
            body.append(f"<p>{n} conditions · {len(df)} result rows · <code>{e(str(src / 'results.parquet'))}</code></p>")
            table = figures.conditions_table(df)
            if not table.empty:
                body.append("<details><summary>Conditions: eval scalars per model × probe × condition (mean over "
                            "seeds; ± sd across seeds when there are several)</summary>"
                            f"{_conditions_html(table)}</details>")
            body.extend(_details_html(r) for r in summary["runs"])
            if skipped:
                headings = {x.anchor: x.heading for x in sections()}
                body.append("<p class='skip'>Not in this run: " + "; ".join(
                    f"{e(headings[a])} ({e(why)})" for a, why in skipped.items()) + "</p>")
        elif anchor == "reproduce":
            plan = src / "plan.json"
            body.append("<p>Each figure above is one call on the run's tables; in Python or a notebook run "
                        "<code>import pandas as pd, analyses.figures</code> first, then the call printed under the "
                        "figure (its caption is <code>analyses.figures.caption(name)</code>)."
                        f" This page: <code>{e('spatialbias report --from ' + str(src))}</code>.</p>")
            if plan.is_file():
                body.append("<p>The plan as run (<code>plan.json</code>):</p><pre>" + e(plan.read_text()) + "</pre>")
        body.extend(_figure_html(s, pngs[s.stem], src) for s in mine)
        body.append("</section>")
    title = ", ".join(f"{r['model']} · {r['probe']}" for r in summary["runs"])
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>Spatial bias report: {e(title)}</title>
<style>{CSS}</style></head><body>
<h1>Spatial bias report</h1>
<nav id="toc"><ol>{''.join(toc)}</ol></nav>
{''.join(body)}
</body></html>
"""


def build(src: str | Path) -> Path:
    """Write ``summary.json``, ``figures/``, the tables and ``index.html`` into the run folder
    ``src`` (a folder holding ``results.parquet``); returns the page's path. Figures of an earlier
    report that this table no longer makes are removed."""
    src = Path(src)
    df = load_results(src)
    src = (src.parent if src.suffix == ".parquet" else src).resolve()
    tables = write_tables(src, df)
    s = summ.build(src, df)
    atomic_write_text(src / "summary.json", json.dumps(s, indent=1, default=str) + "\n")
    fig_dir = src / "figures"
    specs, skipped = plan_figures(df, tables)
    pngs = {}
    for spec in specs:
        png, _svg = figures.save(spec.draw(df, tables), fig_dir, spec.stem)
        pngs[spec.stem] = png.read_bytes()
    keep = {f"{sp.stem}.{ext}" for sp in specs for ext in ("png", "svg")}
    if fig_dir.is_dir():
        for p in sorted(fig_dir.iterdir()):
            if p.suffix in (".png", ".svg") and p.name not in keep:
                p.unlink()
    page = src / "index.html"
    atomic_write_text(page, render(src, df, s, specs, pngs, skipped))
    return page
