"""InternVL's token layout, checked through HF's own code path: the pixel shuffle's token order, the
tile arithmetic (tiles row-major, each in raster order, then the thumbnail), the LM map = the
projector's map token for token, a painted cell reaching exactly its own tile's tokens, the tile
grid recovered from image_sizes, the memory facts, and AGCI's published formula by hand."""
import pytest
import torch
import torch.nn.functional as F

import interp
from analyses import estimate
from interp import tiny
from interp.adapters.internvl import tile_grid
from interp.tracing import trace
from PIL import Image


@pytest.fixture(scope="module")
def m():
    return interp.load(*tiny.build_internvl())


def _inputs(m, images):
    return m.inputs([[im] for im in images], [m.prompt("what is this ?")] * len(images))


def test_pixel_shuffle_merges_2x2_patches_in_merged_raster_order(m):
    """Mark every patch of a p×p grid with its index, run HF's ``pixel_shuffle``: merged token
    i·s + j holds patches (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1) in its channel blocks
    [(r % 2)·2 + (c % 2)] — the adapter's vision.out fields say the same."""
    p = 6
    marks = torch.arange(p * p, dtype=torch.float32).view(1, p, p, 1)
    out = m.model.model.pixel_shuffle(marks, scale_factor=0.5).reshape(p * p // 4, 4)
    s = p // 2
    for i in range(s):
        for j in range(s):
            want = [(2 * i + dr) * p + 2 * j + dc for dr in (0, 1) for dc in (0, 1)]
            assert out[i * s + j].tolist() == want, (i, j)
    x = _inputs(m, [tiny.image(48, 48)])  # one crop: 6×6 patches → 3×3 merged
    vo, emb = m.token_map(x, "vision.out"), m.token_map(x, "vision.embed")
    assert vo.row.tolist() == [i for i in range(s) for _ in range(s)] and vo.col.tolist() == list(range(s)) * s
    assert emb.row[0] == -1 and emb.row[1:].tolist() == [r for r in range(p) for _ in range(p)]  # CLS first


def test_vision_out_is_the_last_block_pixel_shuffled_per_the_maps(m):
    """Through the real forward: each merged token of ``vision.out`` is the four patch features of
    the last vision block that the two token maps place under it (same crop, rows 2i..2i+1, cols
    2j..2j+1 of the same view), for tiles and thumbnail alike."""
    x = _inputs(m, [tiny.image(144, 144, seed=3), tiny.image(40, 100, seed=4)])
    t = trace(m, x, cache=["vision.blocks.1", "vision.out"])
    blk, vo = t.cache["vision.blocks.1"], t.cache["vision.out"]  # (C, 37, Dv), (C, 9, 4Dv)
    Dv = blk.shape[-1]
    fb, fo = m.token_map(x, "vision.blocks.1"), m.token_map(x, "vision.out")
    flat_b, flat_o = blk.reshape(-1, Dv), vo.reshape(-1, 4 * Dv)
    where = {(int(a), int(b), int(v), int(r), int(c)): k for k, (a, b, v, r, c) in
             enumerate(zip(fb.batch_row, fb.image, fb.view, fb.row, fb.col)) if r >= 0}
    for k in range(flat_o.shape[0]):
        key = (int(fo.batch_row[k]), int(fo.image[k]), int(fo.view[k]))
        r, c = int(fo.row[k]), int(fo.col[k])
        parts = [flat_b[where[(*key, 2 * r + dr, 2 * c + dc)]] for dr in (0, 1) for dc in (0, 1)]
        assert torch.equal(flat_o[k], torch.cat(parts)), k
    assert blk.shape[0] == 10 + 11  # 3×3 tiles + thumbnail, 2×5 tiles + thumbnail


def test_lm_map_is_the_projector_map_token_for_token(m):
    """HF scatters the projector output (crops in order, merged raster within each) over the
    ``<IMG_CONTEXT>`` run: the LM map's (image, view, row, col) of every image position equals the
    projector map's, in order, and ``lm.input`` there is the projector output."""
    x = _inputs(m, [tiny.image(144, 144, seed=1), tiny.image(40, 100, seed=2)])
    imap = m.image_map(x)
    pr = m.token_map(x, "projector")
    sel = imap.is_image
    for f in ("image", "view", "row", "col", "rows", "cols", "batch_row"):
        assert torch.equal(getattr(imap, f)[sel], getattr(pr, f)), f
    t = trace(m, x, cache=["projector", "lm.input"])
    assert torch.equal(t.cache["lm.input"][sel], t.cache["projector"].reshape(-1, t.cache["projector"].shape[-1]))
    # a 144 px square: 3×3 tiles (9 merged tokens each) then a 3×3 thumbnail; 40×100: 2×5 tiles + thumbnail
    v0 = imap.view[0][imap.is_image[0]]
    assert v0.tolist() == [0] * 81 + [1] * 9
    assert (imap.rows[1][imap.view[1] == 0].unique().tolist(), imap.cols[1][imap.view[1] == 0].unique().tolist()) \
        == ([6], [15])
    # tile by tile: the first 9 tokens are tile (0, 0) — rows 0..2, cols 0..2 — then tile (0, 1)
    r, c = imap.row[0][sel[0]], imap.col[0][sel[0]]
    assert r[:18].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] * 2
    assert c[:18].tolist() == [0, 1, 2] * 3 + [3, 4, 5] * 3
    cells = imap.cells(3, 3)[0][sel[0]]
    assert cells[:81].tolist() == [k for k in range(9) for _ in range(9)]  # one tile per cell
    assert cells[81:].tolist() == list(range(9))  # one thumbnail token per cell


