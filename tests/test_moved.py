"""The vision-side "moved" patch: the target's clean image tokens at lm.input, transplanted into
the corrupt cell's slots of the corrupt run (position ids kept), checked against a hand-built
edit of lm.input on the shipped organism, and its place in the patching analysis' rows."""
import numpy as np
import torch

from analyses import causal
from interp import patching
from interp.batch import concat
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


# ------------------------------------------------------------------------------------------------
# several image tokens per cell, several views (LLaVA-NeXT), M-RoPE (Qwen2-VL), under BaPA

import pytest  # noqa: E402

import interp  # noqa: E402
from helpers import mirrored_pair  # noqa: E402
from interp import tiny  # noqa: E402
from spatialbias.errors import SpatialBiasError  # noqa: E402

MULTI = [  # (architecture, image size, grid, clean cell, corrupt cell): several tokens per cell each
    ("llava", 48, (2, 2), 3, 0),        # 2×2 tokens per cell, one view
    ("llava_next", 48, (3, 3), 8, 0),   # base view 1 token + tiles view 3×3 per cell
    ("llava_next", 48, (2, 2), 3, 0),   # base 2×2 + tiles 4×4 per cell
    ("llava_onevision", 48, (3, 3), 8, 0),  # as LLaVA-NeXT: base view + unpadded tiles, newline slots in no cell
    ("llava_onevision", 48, (2, 2), 3, 0),
    ("qwen2vl", 64, (2, 2), 3, 0),      # merged 2×2 per cell
    ("qwen2vl", 64, (3, 3), 7, 1),      # merged 1×2 per cell
    ("qwen3vl", 64, (2, 2), 3, 0),      # as Qwen2-VL, with DeepStack added after the first LM blocks
    ("qwen35", 64, (2, 2), 3, 0),       # as Qwen2-VL; hybrid LM (Gated DeltaNet + full attention)
    ("internvl", 144, (3, 3), 8, 0),    # 3×3 tiles (one per cell, 3×3 tokens each, held tile by tile) + thumbnail 1 per cell
    ("internvl", 144, (3, 3), 7, 1),
    ("qwen3vl_moe", 64, (2, 2), 3, 0),  # as Qwen3-VL, with MoE MLPs
    ("gemma4", 64, (2, 2), 3, 0),       # 8×8 soft tokens (2×2 pooled patches each): 4×4 per cell
    ("gemma4", 64, (2, 2), 2, 1),
    ("gemma3n", 48, (2, 2), 3, 0),      # 6×6 soft tokens: 3×3 per cell; 4 AltUp streams, per-layer inputs
    ("gemma3n", 48, (3, 3), 8, 0),      # 2×2 per cell
    ("gemma4_small", 64, (2, 2), 3, 0),  # as Gemma4, with per-layer embeddings and KV-sharing layers
]


@pytest.fixture(scope="module")
def tinies():
    return {name: interp.load(*tiny.BUILDERS[name]()) for name in ("llava", "llava_next", "qwen2vl", "llava_onevision", "qwen3vl",
                                                                 "internvl", "qwen3vl_moe", "gemma4", "qwen35",
                                                                 "gemma3n", "gemma4_small")}


def _translation_partner(imap, src_row: int, dst_row: int, src_cell: int, dst_cell: int, grid) -> dict:
    """Hand-built pairing, by lookup: destination slot → the source slot of the same view whose
    (row, col) is the destination's translated by the offset between the two cells' top-left
    corners in that view."""
    cells = imap.cells(*grid)

    def corner(b, cell, v):
        sel = (cells[b] == cell) & (imap.view[b] == v)
        return int(imap.row[b][sel].min()), int(imap.col[b][sel].min())
    at = {(int(imap.view[src_row, p]), int(imap.row[src_row, p]), int(imap.col[src_row, p])): int(p)
          for p in (cells[src_row] == src_cell).nonzero().flatten()}
    out = {}
    for p in (cells[dst_row] == dst_cell).nonzero().flatten():
        v, r, c = (int(t[dst_row, p]) for t in (imap.view, imap.row, imap.col))
        (sr, sc), (dr, dc) = corner(src_row, src_cell, v), corner(dst_row, dst_cell, v)
        out[int(p)] = at[(v, r - dr + sr, c - dc + sc)]
    return out


