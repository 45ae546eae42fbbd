"""The ``routing`` analysis (analyses/kinds/routing.py) on the tiny Qwen3-VL-MoE: its counts are the
top-k experts of the target cell's image tokens read off HF's own router logits; its rows are
distributions with intervals; its divergence is 0 for identical routing and 1 for disjoint, and
its permutation null separates placement-dependent routing from none; a dense model is refused."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import interp
from analyses.kinds import routing
from analyses.plan import Condition
from analyses.tasks import Context
from interp import tiny
from spatialbias.errors import SpatialBiasError


def condition(probe, items: int, interventions=(), **options) -> Condition:
    return Condition(model="m", model_spec="m", probe="p", probe_spec=str(probe), intervention="baseline",
                     family="baseline", lam=None, interventions=tuple(interventions), analysis="routing", seed=0,
                     options={"items": items, "permutations": 50, **options}, model_path="m", probe_path=str(probe))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from probes.build import shapes_probe
    m = interp.load(*tiny.build_qwen3vl_moe())
    out = tmp_path_factory.mktemp("routingprobe")
    shapes_probe(out, n_items=3, seed=5, cell_px=16, progress=False)  # 48 px: the tiny processor's canvas
    return m, out


def test_counts_are_the_top_k_experts_of_the_target_cells_tokens(setup):
    m, probe = setup
    rows, d = routing.run(m, condition(probe, 3), Context(batch_size=64))
    r = m.adapter.routing(m.model)
    cols = [f"count_{k}" for k in range(r.experts)]
    assert len(d) == 3 * 9 * len(r.layers) and (d.n_tokens > 0).all()
    assert (d[cols].sum(axis=1) == r.top_k * d.n_tokens).all()
    # one row by hand: HF's router logits (output_router_logits), the target cell's image tokens
    from analyses.evaluate import probe_batches
    from probes.format import find_probe, read_rows
    row = read_rows(find_probe(probe))[4]
    _, _, _, x = next(probe_batches(m, probe, [row], 1))
    with torch.no_grad():
        logits = m.model(**x, output_router_logits=True).router_logits
    own = (m.image_map(x).cells(3, 3)[0] == row.cell)
    for j, layer in enumerate(r.layers):
        top = logits[j].topk(r.top_k, -1).indices[own]
        want = torch.bincount(top.flatten(), minlength=r.experts).numpy()
        got = d[(d.row == 4) & (d.layer == layer)][cols].to_numpy()[0]
        assert (got == want).all(), (layer, got, want)
    t = pd.DataFrame(rows)
    freq = t[t.metric == "routing_freq"]
    assert len(freq) == len(r.layers) * 9 * r.experts
    np.testing.assert_allclose(freq.groupby(["layer", "cell"]).value.sum(), 1.0, atol=1e-9)
    assert (freq.ci_low <= freq.value + 1e-12).all() and (freq.value <= freq.ci_high + 1e-12).all()
    js = t[t.metric == "routing_js_mean"]
    assert len(js) == len(r.layers) and js.value.between(0, 1).all()
    p = t[t.metric == "routing_js_p"].value
    assert p.between(1 / 51, 1).all()


def test_the_conditions_interventions_reach_the_routers(setup, monkeypatch):
    """Under BaPA the analysis runs (same rows); under an intervention that writes block 0's router
    logits onto experts 2 and 3, every counted choice of block 0 is expert 2 or 3, once per token."""
    m, probe = setup
    _, base = routing.run(m, condition(probe, 2), Context(batch_size=64))
    _, bapa = routing.run(m, condition(probe, 2, [interp.BaPA().to_dict()]), Context(batch_size=64))
    cols = [c for c in base.columns if c.startswith("count_")]
    assert base[cols].shape == bapa[cols].shape and base.n_tokens.equals(bapa.n_tokens)

    class Force(interp.Intervention):
        kind = "force_router"

        def edits(self, lvlm, inputs):
            return {"lm.blocks.0.router": lambda z: torch.tensor([-30.0, -30.0, 30.0, 30.0]).expand_as(z).clone()}

    monkeypatch.setattr(Condition, "build", lambda self: [Force()])
    _, forced = routing.run(m, condition(probe, 2), Context(batch_size=64))
    f0, b0 = forced[forced.layer == 0], base[base.layer == 0]
    assert (f0.count_2 == f0.n_tokens).all() and (f0.count_3 == f0.n_tokens).all()
    assert (f0.count_0 == 0).all() and (f0.count_1 == 0).all()
    assert not f0[cols].reset_index(drop=True).equals(b0[cols].reset_index(drop=True))


def test_divergence_and_permutation_null_on_known_counts():
    rng = np.random.default_rng(0)
    p = np.array([[0.5, 0.5, 0.0, 0.0]])
    assert routing.js_distance(p, p)[0] == pytest.approx(0.0, abs=1e-12)
    assert routing.js_distance(p, p[:, ::-1])[0] == pytest.approx(1.0)  # disjoint supports
    n, cells = 12, list(range(4))
    same = np.tile(rng.integers(0, 5, (n, 1, 4)), (1, 4, 1)).astype(float)  # each item routed alike everywhere
    rows = pd.DataFrame(routing.layer_rows(same, cells, 0, "s", rng, n_perm=99))
    assert rows[rows.metric == "routing_js_mean"].value.iloc[0] == pytest.approx(0.0, abs=1e-9)
    assert rows[rows.metric == "routing_js_p"].value.iloc[0] == pytest.approx(1.0)
    moved = np.zeros((n, 4, 4))
    moved[:, np.arange(4), np.arange(4)] = 3 + rng.integers(0, 2, (n, 4))  # cell c → expert c
    rows = pd.DataFrame(routing.layer_rows(moved, cells, 0, "s", rng, n_perm=99)).set_index("metric")
    assert rows.loc["routing_js_mean", "value"] == pytest.approx(1.0)
    assert rows.loc["routing_js_p", "value"] == pytest.approx(1 / 100)
    assert rows.loc["routing_js_null", "ci_high"] < 0.9


def test_a_dense_model_is_refused_with_one_line(setup):
    _, probe = setup
    dense = interp.load(*tiny.build_qwen3vl())
    with pytest.raises(SpatialBiasError, match="no mixture-of-experts router") as e:
        routing.run(dense, condition(probe, 1), Context())
    assert "\n" not in str(e.value)


def test_routing_runs_through_plan_runner_summary_and_report(setup, tmp_path):
    """Registered in analyses/kinds/ alone, it flows through the plan, the dry run, the runner,
    summary.json (its block and findings) and the report, under baseline and BaPA."""
    import json

    from analyses import estimate, plan as pl, report, runner
    m, probe = setup
    folder = tiny.save(m.model, m.processor, tmp_path / "moe")
    import shutil
    probe = shutil.copytree(probe, tmp_path / "probe")  # answers the tiny vocabulary has (the runner checks them)
    for f in ("probe.jsonl", "probe.json"):
        text = (probe / f).read_text()
        (probe / f).write_text(text.replace('"green"', '"cat"').replace('"yellow"', '"dog"')
                                  .replace('"white"', '"Yes"'))
    cfg = {"models": {"moe": str(folder)}, "probes": {"p": str(probe)}, "causal_items": 2,
           "interventions": {"conditions": ["baseline", "bapa"]}, "analyses": ["routing"],
           "analysis": {"routing": {"permutations": 20}}}
    p = pl.from_mapping(cfg, tmp_path, tmp_path / "out", "test")
    assert {(c.analysis, c.intervention) for c in p.conditions} == {("routing", "baseline"), ("routing", "bapa")}
    assert set(estimate.estimate(p, tmp_path / "out").forward_rows) == {2 * 9}
    res = runner.run(p, tmp_path / "out", progress=False)
    assert not res["failed"], res
    report.build(tmp_path / "out")
    s = json.loads((tmp_path / "out" / "summary.json").read_text())["runs"][0]
    block = s["causal"]["routing"]
    assert set(block) == {"baseline", "bapa"} and set(block["baseline"]) == {"0", "1"}  # JSON keys: the layers
    assert 0 <= block["bapa"]["1"]["value"] <= 1 and 0 < block["bapa"]["1"]["p"] <= 1
    assert any(f["claim"].startswith("expert routing of the target's image tokens, layer 1") for f in s["findings"])
    with pytest.raises(Exception, match="permutations must be a positive integer"):
        pl.from_mapping({**cfg, "analysis": {"routing": {"permutations": 0}}}, tmp_path, tmp_path / "o2", "test")
