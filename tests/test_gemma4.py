"""Gemma4's facts, checked through HF's own code path on the tiny model: which patch of which image
every token of every site is (pooling by construction, a painted cell, a marked patch), the
``mm_token_type_ids`` decision (bidirectional image attention in the sliding layers only, what HF
runs), per-layer head geometry, generation = a full forward per step, the final-logit softcapping
in resumed runs, AGCI by hand, the vision-side position patch reported n/a. The small checkpoints'
per-layer embeddings and KV-sharing layers: tests/test_per_layer.py."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import interp
from interp import tiny
from interp.dispatch import forward
from interp.resume import capture_lm, resume
from interp.tracing import trace
from spatialbias.errors import SpatialBiasError


@pytest.fixture(scope="module")
def m():
    return interp.load(*tiny.build_gemma4())


def _inputs(m, images):
    return m.inputs([[im] for im in images], [m.prompt("what is this ?")] * len(images))


def _quadrants(paint: int | None = None, side: int = 64) -> Image.Image:
    a = np.full((side, side, 3), 200, dtype=np.uint8)
    if paint is not None:
        r, c, h = paint // 2, paint % 2, side // 2
        a[r * h:(r + 1) * h, c * h:(c + 1) * h] = (250, 10, 10)
    return Image.fromarray(a)


def test_processor_is_hf_resize_rescale_patchify_without_torchvision(m):
    """The image-only processor's pixels are HF's PIL path: the 40×48 image resized (bicubic,
    aspect kept) to 56×72 px, /255, cut into 4 px patches in raster order, padded to 280 slots
    with position (−1, −1); positions (x, y) raster; 7×9 soft tokens in the prompt."""
    im = tiny.image(40, 48, seed=2)
    x = _inputs(m, [im])
    px, pos = x["pixel_values"][0], x["image_position_ids"][0]
    ref = np.asarray(im.resize((72, 56), Image.BICUBIC), dtype=np.float32) / 255  # (H, W, 3)
    patches = torch.from_numpy(ref).reshape(14, 4, 18, 4, 3).permute(0, 2, 1, 3, 4).reshape(14 * 18, 48)
    assert px.shape == (280, 48) and torch.allclose(px[:252], patches, atol=1.5 / 255)
    assert float(px[252:].abs().max()) == 0 and bool((pos[252:] == -1).all())
    assert pos[:252].tolist() == [[c, r] for r in range(14) for c in range(18)]
    assert int((x["input_ids"] == m.image_token_id).sum()) == 63
    assert torch.equal(x["mm_token_type_ids"] == 1, x["input_ids"] == m.image_token_id)


def test_pooling_puts_patch_xy_in_the_soft_token_the_maps_name(m):
    """Mark each patch slot with a one-hot feature and run HF's pooler with the processor's
    positions (a 40×48 image: 14×18 patches + padding, 7×9 soft tokens): soft token j averages
    exactly the patches whose ``vision.embed`` fields lie under ``vision.out`` token j's (row, col)
    (k = 2), scaled by √Dv; padding slots reach no token."""
    x = _inputs(m, [tiny.image(40, 48, seed=2)])
    pos = x["image_position_ids"]
    P = pos.shape[1]
    pooler = m.model.model.vision_tower.pooler
    out, mask = pooler(torch.eye(P)[None], pos, (pos == -1).all(-1), output_length=P // 4)
    out = out[mask] / pooler.root_hidden_size  # (63, P): which slots each soft token averages
    emb, vo = m.token_map(x, "vision.embed"), m.token_map(x, "vision.out")
    assert out.shape[0] == len(vo.row) == 63 and (vo.rows[0], vo.cols[0]) == (7, 9)
    for j in range(63):
        want = torch.zeros(P)
        under = (emb.row // 2 == vo.row[j]) & (emb.col // 2 == vo.col[j]) & emb.is_patch
        want[under] = 0.25
        assert int(under.sum()) == 4 and torch.allclose(out[j], want), j


def test_vision_out_projector_and_lm_input_line_up_token_for_token(m):
    """Through the real forward (two images of different grids): ``vision.out`` is the last block's
    patches averaged as the maps pair them (× √Dv), the projector's tokens are scattered over the
    image tokens in the LM map's order, and the two maps name the same (image, row, col)."""
    x = _inputs(m, [tiny.image(40, 48, seed=2), tiny.image(64, 64, seed=3)])
    t = trace(m, x, cache=["vision.blocks.1", "vision.out", "projector", "lm.input"])
    blk = t.cache["vision.blocks.1"].reshape(-1, 32)
    vo, proj, h = t.cache["vision.out"], t.cache["projector"], t.cache["lm.input"]
    fb, fo, fp = (m.token_map(x, s) for s in ("vision.blocks.1", "vision.out", "projector"))
    assert vo.shape == (63 + 64, 32) and proj.shape == (63 + 64, 64)
    scale = m.model.model.vision_tower.pooler.root_hidden_size
    for k in range(vo.shape[0]):
        under = (fb.image == fo.image[k]) & (fb.batch_row == fo.batch_row[k]) & fb.is_patch & \
            (fb.row // 2 == fo.row[k]) & (fb.col // 2 == fo.col[k])
        assert torch.allclose(vo[k], blk[under].mean(0) * scale, atol=1e-4), k
    imap = m.image_map(x)
    assert torch.equal(h[imap.is_image], proj)
    for a, b in ((imap.row, fp.row), (imap.col, fp.col), (imap.image, fp.image)):
        assert torch.equal(a[imap.is_image], b)


@pytest.mark.parametrize("cell", [0, 3])
def test_painted_quadrant_changes_exactly_its_patches_at_vision_embed(m, cell):
    """Paint one quadrant of a 64 px image (8×8 patches of 4 px each per quadrant): the
    ``vision.embed`` slots that change are exactly those the map puts in that cell of a 2×2 grid."""
    a = trace(m, _inputs(m, [_quadrants()]), cache=["vision.embed"]).cache["vision.embed"]
    b = trace(m, _inputs(m, [_quadrants(cell)]), cache=["vision.embed"]).cache["vision.embed"]
    emb = m.token_map(_inputs(m, [_quadrants()]), "vision.embed")
    changed = (a - b).abs().amax(-1).reshape(-1) > 1e-6
    assert torch.equal(changed, emb.is_patch & (emb.cells(2, 2) == cell))


def test_a_marked_patch_reaches_only_the_soft_token_the_maps_name(m):
    """Add a large vector to one patch of the last vision block's output: among the projector's
    tokens only the one the maps place over that patch changes."""
    x = _inputs(m, [tiny.image(40, 48, seed=2)])
    fb, fp = m.token_map(x, "vision.blocks.1"), m.token_map(x, "projector")
    slot = 5 * 18 + 7  # patch (y=5, x=7) → soft token (2, 3)

    def mark(v):
        v = v.clone()
        v.view(-1, v.shape[-1])[slot] += 10.0
        return v
    base = trace(m, x, cache=["projector"]).cache["projector"]
    hit = trace(m, x, cache=["projector"], edits={"vision.blocks.1": mark}).cache["projector"]
    changed = ((hit - base).abs().amax(-1) > 1e-5).nonzero().flatten().tolist()
    assert (int(fb.row[slot]), int(fb.col[slot])) == (5, 7)
    assert changed == [int(((fp.row == 2) & (fp.col == 3)).nonzero())]


def test_mm_token_type_ids_is_what_hf_runs_and_is_required(m):
    """The processor's ``mm_token_type_ids`` switch on the bidirectional image mask: a plain run
    equals HF's logits with them exactly and differs from HF's without them; inputs without them
    (or with stale ones) are refused in one line."""
    x = _inputs(m, [tiny.image(40, 48, seed=2), tiny.image(64, 64, seed=3)])
    with torch.no_grad():
        hf = m.model(**x.tensors()).logits
        causal = m.model(**{k: v for k, v in x.items() if k != "mm_token_type_ids"}).logits
    assert torch.equal(m.run(x), hf)
    assert float((hf - causal).abs().max()) > 1e-3
    with pytest.raises(SpatialBiasError, match="need 'mm_token_type_ids'"):
        m.run({k: v for k, v in x.items() if k != "mm_token_type_ids"})
    with pytest.raises(SpatialBiasError, match="does not mark exactly the image tokens"):
        m.run({**x.tensors(), "mm_token_type_ids": torch.zeros_like(x["input_ids"])})


@pytest.mark.parametrize("ivs", [[], [interp.BaPA()]], ids=["baseline", "bapa"])
def test_image_tokens_attend_forward_in_sliding_layers_only(m, ivs):
    """HF's Gemma4 mask: within one image, a query sees later image tokens in a *sliding* layer
    (inside the window) and none in a *full* layer (causal there, unlike Gemma3); BaPA's shared
    ids leave that mask as it is."""
    x = _inputs(m, [tiny.image(64, 64, seed=3)])
    t = trace(m, x, cache=["lm.blocks.0.attn.pattern", "lm.blocks.2.attn.pattern"], interventions=ivs)
    img = m.image_map(x).is_image[0].nonzero().flatten()
    q = int(img[0])
    later = img[1:20]
    assert float(t.cache["lm.blocks.0.attn.pattern"][0, :, q, later].min()) > 0
    assert float(t.cache["lm.blocks.2.attn.pattern"][0, :, q, later].abs().max()) == 0


def test_head_geometry_per_layer_type(m):
    """Sliding layers: 4 query heads of 16, 2 KV heads; the full layer: 4 heads of 32 and one
    KV head whose values are its keys' projection (``attention_k_eq_v``); rotary per layer type."""
    x = _inputs(m, [tiny.image(64, 64, seed=3)])
    L = x["input_ids"].shape[1]
    t = trace(m, x, cache=["lm.blocks.0.attn.heads", "lm.blocks.2.attn.heads", "lm.rotary@sliding_attention",
                           "lm.rotary@full_attention"])
    assert t.cache["lm.blocks.0.attn.heads"].shape == (1, L, 4, 16)
    assert t.cache["lm.blocks.2.attn.heads"].shape == (1, L, 4, 32)
    assert t.cache["lm.rotary@sliding_attention"][0].shape[-1] == 16
    assert t.cache["lm.rotary@full_attention"][0].shape[-1] == 32
    kv = forward(m, x, kv=True).kv
    assert [tuple(k.shape[1:]) for k, _ in kv] == [(2, L, 16), (2, L, 16), (1, L, 32)]
    assert m.model.model.language_model.layers[2].self_attn.v_proj is None


def test_generate_equals_hf_and_a_full_forward_at_every_step(m):
    """Greedy generation (prefill with the bidirectional image mask, decode steps causal, as HF's
    ``generate`` passes ``mm_token_type_ids`` on the prefill only) equals HF's ``generate`` and,
    step by step, the argmax of a no-cache forward of the whole sequence (new tokens typed 0)."""
    x = _inputs(m, [tiny.image(40, 48, seed=2), tiny.image(64, 64, seed=3)])
    n = 4
    ours = m.generate(x, max_new_tokens=n)
    with torch.no_grad():
        hf = m.model.generate(**x.tensors(), max_new_tokens=n, do_sample=False)[:, x["input_ids"].shape[1]:]
    assert torch.equal(ours, hf)
    ids, mask = x["input_ids"], x["attention_mask"]
    for k in range(n):
        full = {**x.tensors(), "input_ids": ids, "attention_mask": mask, **m.adapter.extend_inputs_for_decode(x, k)}
        with torch.no_grad():
            nxt = m.model(**full).logits[:, -1].argmax(-1)
        assert torch.equal(nxt, ours[:, k]), k
        ids, mask = torch.cat([ids, nxt[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)


def test_resumed_logits_are_softcapped_as_the_forward(m):
    """Resuming the LM from any block gives the run's last logits — HF's, after the final-logit
    softcapping (3 on the tiny model, where it bites: the uncapped head differs)."""
    x = _inputs(m, [tiny.image(64, 64, seed=3)])
    t, st = capture_lm(m, x)
    L = x["input_ids"].shape[1]
    for j in range(st.layers + 1):
        got = resume(m, st, torch.tensor([0]), torch.tensor([j]), st.residual[j][:, :], 0)
        assert torch.allclose(got, st.logits, atol=1e-5), j
    with torch.no_grad():
        head = m.model.lm_head(m.model.model.language_model.norm(st.residual[-1][:, -1]))
    assert float((head - st.logits).abs().max()) > 5e-4 and st.residual[0].shape[1] == L  # ≫ the 1e-5 above


def test_agci_is_the_published_formula_per_image(m):
    """AGCI by hand: per image, g = the mean of that image's soft tokens at the LM input, v' = v +
    λ(1 − cos(v, g)) g with the configured λ; ``<|image>``/``<image|>`` and text untouched; the
    logits are those of writing that ``lm.input``."""
    lam = 0.7
    x = _inputs(m, [tiny.image(40, 48, seed=2), tiny.image(64, 64, seed=3)])
    imap = m.image_map(x)
    h = trace(m, x, cache=["lm.input"]).cache["lm.input"]
    want, pooled = h.clone(), h.clone()
    allimg = h[imap.is_image]
    for b in range(2):
        sel = imap.image[b] == 0
        v = h[b, sel]
        for out, g in ((want, v.mean(0)), (pooled, allimg.mean(0))):
            out[b, sel] = v + lam * (1 - F.cosine_similarity(v, g.expand_as(v), dim=-1)).unsqueeze(-1) * g
    got = trace(m, x, cache=["lm.input"], interventions=[interp.AGCI(lam=lam)]).cache["lm.input"]
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.equal(got[~imap.is_image], h[~imap.is_image])
    assert float((got - pooled).abs().max()) > 1e-4  # per image, not one g over the batch
    edited = trace(m, x, edits={"lm.input": lambda _: want}).logits
    assert torch.allclose(m.run(x, [interp.AGCI(lam=lam)]), edited, atol=1e-5)


def test_vision_position_patch_is_reported_na(m):
    """The tower's position code is a learned 2-D table plus 2-D rotary in every block: no table
    swap can move it, so the patch refuses with the n/a line."""
    from interp.interventions.vision_positions import VisionPositionSwap
    assert m.adapter.vision_position_table(m.model) is None
    with pytest.raises(SpatialBiasError, match="n/a"):
        m.run(_inputs(m, [_quadrants()]), [VisionPositionSwap(a=0, b=3, grid=(2, 2))])


def test_probe_canvas_and_memory_facts_at_gemma4_shapes(m):
    """The canvas is the side HF's resize maps every square to (64 px on the tiny model: 8×8 soft
    tokens); at Gemma4's shapes (16 px patches, k = 3, 280 soft tokens) a 768 px image is 16×16 =
    256 soft tokens from 2520 patch slots."""
    assert m.adapter.probe_canvas(m.model.config, m.processor.image_processor) == 64
    x = _inputs(m, [_quadrants(side=64)])
    assert int((x["input_ids"] == m.image_token_id).sum()) == 64
    cfg = {"vision_config": {"patch_size": 16, "pooling_kernel_size": 3, "hidden_size": 1152},
           "text_config": {"hidden_size": 5376}}
    facts = m.adapter.memory_profile(cfg, (768, 768))
    assert facts.image_tokens == (256, 2520) and facts.projector_params == 1152 * 5376
    assert facts.pixel_bytes == 2520 * 3 * 16 * 16 * 4
