"""The vision-side "moved" patch: the target's clean image tokens at lm.input, transplanted into
the corrupt cell's slots of the corrupt run (position ids kept), checked against a hand-built
edit of lm.input on the shipped organism, and its place in the patching analysis' rows."""
import numpy as np
import torch

from analyses import causal
from interp import patching
from interp.tracing import trace


def test_moved_equals_hand_built_lm_input_edit(organism, small_probe):
    m = organism
    pairs = causal.placement_pairs(m, small_probe, clean_cell=8, corrupt_cell=0, n_items=4)
    got = patching.run_moved(m, pairs.corrupt, pairs.clean, 0, 8, pairs.correct, pairs.candidates, batch_size=5)
    # by hand: the organism has 9 image tokens per image, one per cell, in raster order
    img_id = m.model.config.image_token_id
    clean_in = trace(m, pairs.clean, cache=["lm.input"]).cache["lm.input"]
    corrupt_in = trace(m, pairs.corrupt, cache=["lm.input"]).cache["lm.input"]
    h = corrupt_in.clone()
    for b in range(h.shape[0]):
        slots_clean = (pairs.clean["input_ids"][b] == img_id).nonzero().flatten()
        slots_corrupt = (pairs.corrupt["input_ids"][b] == img_id).nonzero().flatten()
        assert len(slots_clean) == 9
        h[b, slots_corrupt[0]] = clean_in[b, slots_clean[8]]
    lg = trace(m, pairs.corrupt, edits={"lm.input": lambda x: h}).logits[:, -1]
    want = patching.logit_diff(lg, pairs.correct, pairs.candidates).numpy()
    np.testing.assert_allclose(got.sort_values("item").metric.to_numpy(), want, atol=1e-4)
    base = patching.logit_diff(trace(m, pairs.corrupt).logits[:, -1], pairs.correct, pairs.candidates).numpy()
    np.testing.assert_allclose(got.sort_values("item").base_metric.to_numpy(), base, atol=1e-4)
    assert not np.allclose(want, base)  # the edit changed something


def test_moved_restoration_row_in_patching_rows(organism, small_probe):
    m = organism
    pairs = causal.placement_pairs(m, small_probe, clean_cell=8, corrupt_cell=0, n_items=4)
    items = causal.moved_items(m, pairs, [])
    rows = causal.restoration_rows(items, np.random.default_rng(0))
    r = next(r for r in rows if r["metric"] == "restoration_denoise" and r["group"] == "moved")
    g = items.sort_values("item")
    want = (g.metric.mean() - g.base_metric.mean()) / (g.source_metric.mean() - g.base_metric.mean())
    assert r["site"] == "lm.input" and abs(r["value"] - want) < 1e-9 and r["ci_low"] <= r["value"] <= r["ci_high"]


def test_learned_absolute_lm_position_patching(small_probe):
    """GPT-2 LM (learned absolute positions, shipped zoo organism): per-layer position swaps are
    refused with one line (positions enter once, at the embedding); the patching analysis runs
    the all-layers swap only, and the moved patch runs."""
    import pytest

    import interp
    from analyses.organisms.zoo import shipped
    from interp.interventions import PositionSwap
    from spatialbias.errors import SpatialBiasError
    m = interp.load(str(shipped("learned-absolute", 0)))
    pairs = causal.placement_pairs(m, small_probe, clean_cell=8, corrupt_cell=0, n_items=3)
    with pytest.raises(SpatialBiasError, match="learned absolute positions"):
        m.run(pairs.clean, [PositionSwap(a=0, b=8, layers=(0, 1))])
    pos = causal.position_items(m, pairs, [])
    assert list(pos.layers.unique()) == ["all"] and not (pos.fixed == pos.corrupt).all()
    assert len(causal.moved_items(m, pairs, [])) == 3


def test_moved_keeps_absolute_positions_on_gpt2(small_probe):
    """On the learned-absolute organism lm.input already holds wpe(position ids): the moved token
    must be clean lm.input − wpe(clean slot) + wpe(corrupt slot), built here by hand."""
    import interp
    from analyses.organisms.zoo import shipped
    m = interp.load(str(shipped("learned-absolute", 0)))
    pairs = causal.placement_pairs(m, small_probe, clean_cell=8, corrupt_cell=0, n_items=3)
    got = patching.run_moved(m, pairs.corrupt, pairs.clean, 0, 8, pairs.correct, pairs.candidates)
    wpe = m.model.model.language_model.wpe.weight.detach()
    img_id = m.model.config.image_token_id
    clean_in = trace(m, pairs.clean, cache=["lm.input"]).cache["lm.input"]
    h = trace(m, pairs.corrupt, cache=["lm.input"]).cache["lm.input"].clone()
    for b in range(h.shape[0]):
        sc = (pairs.clean["input_ids"][b] == img_id).nonzero().flatten()[8]
        sb = (pairs.corrupt["input_ids"][b] == img_id).nonzero().flatten()[0]
        h[b, sb] = clean_in[b, sc] - wpe[sc] + wpe[sb]
    lg = trace(m, pairs.corrupt, edits={"lm.input": lambda x: h}).logits[:, -1]
    want = patching.logit_diff(lg, pairs.correct, pairs.candidates).numpy()
    np.testing.assert_allclose(got.sort_values("item").metric.to_numpy(), want, atol=1e-4)