@pytest.mark.parametrize("name,size,grid,clean_cell,corrupt_cell", MULTI)
def test_moved_pairs_same_view_and_place_in_cell(tinies, name, size, grid, clean_cell, corrupt_cell):
    m = tinies[name]
    clean, corrupt, _, _ = mirrored_pair(m, 2, size=size)
    imap = m.batch(concat(m, m.batch(clean), m.batch(corrupt))).imap  # rows 0, 1 clean; 2, 3 corrupt
    src, dst = patching.moved_slots(imap, 0, 2, clean_cell, corrupt_cell, grid)
    cells = imap.cells(*grid)
    assert set(src.tolist()) == set((cells[0] == clean_cell).nonzero().flatten().tolist())
    assert set(dst.tolist()) == set((cells[2] == corrupt_cell).nonzero().flatten().tolist())
    assert len(src) > 1 and len(set(imap.view[0][src].tolist())) == len(set(imap.view[0][imap.is_patch[0]].tolist()))
    assert dict(zip(dst.tolist(), src.tolist())) == _translation_partner(imap, 0, 2, clean_cell, corrupt_cell, grid)


@pytest.mark.parametrize("bapa", [False, True], ids=["baseline", "bapa"])
@pytest.mark.parametrize("name,size,grid,clean_cell,corrupt_cell", MULTI)
def test_moved_equals_hand_built_edit_multi_token(tinies, name, size, grid, clean_cell, corrupt_cell, bapa):
    """run_moved against lm.input edited by hand (pairing by lookup), and a cell moved onto itself
    with base = source reproduces the unpatched metric (to 1e-6)."""
    m = tinies[name]
    ivs = [interp.BaPA()] if bapa else []
    clean, corrupt, correct, cands = mirrored_pair(m, 2, size=size)
    got = patching.run_moved(m, corrupt, clean, corrupt_cell, clean_cell, correct, cands, interventions=ivs, grid=grid)
    imap = m.batch(concat(m, m.batch(clean), m.batch(corrupt))).imap
    clean_in = trace(m, clean, cache=["lm.input"], interventions=ivs).cache["lm.input"]
    h = trace(m, corrupt, cache=["lm.input"], interventions=ivs).cache["lm.input"].clone()
    for b in range(2):
        for d, s in _translation_partner(imap, b, 2 + b, clean_cell, corrupt_cell, grid).items():
            h[b, d] = clean_in[b, s]
    edits = {"lm.input": lambda x: h}
    for site in m.adapter.injections(m.model).values():  # DeepStack: the same tokens' features, by ordinal
        src_f = trace(m, clean, cache=[site], interventions=ivs).cache[site]
        f = trace(m, corrupt, cache=[site], interventions=ivs).cache[site].clone()
        for b in range(2):
            for d, s in _translation_partner(imap, b, 2 + b, clean_cell, corrupt_cell, grid).items():
                f[_ordinal(m, corrupt, b, d)] = src_f[_ordinal(m, clean, b, s)]
        assert not torch.equal(f, src_f)  # the placements' features differ: the edit is informative
        edits[site] = lambda x, f=f: f
    lg = trace(m, corrupt, edits=edits, interventions=ivs).logits[:, -1]
    want = patching.logit_diff(lg, correct, cands).numpy()
    np.testing.assert_allclose(got.sort_values("item").metric.to_numpy(), want, atol=1e-5)
    same = patching.run_moved(m, corrupt, corrupt, corrupt_cell, corrupt_cell, correct, cands, interventions=ivs,
                              grid=grid)
    # equal as numbers: where a resumed row re-derives per-layer inputs over a shorter span (Gemma4's small
    # checkpoints) the matmul's rounding may differ in the last bit (seen: 9e-8 under BaPA)
    np.testing.assert_allclose(same.metric, same.base_metric, rtol=0, atol=1e-6)


def _ordinal(m, inputs, row: int, pos: int) -> int:
    """Index of image token (row, pos) among the batch's image tokens in sequence order: its place
    in an injection site's (T, D) features (the order HF's DeepStack addition scatters them in)."""
    mask = m.image_mask(m.batch(inputs)["input_ids"])
    assert mask[row, pos]
    return int(mask[:row].sum() + mask[row, :pos].sum())


def test_moved_refuses_cells_of_different_shapes(tinies):
    """LLaVA 3×3 on a 4×4 patch grid: cell 1 is 1×2 patches, cell 3 is 2×1 (two tokens each)."""
    m = tinies["llava"]
    clean, corrupt, correct, cands = mirrored_pair(m, 2)
    with pytest.raises(SpatialBiasError, match="cells 3 and 1"):
        patching.run_moved(m, corrupt, clean, 1, 3, correct, cands)
