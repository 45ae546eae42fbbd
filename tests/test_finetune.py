"""``spatialbias finetune`` on the shipped seed-0 planted-lm organism and its shipped LoRA
adapters: three arms × (baseline, BaPA) with intervals, the fine-tuned checkpoints load with
interp.load, and their adapters rebuild the same weights on the base."""
import pandas as pd
import torch
from typer.testing import CliRunner

import interp
from analyses.cli import app
from analyses.organisms.lora import load_merged
from analyses.organisms.zoo import get


def test_finetune_arms_table_and_loadable_adapters(tmp_path, monkeypatch):
    monkeypatch.setenv("SPATIALBIAS_THREADS", "1")
    out = tmp_path / "ft"
    r = CliRunner().invoke(app, ["finetune", "--out", str(out), "--items", "12", "--cache", str(tmp_path / "c")])
    assert r.exit_code == 0, r.output
    tab = pd.read_parquet(out / "finetune.parquet")
    assert set(zip(tab.arm, tab.condition)) == {(a, c) for a in ("no-finetune", "lora", "lora-bapa")
                                                for c in ("baseline", "bapa")}
    assert ((tab.accuracy_lo <= tab.accuracy) & (tab.accuracy <= tab.accuracy_hi)).all()
    assert (out / "index.html").is_file() and (out / "finetune.md").is_file()
    m = interp.load(str(out / "lora"))
    merged = load_merged(get("planted-lm", 0), out / "lora" / "adapter")
    a, b = m.model.state_dict(), merged.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    base = interp.load("organism").model.state_dict()
    assert any(not torch.equal(a[k], base[k]) for k in a)  # the adapter changed the LM


def test_report_and_summary_carry_the_diagnosis(tmp_path, monkeypatch):
    """summary.json has a diagnosis per run (None where the rows it needs are missing) and the
    report page prints each one's text."""
    import html
    import json

    from analyses.organisms import finetune
    monkeypatch.setenv("SPATIALBIAS_THREADS", "1")
    out = tmp_path / "ft"
    finetune.run(out, items=12, cache_dir=tmp_path / "c", progress=False)
    s = json.loads((out / "summary.json").read_text())
    page = (out / "index.html").read_text()
    assert all("diagnosis" in r for r in s["runs"])
    shown = [r["diagnosis"] for r in s["runs"] if r["diagnosis"]]
    assert shown and all(html.escape(d["text"]) in page for d in shown)
