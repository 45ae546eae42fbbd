"""Runs from Python and notebooks: the same plan → runner → report path as the command line,
with the results as an object that displays as tables in a notebook.

Role: the Python front of :mod:`analyses.plan`, :mod:`analyses.runner` and :mod:`analyses.report`.
May import: those, ``analyses.{store, summary, figures}``.

>>> import analyses
>>> res = analyses.run("analyses/sweeps/organism_agci.toml", "out/sweep-agci")
>>> res                                   # a table of conditions and the causal findings
>>> res.table.head()                      # results.parquet: one row per condition × metric
>>> res.details("patching")               # per-item table of every patching condition
>>> analyses.figures.cell_heatmaps(res.table, model="organism", probe="shapes")
"""
from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

import pandas as pd


class Results:
    """A run folder: ``table`` (results.parquet), ``details(analysis)`` (its per-row / per-item
    tables), ``summary`` (summary.json), ``report()`` (writes the HTML report, returns its path)."""

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)

    @property
    def table(self) -> pd.DataFrame:
        return pd.read_parquet(self.out / "results.parquet")

    def details(self, analysis: str) -> pd.DataFrame:
        from analyses.store import read_details
        return read_details(self.out, self.table, analysis)

    @property
    def summary(self) -> dict:
        p = self.out / "summary.json"
        if p.is_file():
            return json.loads(p.read_text())
        from analyses import summary
        return summary.build(self.out, self.table)

    def report(self) -> Path:
        from analyses import report
        return report.build(self.out)

    def __repr__(self) -> str:
        return f"Results({str(self.out)!r})"

    def _repr_html_(self) -> str:
        from analyses.figures import conditions_table
        e = html.escape
        t = conditions_table(self.table)
        cols = [c for c in ("model", "probe", "intervention", "mean_accuracy", "range", "chi2_p", "n_seeds")
                if c in t.columns]
        parts = [f"<p><b>{e(str(self.out))}</b></p>", t[cols].to_html(index=False, float_format="%.3g")]
        for run in self.summary.get("runs", []):
            if run.get("findings"):
                f = pd.DataFrame(run["findings"])
                parts.append(f"<p>Causal findings · {e(run['model'])} · {e(run['probe'])}</p>"
                             + f.to_html(index=False, float_format="%.3f"))
        return "".join(parts)


def run(config: dict[str, Any] | str | os.PathLike, out: str | os.PathLike, executor: str = "local",
        progress: bool = True, report: bool = True, base: str | os.PathLike | None = None) -> Results:
    """Run (or resume) a plan — a sweep TOML file or its mapping — into ``out``; with ``report``
    write the report too. Raises :class:`spatialbias.errors.SpatialBiasError` for bad input and
    for failed conditions (their lines joined)."""
    from analyses import plan as pl, report as rep, runner
    from spatialbias.errors import SpatialBiasError
    if isinstance(config, dict):
        p = pl.from_mapping(config, Path(base or Path.cwd()), out, "analyses.run")
    else:
        p = pl.load(config, out)
    res = runner.run(p, out, executor=executor, progress=progress)
    if res["failed"]:
        raise SpatialBiasError("; ".join(err for _, err in res["failed"]))
    if report:
        rep.build(out)
    return Results(out)


def demo(model: str = "organism", out: str | os.PathLike = "out/demo", progress: bool = True, **overrides) -> Results:
    """The demo plan (:func:`analyses.plan.demo`: ``analyses/sweeps/demo.toml`` with overrides such
    as ``probe=``, ``n_items=``, ``lambdas=``, ``causal=``, ``causal_items=``) run into ``out``."""
    from analyses import plan as pl
    from interp.load import probe_canvas
    canvas = None if overrides.get("probe") is not None else probe_canvas(model)
    return run(pl.demo(model, canvas=canvas, **overrides), out, progress=progress)