def _probe(cell=None, side=144, seed=0):
    rng = torch.Generator().manual_seed(seed)
    a = (torch.rand(side, side, 3, generator=rng) * 60 + 90).to(torch.uint8)
    if cell is not None:
        r, c = divmod(cell, 3)
        k = side // 3
        a[r * k:(r + 1) * k, c * k:(c + 1) * k] = torch.tensor([250, 10, 10], dtype=torch.uint8)
    return Image.fromarray(a.numpy())


@pytest.mark.parametrize("cell", [0, 5, 7])
def test_painted_cell_changes_exactly_its_own_tile_tokens(m, cell):
    """Paint one cell of a 144 px probe (3×3 tiles, one per cell): through the processor, the
    vision tower, the pixel shuffle, the projector and the scatter, the tile-view LM tokens that
    change are exactly those the adapter maps to that cell (the tower runs each crop alone); on
    the thumbnail, whose crop mixes every cell, the patch embeddings that change most are the ones
    mapped to the cell (bicubic resizing bleeds a little across the cell's border)."""
    base, painted = _inputs(m, [_probe()]), _inputs(m, [_probe(cell)])
    a = trace(m, base, cache=["lm.input", "vision.embed"]).cache
    b = trace(m, painted, cache=["lm.input", "vision.embed"]).cache
    imap = m.image_map(base)
    changed = (a["lm.input"] - b["lm.input"]).abs().amax(-1) > 1e-6
    tiles = imap.is_image & (imap.view == 0)
    assert torch.equal(changed & tiles, tiles & (imap.cells(3, 3) == cell))
    assert bool((changed & (imap.view == 1)).any())  # the thumbnail sees the paint too
    emb = m.token_map(base, "vision.embed")
    d = (a["vision.embed"] - b["vision.embed"]).abs().amax(-1).reshape(-1)
    thumb = (emb.view == 1) & emb.is_patch
    mine = thumb & (emb.cells(3, 3) == cell)
    assert int(mine.sum()) == 4  # 6×6 thumbnail patches: 2×2 per cell
    assert float(d[mine].min()) > float(d[thumb & ~mine].max())


@pytest.mark.parametrize("h,w", [(144, 144), (40, 100), (100, 40), (48, 200), (96, 96), (40, 48), (150, 90), (48, 48)])
def test_tile_grid_from_size_and_crop_count_is_the_processors(m, h, w):
    """The grid the adapter recovers (HF's tiling restricted to the crop count) is the one the
    processor picked among every allowed count, and the crops come in that number."""
    x = _inputs(m, [tiny.image(h, w)])
    gh, gw = m.adapter.tile_grids(m.model, x)[0]
    ip = m.processor.image_processor
    assert (gh, gw) == tile_grid(h, w, 48, ip.min_patches, ip.max_patches)
    assert x["pixel_values"].shape[0] == gh * gw + (gh * gw > 1)
    assert m.adapter.vision_tokens(m.model, x) == x["pixel_values"].shape[0] * 37


def test_inputs_without_image_sizes_are_refused_in_one_line(m):
    x = dict(_inputs(m, [tiny.image(144, 144)]))
    x.pop("image_sizes")
    from spatialbias.errors import SpatialBiasError
    with pytest.raises(SpatialBiasError, match="image_sizes") as e:
        m.batch(x)
    assert "\n" not in str(e.value)


