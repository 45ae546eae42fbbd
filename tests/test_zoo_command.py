"""A small zoo end to end through ``spatialbias zoo``: two shipped seed-0 organisms whose bias was
planted in different places (planted-lm: the LM's position ids; planted-vision: before the LM),
few items; the diagnoses must name those places, and a second run must resume (recompute
nothing) and give the same table."""
import pandas as pd
from typer.testing import CliRunner

from analyses.cli import app
from analyses.diagnosis import LM_IDS, kind


def test_small_zoo_diagnoses_where_the_bias_was_planted(tmp_path, monkeypatch):
    monkeypatch.setenv("SPATIALBIAS_THREADS", "1")
    out = tmp_path / "zoo"
    args = ["zoo", "--out", str(out), "--recipes", "planted-lm,planted-vision", "--seeds", "0", "--items", "60",
            "--causal-items", "20", "--lambdas", "0.5", "--cache", str(tmp_path / "cache")]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    tab = pd.read_parquet(out / "zoo.parquet").set_index("organism")
    assert kind(tab.loc["planted-lm", "diagnosis"]) == LM_IDS
    assert (tab.condition == "baseline").all()  # every organism under ordinary ids, as a user's checkpoint
    # planted-vision (trained under BaPA ids) reads the vision side — and, under ordinary ids it never saw
    # in training, the LM's ids too (docs/diagnosis.md, the blind campaign): its vision component is present
    assert "vision side" in kind(tab.loc["planted-vision", "diagnosis"])
    assert tab.loc["planted-lm", "matches"] == "yes"
    assert not (tmp_path / "cache" / "zoo").exists() or not any((tmp_path / "cache" / "zoo").glob("*-seed0-*"))
    for f in ("zoo.csv", "zoo.md", "summary.json", "figures/zoo_diagnosis.png", "figures/zoo_diagnosis.svg"):
        assert (out / f).is_file(), f
    res = pd.read_parquet(out / "results.parquet")
    moved = res[(res.metric == "restoration_denoise") & (res.group == "moved")]
    assert set(moved.intervention) == {"baseline", "bapa"} and len(moved) == 4
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert pd.read_parquet(out / "results.parquet").equals(res)
    pd.testing.assert_frame_equal(pd.read_parquet(out / "zoo.parquet").set_index("organism"), tab)


def test_mrope_organisms_are_also_evaluated_under_keep_hw(tmp_path):
    """BaPA keep_hw joins the zoo plan (eval only) for an organism whose adapter reads M-RoPE ids
    from its checkpoint's config — never from its name: a LLaVA organism named like the M-RoPE
    recipe gets none, the M-RoPE checkpoint under any name gets it."""
    from analyses.organisms import zoo, zoo_table
    models = {"mrope-s0": str(zoo.get("planted-lm", 0)), "anything": str(zoo.get("mrope", 0))}
    assert [zoo_table.rope_kind(p) for p in models.values()] == ["1d", "mrope"]
    plan = zoo_table.plan(models, items=20, causal_items=10, lambdas=[0.5], out=tmp_path)
    keep = [c for c in plan.conditions if c.intervention == zoo_table.KEEP_HW]
    assert [(c.model, c.analysis) for c in keep] == [("anything", "eval")]
    ev = next(c for c in plan.conditions if (c.model, c.analysis, c.intervention) == ("anything", "eval", "baseline"))
    assert (keep[0].options, keep[0].probe_spec, keep[0].probe_path) == (ev.options, ev.probe_spec, ev.probe_path)
    assert keep[0].interventions == ({"kind": "bapa", "variant": "keep_hw"},)
    assert plan.config["keep_hw"]["interventions"] == {"baseline": False, "conditions": [zoo_table.KEEP_HW]}
    assert len({c.id for c in plan.conditions}) == len(plan.conditions)


def test_zoo_table_shows_keep_hw_for_the_mrope_organism(tmp_path, monkeypatch):
    monkeypatch.setenv("SPATIALBIAS_THREADS", "1")
    out = tmp_path / "zoo"
    r = CliRunner().invoke(app, ["zoo", "--out", str(out), "--recipes", "mrope", "--seeds", "0", "--items", "20",
                                 "--causal-items", "10", "--lambdas", "0.5", "--cache", str(tmp_path / "cache")])
    assert r.exit_code == 0, r.output
    row = pd.read_parquet(out / "zoo.parquet").iloc[0]
    assert 0 <= row.keep_hw_range_lo <= row.keep_hw_range <= row.keep_hw_range_hi and 0 < row.keep_hw_acc <= 1
    assert "BaPA keep_hw" in (out / "zoo.md").read_text()


def test_the_campaign_command_is_gone():
    r = CliRunner().invoke(app, ["organism", "zoo", "--out", "x.json"])
    assert r.exit_code != 0
