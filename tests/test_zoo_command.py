"""A small zoo end to end through ``spatialbias zoo``: two shipped seed-0 organisms whose bias was
planted in different places (planted-lm: the LM's position ids; planted-vision: before the LM),
few items; the diagnoses must name those places, and a second run must resume (recompute
nothing) and give the same table."""
import pandas as pd
from typer.testing import CliRunner

from analyses.cli import app
from analyses.diagnosis import LM_IDS, kind
from analyses.organisms.zoo_table import EXPECTED


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
    assert kind(tab.loc["planted-vision", "diagnosis"]) in EXPECTED["planted-vision"]
    assert (tab.matches == "yes").all()
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