def test_rows_select_their_own_crops(m):
    """Row selection splits the flattened crops by each image's crop count."""
    x = _inputs(m, [tiny.image(144, 144, seed=1), tiny.image(40, 100, seed=2), tiny.image(48, 48, seed=3)])
    assert [g for g in m.adapter.tile_grids(m.model, x)] == [(3, 3), (2, 5), (1, 1)]  # 10, 11 and 1 crops
    sub = m.rows(x, [2, 0])
    assert torch.equal(sub["pixel_values"], torch.cat([x["pixel_values"][21:22], x["pixel_values"][:10]]))
    assert torch.allclose(m.run(sub)[:, -1], m.run(x)[[2, 0], -1], atol=1e-5)


def test_memory_facts_count_the_processors_tokens(m):
    for h, w in ((144, 144), (40, 100), (40, 48), (96, 200)):
        x = _inputs(m, [tiny.image(h, w)])
        s = estimate.Shapes.from_config(m.model.config.to_dict(), image_px=(h, w))
        assert s.image_tokens == int(m.image_mask(x["input_ids"]).sum()), (h, w)
        assert s.vision_tokens == m.adapter.vision_tokens(m.model, x), (h, w)
    proj = sum(p.numel() for p in m.model.model.multi_modal_projector.parameters())
    assert m.adapter.memory_profile(m.model.config.to_dict()).projector_params == proj


def test_agci_is_the_published_formula_per_image_with_the_thumbnail(m):
    """AGCI on InternVL, by hand: per image, g = the mean of *that image's* LM image tokens (every
    tile and the thumbnail: the image's <IMG_CONTEXT> tokens), v' = v + λ(1 − cos(v, g)) g with
    the configured λ; text (<img>, </img> included) untouched. It differs from the authors'
    InternVL code (one g over the flattened crops of the whole batch, λ fixed at 0.5) and from g
    over the tiles alone."""
    lam = 0.7
    x = _inputs(m, [tiny.image(144, 144, seed=5), tiny.image(40, 100, seed=6)])
    imap = m.image_map(x)
    h = trace(m, x, cache=["lm.input"]).cache["lm.input"]

    def inject(v, g, lam):
        return v + lam * (1 - F.cosine_similarity(v, g.expand_as(v), dim=-1)).unsqueeze(-1) * g

    want = h.clone()
    tiles_only = h.clone()
    for b in range(2):
        sel = imap.image[b] == 0
        v = h[b, sel]
        want[b, sel] = inject(v, v.mean(0), lam)
        t = imap.view[b, sel] == 0
        tiles_only[b, sel] = inject(v, v[t].mean(0), lam)
    allimg = h[imap.is_image]
    authors = h.clone()
    authors[imap.is_image] = inject(allimg, allimg.mean(0), 0.5)
    got = trace(m, x, cache=["lm.input"], interventions=[interp.AGCI(lam=lam)]).cache["lm.input"]
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.equal(got[~imap.is_image], h[~imap.is_image])
    for other in (tiles_only, authors):
        assert (got - other).abs().max() > 1e-4
    logits = m.run(x, [interp.AGCI(lam=lam)])
    edited = trace(m, x, edits={"lm.input": lambda t: want}).logits
    assert torch.allclose(logits, edited, atol=1e-5)


def test_memory_facts_at_internvl3_8b_shapes():
    """InternVL3-8B's shapes (InternViT-300M at 448 px / 14, Qwen2 3584 × 28): a 1344 px probe is
    3×3 tiles + a thumbnail — 10 crops of 256 LM tokens and 1025 vision tokens; a 448 px image one crop."""
    from transformers import InternVLConfig, InternVLVisionConfig, Qwen2Config
    vc = InternVLVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=448, patch_size=14)
    tc = Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=151674)
    cfg = InternVLConfig(vision_config=vc, text_config=tc)
    cfg.architectures = ["InternVLForConditionalGeneration"]
    big = estimate.Shapes.from_config(cfg.to_dict(), "bfloat16", image_px=(1344, 1344))
    assert (big.image_tokens, big.vision_tokens) == (2560, 10250)
    one = estimate.Shapes.from_config(cfg.to_dict(), "bfloat16", image_px=(448, 448))
    assert (one.image_tokens, one.vision_tokens) == (256, 1025)
    assert 13 * 2 ** 30 < big.weights < 16 * 2 ** 30  # ~7.5B parameters (tied embeddings) in bf16
    from types import SimpleNamespace
    ip = SimpleNamespace(size={"height": 448, "width": 448}, min_patches=1, max_patches=12)
    assert interp.adapters.for_config(cfg.to_dict()).probe_canvas(cfg, ip) == 1344
