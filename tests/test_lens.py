"""The logit lens per cell (``analyses/kinds/lens.py``), validated on the organism, whose answer
is known: its bias was planted in the LM's position ids (training targets skewed toward the
bottom-right cells), so the eval is worse with the target in cell 0 than in cell 8.

Expectations, written before the test-sized runs below (a smoke run of the code on 8 items of
another probe had been made while writing it; it is reported in the issue's answer):

* E1 (exact, every architecture): the lens after the last block is the model's own answer margin:
  equal to the eval's ``logit_diff`` (:func:`analyses.evaluate.score_probe`) of the same rows.
* E2 (exact): at ``lm.input`` the last position is a text token that has not mixed with anything,
  so its lens margin is the same at every placement (spread 0).
* E3 (organism): after the last block, the margin with the target in cell 8 exceeds the margin in
  cell 0 (the planted ordering), mean over items, and its spread over placements has a bootstrap
  interval above 0.
* E4 (organism): the position-dependent gap appears inside the LM (RoPE acts in attention, in
  block 0 already), not before it: the spread is 0 at ``lm.input`` (E2) and above 0 after block 0.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pathlib import Path

from analyses.plan import Condition
from analyses.tasks import Context


def condition(analysis: str, probe, items: int, interventions=(), **options) -> Condition:
    return Condition(model="m", model_spec="m", probe="p", probe_spec=str(probe), intervention="baseline",
                     family="baseline", lam=None, interventions=tuple(interventions), analysis=analysis, seed=0,
                     options={"items": items, **options}, model_path="m", probe_path=str(probe))


@pytest.fixture(scope="module")
def probe12(tmp_path_factory):
    from probes.build import shapes_probe
    out = tmp_path_factory.mktemp("lensprobe")
    shapes_probe(out, n_items=12, seed=21, progress=False)
    return out


def _eval_margins(lvlm, probe, details: pd.DataFrame) -> np.ndarray:
    from analyses.evaluate import score_probe, validate_probe
    from analyses.kinds.lens import item_rows
    rows, _ = item_rows(validate_probe(probe), int(details["item"].max()) + 1)
    df = score_probe(lvlm, probe, {"baseline": []}, progress=False, rows=rows)
    return df.sort_values("row").logit_diff.to_numpy()


def test_lens_on_the_organism(organism, probe12):
    from analyses.kinds import lens
    rows, d = lens.run(organism, condition("lens", probe12, 12), Context(batch_size=64))
    r = pd.DataFrame(rows)
    last = f"lm.blocks.{organism.adapter.layer_count(organism.model, 'lm') - 1}"
    # E1: the lens after the last block is the model's own margin (the eval's logit_diff)
    got = d[d.site == last].sort_values("row").margin.to_numpy()
    np.testing.assert_allclose(got, _eval_margins(organism, probe12, d), atol=1e-4)
    # E2: lm.input, last position: no placement dependence at all
    assert d[d.site == "lm.input"].groupby("item").margin.nunique().eq(1).all()
    spread = r[r.metric == "lens_spread"].set_index("site")
    assert spread.loc["lm.input", "value"] == pytest.approx(0, abs=1e-6)
    # E3: cell 8 above cell 0 after the last block; spread interval above 0
    m = r[(r.metric == "lens_margin") & (r.site == last)].set_index("cell").value
    assert m.loc[8] > m.loc[0]
    assert spread.loc[last, "ci_low"] > 0
    # E4: the gap is there after block 0 already
    assert spread.loc["lm.blocks.0", "ci_low"] > 0
    # rows per (site, cell) with intervals; the per-item table has every cell's image-token margin
    lm = r[r.metric == "lens_margin"]
    assert len(lm) == 9 * 3 and lm[["ci_low", "ci_high"]].notna().all().all()
    assert {f"cell_{c}" for c in range(9)} <= set(d.columns) and len(d) == 12 * 9 * 3
    print("\nlens margin by site × placement cell:\n",
          lm.pivot_table(index="site", columns="cell", values="value", sort=False).round(2).to_string())
    print(r[r.metric.str.endswith("spread")][["metric", "site", "value", "ci_low", "ci_high"]].round(3).to_string())


@pytest.fixture(scope="module")
def caption33(tmp_path_factory):
    """A Yes/No caption probe on a 3×3 grid: answers the tiny models' word vocabulary holds."""
    from probes.build import caption_probe
    d = tmp_path_factory.mktemp("cap33")
    return caption_probe("skimage", d / "p33", n_items=2, seed=0, size=96, progress=False).parent


@pytest.mark.parametrize("arch", sorted(__import__("interp.tiny", fromlist=["BUILDERS"]).BUILDERS))
def test_lens_is_exact_on_tiny_architectures(arch, caption33):
    """E1 on every architecture's tiny model: M-RoPE (Qwen2-VL, Qwen3-VL), pooled soft tokens with
    their own norm and scaling (Gemma3, Gemma4 with its final softcap), DeepStack, MoE, a hybrid
    LM (Qwen3.5), tiles and a thumbnail (InternVL), newline slots (LLaVA-NeXT, -OneVision)."""
    import interp
    from analyses.kinds import lens
    from interp import tiny
    lvlm = interp.load(*tiny.BUILDERS[arch]())
    rows, d = lens.run(lvlm, condition("lens", caption33, 2), Context(batch_size=64))
    last = f"lm.blocks.{lvlm.adapter.layer_count(lvlm.model, 'lm') - 1}"
    np.testing.assert_allclose(d[d.site == last].sort_values("row").margin.to_numpy(),
                               _eval_margins(lvlm, caption33, d), atol=1e-4)
    assert {"lens_margin", "lens_spread", "lens_cell_margin"} <= {x["metric"] for x in rows}


def test_lens_is_exact_on_the_learned_absolute_organism(small_probe):
    """E1 on a GPT-2 LM (learned absolute positions, ``ln_f``)."""
    import interp
    from analyses.kinds import lens
    path = Path(__file__).resolve().parents[1] / "analyses/organisms/checkpoints/learned-absolute-seed0"
    lvlm = interp.load(str(path))
    _, d = lens.run(lvlm, condition("lens", small_probe, 2), Context(batch_size=64))
    last = f"lm.blocks.{lvlm.adapter.layer_count(lvlm.model, 'lm') - 1}"
    np.testing.assert_allclose(d[d.site == last].sort_values("row").margin.to_numpy(),
                               _eval_margins(lvlm, small_probe, d), atol=1e-4)


def test_lens_rows_are_chunk_invariant(organism, small_probe):
    """Rows per step change how the forwards are cut, never a number."""
    from analyses.kinds import lens
    a = lens.lens_items(organism, condition("lens", small_probe, 3), Context(batch_size=64))
    b = lens.lens_items(organism, condition("lens", small_probe, 3), Context(batch_size=4))
    cols = ["margin"] + [f"cell_{c}" for c in range(9)]
    a, b = (x.sort_values(["site", "row"]) for x in (a, b))
    np.testing.assert_allclose(a[cols].to_numpy(float), b[cols].to_numpy(float), atol=1e-5)
