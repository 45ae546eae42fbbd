"""Cell-identity probes (``analyses/kinds/cellprobe.py``), validated on the organism: a tiny LLaVA
whose CLIP tower has *learned absolute* position embeddings and whose 2-layer Llama LM has RoPE
(which adds nothing to the residual stream). The target's own tokens show the same shape and
colour wherever it stands, so decoding its cell from them reads position information.

Expectations, written before the test-sized run below (30 items, every placement; a smoke run of
the code on 8 items of another probe had been made while writing it and had shown accuracies near
chance at every site — reported in the issue's answer; the expectations are the a-priori ones):

* C1 (exact): on LLaVA the image tokens of ``lm.input`` are the projector's output, so the two
  sites give identical features, predictions and accuracies.
* C2: the shuffled-label control sits near chance (1/9) at every site: point value ≤ 1/9 + 0.1.
* C3 (a priori, from CLIP's learned absolute position embeddings): at the first vision block the
  cell is decodable above the control: selectivity's bootstrap interval above 0.
* C4: the last LM block also holds the cell above its control (selectivity interval above 0):
  RoPE adds nothing to the residual, but under causal attention a token's context (the image
  tokens before it) depends on its cell, so position is present implicitly.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analyses.tasks import Context
from test_lens import condition


@pytest.fixture(scope="module")
def probe30(tmp_path_factory):
    from probes.build import shapes_probe
    out = tmp_path_factory.mktemp("cellprobe30")
    shapes_probe(out, n_items=30, seed=31, progress=False)
    return out


@pytest.fixture(scope="module")
def organism_run(organism, probe30):
    from analyses.kinds import cellprobe
    rows, d = cellprobe.run(organism, condition("cellprobe", probe30, 30, folds=5, alpha=1.0), Context(batch_size=64))
    r = pd.DataFrame(rows)
    print("\n" + r[r.site.notna()].pivot_table(index="site", columns="metric", values="value", sort=False)
          .round(3).to_string())
    print(r[r.metric == "cellprobe_selectivity"][["site", "value", "ci_low", "ci_high"]].round(3).to_string())
    return r, d


def _at(r, metric, site, col="value"):
    return float(r[(r.metric == metric) & (r.site == site)][col].iloc[0])


def test_projector_and_lm_input_agree_exactly(organism_run):
    r, d = organism_run
    a, b = (d[d.site == s].sort_values(["item", "target_cell"]) for s in ("projector", "lm.input"))
    assert (a.pred.to_numpy() == b.pred.to_numpy()).all()
    assert _at(r, "cellprobe_accuracy", "projector") == _at(r, "cellprobe_accuracy", "lm.input")


def test_control_is_near_chance(organism_run):
    r, _ = organism_run
    ctl = r[r.metric == "cellprobe_control"]
    assert len(ctl) == 2 + 1 + 1 + 2 and (ctl.value <= 1 / 9 + 0.1).all(), ctl


@pytest.mark.xfail(strict=True, reason=(
    "C3 contradicted (kept as written): at vision.blocks.0 accuracy 0.181 vs control 0.148, selectivity 0.033 "
    "[-0.011, 0.081]. The organism's CLIP position embeddings are small beside its content (mean spread 0.44 "
    "over patches vs 17 for the target's features: the cell explains ~0.000 of their variance), so its vision "
    "side carries almost no linearly decodable position; the LM blocks do (C4)."))
def test_vision_block_0_decodes_the_cell(organism_run):
    r, _ = organism_run
    assert _at(r, "cellprobe_selectivity", "vision.blocks.0", "ci_low") > 0


def test_last_lm_block_holds_the_cell(organism_run):
    r, _ = organism_run
    assert _at(r, "cellprobe_selectivity", "lm.blocks.1", "ci_low") > 0


def test_ridge_probe_is_grouped_deterministic_and_decodes_a_planted_signal():
    from analyses.kinds.cellprobe import ridge_cv
    rng = np.random.default_rng(0)
    y, g = np.tile(np.arange(9), 12), np.repeat(np.arange(12), 9)
    x = np.eye(9)[y] @ rng.normal(size=(9, 40)) * 2 + rng.normal(size=(108, 40))
    p = ridge_cv(x, y, g, 9)
    assert (p == y).mean() > 0.9 and (ridge_cv(x, y, g, 9) == p).all()
    wide = np.hstack([x, rng.normal(size=(108, 300))])  # features outnumber rows: the dual form
    assert (ridge_cv(wide, y, g, 9) == y).mean() > 0.5
    assert (ridge_cv(rng.normal(size=(108, 40)), y, g, 9) == y).mean() < 0.3  # noise: near 1/9


@pytest.mark.parametrize("arch", sorted(__import__("interp.tiny", fromlist=["BUILDERS"]).BUILDERS))
def test_cellprobe_runs_on_tiny_architectures_under_bapa(arch, tmp_path):
    """Every site of every architecture's tiny model is probed or reported unresolved; Qwen2-VL
    (vision blocks before the 2×2 merger, M-RoPE LM) resolves all; Gemma3 (2×2 pooled soft tokens:
    the LM sites cannot resolve a 3×3 grid) reports its LM sites unresolved."""
    import interp
    from analyses.kinds import cellprobe
    from interp import tiny
    from probes.build import caption_probe
    probe = caption_probe("skimage", tmp_path / "p", n_items=3, seed=0, size=96, progress=False).parent
    lvlm = interp.load(*tiny.BUILDERS[arch]())
    build = f"build_{arch}"
    cond = condition("cellprobe", probe, 3, interventions=[interp.BaPA().to_dict()], folds=3, alpha=1.0)
    rows, d = cellprobe.run(lvlm, cond, Context(batch_size=64))
    r = pd.DataFrame(rows)
    sites = [s for s, _ in cellprobe.probe_sites(lvlm)]
    assert set(r.site.dropna()) == set(sites)
    done = set(r[r.metric == "cellprobe_accuracy"].site)
    assert {s for s in sites if s.startswith("vision.")} <= done
    if build == "build_qwen2vl":
        assert done == set(sites)
    else:
        assert set(r[r.metric == "cellprobe_unresolved"].site) == set(sites) - done
    if build == "build_gemma3":
        assert not any(s.startswith("lm.") for s in done)


def test_lens_and_cellprobe_run_through_plan_runner_summary_and_report(tmp_path, small_probe):
    """Both analyses, registered in analyses/kinds/ alone, flow through the plan, the dry run, the
    runner, summary.json (blocks and findings) and the report (sections and figures)."""
    import json

    from analyses import estimate, plan as pl, report, runner
    cfg = {"models": {"organism": "organism"}, "probes": {"p": str(small_probe)}, "causal_items": 4,
           "interventions": {"conditions": ["baseline", "bapa"]}, "analyses": ["lens", "cellprobe"],
           "analysis": {"cellprobe": {"folds": 2}}}
    p = pl.from_mapping(cfg, tmp_path, tmp_path / "out", "test")
    assert {(c.analysis, c.intervention) for c in p.conditions} == {
        (a, iv) for a in ("lens", "cellprobe") for iv in ("baseline", "bapa")}
    est = estimate.estimate(p, tmp_path / "out")
    assert set(est.forward_rows) == {4 * 9}
    res = runner.run(p, tmp_path / "out", progress=False)
    assert not res["failed"], res
    page = report.build(tmp_path / "out").read_text(encoding="utf-8")
    s = json.loads((tmp_path / "out" / "summary.json").read_text())["runs"][0]
    assert set(s["causal"]["lens"]) == {"baseline", "bapa"} and "lm.blocks.1" in s["causal"]["lens_spread"]["bapa"]
    assert s["causal"]["cellprobe"]["baseline"]["projector"]["accuracy"]["value"] is not None
    claims = {f["claim"] for f in s["findings"]}
    assert any(c.startswith("logit lens at lm.blocks.1") for c in claims)
    assert any(c.startswith("cell probe at lm.blocks.1") for c in claims)
    for anchor in ("logit-lens", "cell-probes"):
        assert f"<section id='{anchor}'>" in page
    assert "lens_margins(" in page and "cellprobe_accuracy(" in page
    assert (tmp_path / "out" / "tables" / "lens.parquet").is_file()
    with pytest.raises(Exception, match="folds must be an integer"):
        pl.from_mapping({**cfg, "analysis": {"cellprobe": {"folds": 1}}}, tmp_path, tmp_path / "o2", "test")


def test_one_item_gives_no_probe_and_no_failure(organism, small_probe):
    from analyses.kinds import cellprobe
    rows, d = cellprobe.run(organism, condition("cellprobe", small_probe, 1, folds=5, alpha=1.0), Context())
    assert rows == [{"metric": "n_items", "value": 1.0}] and d is None
