"""An analysis is one registered object: a new one, defined here and nowhere else, runs through
the plan, the runner, the dry run, the summary, the report and the ``causal`` command."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from analyses import estimate, plan as pl, registry, report, runner
from analyses.registry import Analysis, FigureSpec, Section
from spatialbias.errors import SpatialBiasError


def _toy() -> Analysis:
    """Counts the probe rows whose answer is the first candidate: a metric row, a details table, a
    summary block, a claim, a figure in its own section, a cost and a profile."""
    def run(lvlm, cond, ctx):
        from probes.format import read_rows
        rows = read_rows(cond.probe_path)[: cond.options["items"]]
        df = pd.DataFrame({"id": [r.id for r in rows], "answer": [r.answer for r in rows]})
        return [{"metric": "toy_rows", "value": float(len(df))}], df

    def summary(d, order):
        return {"toy": {iv: float(d[d.intervention == iv].value.iloc[0]) for iv in order if iv in set(d.intervention)}}

    def claims(run_):
        return [("toy rows counted", iv, {"value": v}) for iv, v in run_["causal"].get("toy", {}).items()]

    def figures(df, tables):
        d = registry.having(df, "toy", "toy_rows")
        return [FigureSpec("toy-section", registry.stem("toy_", m, p), "range_vs_accuracy", {}, f"toy · {m}")
                for m, p in registry.model_probes(d)]

    return Analysis("toy", run, lambda cond, rows, items, layers: 7 * cond.options["items"],
                    options={"items": None}, profile=lambda opts: "forward", causal=True, summary=summary,
                    claims=claims, figures=figures, sections=(Section("toy-section", "Toy analysis", "Rows counted."),))


@pytest.fixture
def toy(monkeypatch):
    registry.analyses()  # the built-in ones first
    a = _toy()
    monkeypatch.setitem(registry._REGISTRY, "toy", a)
    return a


def test_a_registered_analysis_runs_through_plan_runner_summary_and_report(toy, tmp_path, small_probe):
    cfg = {"models": {"organism": "organism"}, "probes": {"p": str(small_probe)}, "causal_items": 3,
           "interventions": {"conditions": ["baseline", "bapa"]}, "analyses": ["eval", "toy"]}
    p = pl.from_mapping(cfg, tmp_path, tmp_path / "out", "test")
    assert {c.analysis for c in p.conditions} == {"eval", "toy"}
    assert [c.options["items"] for c in p.conditions if c.analysis == "toy"] == [3, 3]  # sweep-wide causal_items
    est = estimate.estimate(p, tmp_path / "out")
    assert set(est[est.analysis == "toy"].forward_rows) == {21}  # its own cost
    res = runner.run(p, tmp_path / "out", progress=False)
    assert not res["failed"]
    df = pd.read_parquet(tmp_path / "out" / "results.parquet")
    assert df[df.analysis == "toy"].set_index("intervention").value.to_dict() == {"baseline": 3.0, "bapa": 3.0}
    page = report.build(tmp_path / "out").read_text(encoding="utf-8")
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["runs"][0]["causal"]["toy"] == {"baseline": 3.0, "bapa": 3.0}
    assert {"claim": "toy rows counted", "intervention": "bapa", "value": 3.0, "ci_low": None,
            "ci_high": None, "read": True} in s["runs"][0]["findings"]
    assert "<section id='toy-section'><h2>Toy analysis</h2>" in page and "toy · organism" in page
    assert (tmp_path / "out" / "tables" / "toy.parquet").is_file()


def test_the_causal_command_runs_every_registered_causal_analysis(toy, tmp_path, small_probe):
    from typer.testing import CliRunner

    from analyses.cli import app
    r = CliRunner().invoke(app, ["causal", "--model", "organism", "--probe", str(small_probe), "--out",
                                 str(tmp_path / "c"), "--n-items", "2", "--dry-run"])
    assert r.exit_code == 0, r.output
    listed = {line.split()[4] for line in r.output.splitlines()[1:] if len(line.split()) > 5
              and line.split()[1] == "organism"}
    assert {"patching", "knockout", "flow", "attribution", "toy"} <= listed, r.output


def test_registry_refuses_unknown_and_twice_registered_names(toy):
    with pytest.raises(SpatialBiasError, match="unknown analysis 'nope'; use eval, "):
        registry.get("nope")
    with pytest.raises(SpatialBiasError, match="registered twice"):
        registry.register(_toy())
    assert estimate.analysis_profiles("patching", {"screen": 3}) == ("patching", "attribution")
    assert estimate.analysis_profiles("attribution") == ("patching", "attribution")  # exact patches, then AtP
    assert estimate.profiles("attribution") == ("attribution",) and estimate.profiles("knockout") == ("forward",)


def test_screen_is_priced_as_attribution_plus_k_exact_patches():
    """`--screen K` runs a backward pass (attribution's memory profile) and K exact patches per
    direction instead of all of them: its dry-run cost and profile say so."""
    from analyses.plan import Condition
    base = dict(model="m", model_spec="m", probe="p", probe_spec="p", intervention="baseline", family="baseline",
                lam=None, interventions=(), analysis="patching", seed=0, model_path="organism")
    full = Condition(**base, options={"items": 10, "cells": [8, 0]})
    screened = Condition(**base, options={"items": 10, "cells": [8, 0], "screen": 3})
    assert estimate.forward_rows(screened, 90, 10, 2) < estimate.forward_rows(full, 90, 10, 2)
    assert estimate.analysis_profiles("patching", screened.options) == ("patching", "attribution")
    from interp.load import ORGANISM_DIR
    s = estimate.Shapes.from_config(json.loads((ORGANISM_DIR / "config.json").read_text()))
    r_full, peak_full, _ = estimate.memory_row(full, {"max_memory": {"all": 10 ** 12}})
    r_scr, peak_scr, _ = estimate.memory_row(screened, {"max_memory": {"all": 10 ** 12}})
    assert peak_scr >= s.weights + estimate.activation_peak(s, "attribution", r_scr) - 1
