"""All five architectures behind one adapter layer: sites, image-token maps, BaPA, AGCI, generate.

References: HF's own forward (exact), HF's ``get_rope_index`` (Qwen's patch rows/cols), HF's
``generate`` (greedy tokens), and a step-by-step loop without cache.
"""
import re

import pytest
import torch

import interp
from interp import tiny
from spatialbias.errors import SpatialBiasError
from helpers import stand_in_timm
from interp.interventions import adaptive_lambda, agci_inject
from interp.tracing import trace

ARCHS = list(tiny.BUILDERS)


@pytest.fixture(scope="module", params=ARCHS)
def arch(request):
    model, proc = tiny.BUILDERS[request.param]()
    m = interp.load(model, proc)
    inputs = m.inputs([tiny.image(seed=0), tiny.image(40, 60, seed=1)],
                      [m.prompt("describe the image ?"), m.prompt("what is this a picture of ?")])
    return request.param, m, inputs


def logits(m, inputs, ivs=()):
    with torch.no_grad():
        return m.run(inputs, ivs)


def test_save_load_round_trip(arch, tmp_path):
    name, m, inputs = arch
    folder = str(tiny.save(m.model, m.processor, tmp_path / name))
    why = m.adapter.load_requirements()
    if why:  # Gemma3n without timm: one line naming the fix (then the rest of the path, with the stand-in tower)
        with pytest.raises(SpatialBiasError) as e:
            interp.load(folder)
        assert str(e.value) == f"cannot load {folder!r} ({type(m.model).__name__}): {why}" and "\n" not in why
    with stand_in_timm():
        back = interp.load(folder)
    assert back.adapter is m.adapter
    again = back.inputs([tiny.image(seed=0), tiny.image(40, 60, seed=1)],
                        [back.prompt("describe the image ?"), back.prompt("what is this a picture of ?")])
    assert torch.equal(again["input_ids"], inputs["input_ids"])
    assert torch.equal(logits(back, again), logits(m, inputs))


def test_no_intervention_and_default_ids_are_hf_exactly(arch):
    _, m, inputs = arch
    with torch.no_grad():
        ref = m.model(**inputs).logits
        assert torch.equal(m.run(inputs), ref)
        assert torch.equal(m.model(**inputs, position_ids=m.default_position_ids(inputs)).logits, ref)


def test_every_site_fires_has_its_shape_and_writing_changes_logits(arch):
    name, m, inputs = arch
    cfg = m.model.config
    B, L = inputs["input_ids"].shape
    D = cfg.text_config.hidden_size
    base = logits(m, inputs)
    feature_layer = getattr(cfg, "vision_feature_layer", -1)
    n_vis = m.adapter.layer_count(m.model, "vision")
    dead = {f"vision.blocks.{i}" for i in range(n_vis) if isinstance(feature_layer, int) and i > n_vis + feature_layer}
    for site in m.adapter.concrete_sites(m.model):
        seen = []

        class Probe(interp.Intervention):
            kind = "probe"

            def edits(self, lvlm, inputs):
                def bump(x):  # not undone by a norm; lm.rotary's (cos, sin) is edited whole
                    seen.append(x)
                    if isinstance(x, tuple):
                        return tuple(t + torch.linspace(0, 1, t.shape[-1]) for t in x)
                    return x + torch.linspace(0, 1, x.shape[-1])
                return {site: bump}

        got = logits(m, inputs, [Probe()])
        assert seen, f"{name}: {site} never fired"
        x = seen[0]
        if site == "lm.rotary":
            assert isinstance(x, tuple) and len(x) == 2 and x[0].shape == x[1].shape, site  # (cos, sin)
            x = x[0]
        routing = m.adapter.routing(m.model)
        if site.endswith(".router"):  # a MoE router: logits of every token, flattened
            assert tuple(x.shape) == (B * L, routing.experts), (site, x.shape)
        elif site.endswith(".experts"):  # a MoE block's experts: their weighted sum per token, flattened
            assert tuple(x.shape) == (B * L, D), (site, x.shape)
        elif site.startswith("lm.") and site != "lm.rotary":  # a block state of S streams: (B, L, S·D)
            S = m.adapter.streams(m.model) if re.fullmatch(r"lm\.blocks\.\d+", site) else 1
            assert tuple(x.shape) == (B, L, S * D), (site, x.shape)
        if site == "unembed":
            assert tuple(x.shape) == (B, L, cfg.text_config.vocab_size)
        if site == "projector":
            assert x.shape[-1] == D
        if site in dead:
            assert torch.equal(got, base), f"{name}: {site} comes after vision_feature_layer and should be dead"
        else:
            assert (got - base).abs().max() > 1e-6, f"{name}: writing to {site} did not change the logits"


def test_image_map_counts_and_cells(arch):
    name, m, inputs = arch
    imap = m.image_map(inputs)
    assert torch.equal(imap.is_image, m.image_mask(inputs["input_ids"]))
    cells = imap.cells(3, 3)
    assert ((cells >= 0) == imap.is_patch).all()
    for b in range(2):
        assert int(imap.image[b].max()) == 0  # one image per row
        big = imap.is_patch[b] & (imap.rows[b] >= 3) & (imap.cols[b] >= 3)
        if big.any():  # a view of at least 3×3 patches covers every cell
            assert set(cells[b][big].tolist()) == set(range(9))
        small = imap.is_patch[b] & (imap.rows[b] == 2) & (imap.cols[b] == 2)
        if small.any():  # a 2×2 view (gemma3's tiny pooled tokens) lands in the 4 corner cells
            assert set(cells[b][small].tolist()) == {0, 2, 6, 8}
    if name == "llava":
        assert int(imap.is_image[0].sum()) == 16 and int(imap.rows[imap.is_image].max()) == 4
        # 4×4 patches on a 3×3 grid: rows 0 | 1,2 | 3 (by patch centre)
        r = imap.row[0][imap.is_patch[0]]
        c = cells[0][imap.is_patch[0]]
        assert (c[r == 0] < 3).all() and (c[r == 3] >= 6).all()
    if name in ("llava_next", "llava_onevision"):
        # HF's own packing: number of tokens per image, newlines excluded from patches
        extra = {"batch_num_images": inputs["batch_num_images"]} if "batch_num_images" in inputs else {}
        with torch.no_grad():
            feats = m.model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                     image_sizes=inputs["image_sizes"], **extra)
        lens = [f.shape[0] for f in (feats.pooler_output if hasattr(feats, "pooler_output") else feats)]
        assert [int(imap.is_image[b].sum()) for b in range(2)] == lens
        assert int((imap.is_image & ~imap.is_patch).sum()) > 0
    if name.startswith("qwen"):
        # HF's M-RoPE ids: h − start and w − start are the merged patch row and col
        pos = m.default_position_ids(inputs)
        for b in range(2):
            sel = imap.is_image[b]
            start = pos[0, b][sel][0]
            assert torch.equal(pos[1, b][sel] - start, imap.row[b][sel])
            assert torch.equal(pos[2, b][sel] - start, imap.col[b][sel])


def test_bapa_ids_logits_and_variants(arch):
    name, m, inputs = arch
    iv = interp.BaPA()
    prepared = iv.prepare(m, inputs)
    pos = prepared["position_ids"]
    imap = m.image_map(inputs)
    flat = pos if pos.dim() == 2 else pos[0]
    for b in range(2):
        img = imap.is_image[b]
        first = int(img.nonzero()[0])
        s = int(flat[b, first])
        assert (flat[b][img] == s).all()
        after = int(img.nonzero()[-1]) + 1
        assert int(flat[b, after]) == s + 1
        if pos.dim() == 3:
            assert (pos[:, b] == flat[b]).all()  # reference variant: one 1-D scheme on all rows
    with torch.no_grad():
        want = m.model(**{**inputs, "position_ids": pos}).logits
    assert torch.equal(logits(m, inputs, [iv]), want)
    assert (want - logits(m, inputs)).abs().max() > 1e-5
    if m.adapter.rope == "mrope":
        kept = interp.BaPA(variant="keep_hw").prepare(m, inputs)["position_ids"]
        sel = imap.is_image
        assert torch.equal(kept[0], pos[0])
        assert torch.equal(kept[1][sel] - pos[1][sel], imap.row[sel])
        assert torch.equal(kept[2][sel] - pos[2][sel], imap.col[sel])
        assert (logits(m, inputs, [interp.BaPA(variant="keep_hw")]) - want).abs().max() > 1e-6
    else:
        with pytest.raises(SpatialBiasError, match="M-RoPE"):
            logits(m, inputs, [interp.BaPA(variant="keep_hw")])


def test_bapa_left_padding_matches_unpadded_row(arch):
    _, m, _ = arch
    img = tiny.image(seed=5)
    padded = m.inputs([img, tiny.image(seed=6)], [m.prompt("what is this ?"),
                                                   m.prompt("what is this a picture of the dog ?")])
    alone = m.inputs([img], [m.prompt("what is this ?")])
    assert padded["attention_mask"][0, 0] == 0
    with torch.no_grad():
        a = m.run(padded, [interp.BaPA()], last_only=True)[0, -1]
        b = m.run(alone, [interp.BaPA()], last_only=True)[0, -1]
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


def test_bapa_two_images_collapse_separately_and_text_only_is_untouched(arch):
    name, m, _ = arch
    two = m.inputs([[tiny.image(seed=1), tiny.image(seed=2)]], [m.prompt("what is this ?", n_images=2)])
    imap = m.image_map(two)
    assert int(imap.image.max()) == 1
    pos = interp.BaPA().prepare(m, two)["position_ids"]
    flat = pos if pos.dim() == 2 else pos[0]
    s0 = flat[0][imap.image[0] == 0].unique()
    s1 = flat[0][imap.image[0] == 1].unique()
    assert len(s0) == len(s1) == 1 and int(s1) >= int(s0) + 1  # separate slots, even when adjacent
    text = {k: v for k, v in m.processor.tokenizer(["what is this ?"], return_tensors="pt").items()}
    p = interp.BaPA().prepare(m, text)["position_ids"]
    flat = p if p.dim() == 2 else p[0]
    assert torch.equal(flat[0], torch.arange(text["input_ids"].shape[1]))


def test_gemma3_both_rotary_embeddings_see_bapa_ids():
    model, proc = tiny.build_gemma3()
    m = interp.load(model, proc)
    inputs = m.inputs([tiny.image()], [m.prompt("describe the image ?")])
    seen = []
    rot = m.adapter.module(model, "lm.rotary")
    h = rot.register_forward_hook(lambda mod, args, out: seen.append((args[1].clone(), args[2])))
    try:
        logits(m, inputs, [interp.BaPA()])
    finally:
        h.remove()
    want = interp.BaPA().prepare(m, inputs)["position_ids"]
    assert {t for _, t in seen} == {"sliding_attention", "full_attention"}
    assert all(torch.equal(p, want) for p, _ in seen)


def test_agci_on_every_architecture(arch):
    name, m, inputs = arch
    base = logits(m, inputs)
    assert torch.equal(logits(m, inputs, [interp.AGCI(lam=0.0)]), base)
    got = logits(m, inputs, [interp.AGCI(lam=0.8)])
    assert_agci_formula(m, inputs, 0.8)
    pooled = logits(m, inputs, [interp.AGCI(lam=0.8, pooled=True)])
    if name in ("llava_next", "llava_onevision"):
        assert (pooled - got).abs().max() > 1e-6  # newline tokens join the pooled mean
    if name.startswith("qwen"):
        # equals AGCI applied to the merger output, split by image_grid_thw
        merge = m.model.config.vision_config.spatial_merge_size ** 2
        tpi = [int(t * h * w) // merge for t, h, w in inputs["image_grid_thw"]]
        hk = m.adapter.module(m.model, "projector").register_forward_hook(
            lambda mod, a, out: agci_inject(out, 0.8, tokens_per_image=tpi))
        try:
            with torch.no_grad():
                ref = m.model(**inputs).logits
        finally:
            hk.remove()
        assert torch.allclose(got, ref, atol=1e-5)


def assert_agci_formula(m, inputs, lam: float):
    """The LM input under AGCI is the LM input without it plus λ (1 − cos(v, g)) g, with v each
    image's patch tokens as the projector produced them and g their mean (the published formula;
    position embeddings of a learned-absolute LM are no part of v)."""
    imap = m.image_map(inputs)
    per_image = [int(((imap.image[b] == i) & imap.is_patch[b]).sum()) for b in range(imap.image.shape[0])
                 for i in range(int(imap.image[b].max()) + 1)]
    plain = trace(m, inputs, cache=["projector", "lm.input"], positions="image").cache
    under = trace(m, inputs, cache=["lm.input"], positions="image", interventions=[interp.AGCI(lam=lam)]).cache
    want = []
    for v, x in zip(plain["projector"].split(per_image), plain["lm.input"].split(per_image)):
        g = v.mean(0)
        w = 1 - (v @ g) / (v.norm(dim=-1) * g.norm())
        want.append(x + lam * w[:, None] * g)
    torch.testing.assert_close(under["lm.input"], torch.cat(want), atol=1e-5, rtol=0)
    assert not torch.allclose(under["lm.input"], plain["lm.input"], atol=1e-4)


def test_agci_formula_on_learned_absolute_organism():
    """GPT-2 LM: lm.input holds wpe(position ids); AGCI must read and shift the projector output only."""
    from helpers import mirrored_pair
    m = interp.load("analyses/organisms/checkpoints/learned-absolute-seed0")
    assert m.adapter.rope_kind(m.model) == "none"
    clean, _, _, _ = mirrored_pair(m, 2)
    assert_agci_formula(m, clean, 0.8)
    ad = interp.AdaptiveAGCI(rule="norm_ratio")
    proj = trace(m, clean, cache=["projector"]).cache["projector"]  # (n_images, N, D)
    assert ad.lambdas(m, clean) == pytest.approx([adaptive_lambda(v, "norm_ratio") for v in proj], rel=1e-5)


@pytest.mark.parametrize("build", [tiny.build_llava_next, tiny.build_llava_onevision], ids=["next", "onevision"])
def test_agci_next_newlines_untouched_per_image_changed_pooled(build):
    model, proc = build()
    m = interp.load(model, proc)
    inputs = m.inputs([tiny.image(40, 60)], [m.prompt("describe the image ?")])
    imap = m.image_map(inputs)
    newline = imap.is_image & ~imap.is_patch
    for pooled, changes in ((False, False), (True, True)):
        _, edits = m.prepare(inputs, [interp.AGCI(lam=1.0, pooled=pooled)])
        h = torch.randn(1, inputs["input_ids"].shape[1], model.config.text_config.hidden_size)
        out = edits["lm.input"](h)
        assert torch.equal(out[newline], h[newline]) != changes
        assert not torch.equal(out[imap.is_patch], h[imap.is_patch])
        assert torch.equal(out[~imap.is_image], h[~imap.is_image])


def test_generate_baseline_equals_hf_generate(arch):
    name, m, inputs = arch
    from transformers import GenerationConfig
    ours = m.generate(inputs, max_new_tokens=4)
    # greedy for exactly 4 tokens: no EOS to stop at (min_new_tokens would instead forbid EOS, which
    # a random model may pick: the tiny Gemma3n does at its 4th step)
    gc = GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=None,
                          pad_token_id=m.tokenizer.pad_token_id)
    with torch.no_grad():
        hf = m.model.generate(**inputs, generation_config=gc)
    assert torch.equal(ours, hf[:, inputs["input_ids"].shape[1]:])


def test_generate_with_bapa_equals_loop_without_cache(arch):
    name, m, inputs = arch
    n = 4
    ours = m.generate(inputs, [interp.BaPA()], max_new_tokens=n)
    prepared = interp.BaPA().prepare(m, inputs)
    pos = prepared["position_ids"]
    L = inputs["input_ids"].shape[1]
    n_img = m.image_map(inputs).is_image.sum(-1)
    real = inputs["attention_mask"].sum(-1)
    flat = pos if pos.dim() == 2 else pos[0]
    assert torch.equal(flat[:, -1] + 1, real - n_img + 1)  # first decode id: L − n_img + 1 per row
    ids, toks = inputs["input_ids"], []
    for k in range(n):
        step = torch.cat([pos, (pos[..., -1:] + torch.arange(1, k + 1))], -1) if k else pos
        full = {**inputs, "input_ids": ids, "position_ids": step,
                "attention_mask": torch.cat([inputs["attention_mask"], torch.ones(2, k, dtype=torch.long)], 1),
                **m.adapter.extend_inputs_for_decode(inputs, k)}
        with torch.no_grad():
            nxt = m.model(**full).logits[:, -1].argmax(-1)
        toks.append(nxt)
        ids = torch.cat([ids, nxt[:, None]], 1)
    assert torch.equal(ours, torch.stack(toks, 1)), (ours, torch.stack(toks, 1))
    assert L == inputs["input_ids"].shape[1]


def test_unsupported_and_marker_errors():
    with pytest.raises(SpatialBiasError, match="supported: .*Gemma3ForConditionalGeneration"):
        interp.load(torch.nn.Linear(2, 2), processor=object())
    model, proc = tiny.build_gemma3()
    m = interp.load(model, proc)
    assert m.image_marker == "<start_of_image>"
    with pytest.raises(SpatialBiasError, match="has 0 image token"):
        m.inputs([tiny.image()], ["user describe the image ? assistant"])


@pytest.mark.parametrize("ivs", [[], [interp.BaPA()]], ids=["baseline", "bapa"])
def test_gemma3_image_tokens_still_attend_bidirectionally(ivs):
    # A change to the LAST image token at lm.input must reach the FIRST image token after block 0:
    # only possible through Gemma3's bidirectional image mask, which BaPA must leave intact.
    from interp.tracing import trace
    model, proc = tiny.build_gemma3()
    m = interp.load(model, proc)
    inputs = m.inputs([tiny.image()], [m.prompt("describe the image ?")])
    img = m.image_mask(inputs["input_ids"])[0].nonzero().flatten()
    first, last = int(img[0]), int(img[-1])

    def bump(x):
        x = x.clone()
        x[0, last] += 1.0
        return x

    a = trace(m, inputs, cache=["lm.blocks.0"], interventions=ivs).cache["lm.blocks.0"]
    b = trace(m, inputs, cache=["lm.blocks.0"], interventions=ivs, edits={"lm.input": bump}).cache["lm.blocks.0"]
    assert (a[0, first] - b[0, first]).abs().max() > 1e-4
    assert torch.equal(a[0, :first], b[0, :first])  # text before the image stays causal


def test_position_controls_permute_only_image_ids(arch):
    """``PositionPermute``: image tokens take each other's ids (reverse: hand-computed order; on
    M-RoPE the whole (t, h, w) triple moves), text ids are untouched, and the logits change."""
    name, m, inputs = arch
    default = m.default_position_ids(inputs)
    imap = m.image_map(inputs)
    base = logits(m, inputs)
    for iv in (interp.PositionPermute("reverse"), interp.PositionPermute("shuffle", seed=3)):
        pos = iv.position_ids(m, inputs)
        flat, ref = (pos, default) if pos.dim() == 2 else (pos.permute(1, 2, 0), default.permute(1, 2, 0))
        for b in range(pos.shape[-2]):
            patch = imap.is_patch[b]
            assert torch.equal(flat[b, ~patch], ref[b, ~patch])
            for img in range(int(imap.image[b].max()) + 1):
                sel = (imap.image[b] == img) & patch
                got, want = flat[b, sel], ref[b, sel]
                if iv.mode == "reverse":
                    assert torch.equal(got, want.flip(0))
                else:  # a permutation of the same ids (rows of the triple kept together)
                    key = lambda t: sorted(map(tuple, t.reshape(len(t), -1).tolist()))  # noqa: E731
                    assert key(got) == key(want) and not torch.equal(got, want)
        assert (logits(m, inputs, [iv]) - base).abs().max() > 1e-5


def test_adaptive_agci_is_agci_with_the_rules_lambda(arch):
    """``AdaptiveAGCI`` = ``AGCI(λ)`` per image with λ computed by hand from that image's LM-input tokens."""
    from interp.interventions import adaptive_lambda
    name, m, inputs = arch
    for rule, scale in (("cos_spread", 2.0), ("norm_ratio", 0.3)):
        iv = interp.AdaptiveAGCI(rule=rule, scale=scale)
        lams = iv.lambdas(m, inputs)
        assert len(lams) == len(inputs["input_ids"]) and all(0 < lam <= 4.0 for lam in lams)
        got = logits(m, inputs, [iv])
        for b, lam in enumerate(lams):  # the same λ as a fixed AGCI gives the same row
            want = logits(m, inputs, [interp.AGCI(lam=lam)])[b]
            assert torch.allclose(got[b], want, atol=1e-5), (rule, b)
    # hand computation of the rules
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    g = v.mean(0)
    cos = torch.nn.functional.cosine_similarity(v, g.expand_as(v), dim=-1)
    assert adaptive_lambda(v, "cos_spread", 2.0) == pytest.approx(2.0 * float(cos.std(correction=0)))
    assert adaptive_lambda(v, "norm_ratio", 0.5) == pytest.approx(0.5 * float(v.norm(dim=-1).mean() / g.norm()))
    assert adaptive_lambda(v, "norm_ratio", 100.0, lam_max=3.0) == 3.0


@pytest.mark.parametrize("two_per_row", [False, True], ids=["tiled", "two_per_row"])
def test_onevision_token_order_base_then_unpadded_rows_each_ending_in_newline(two_per_row):
    """LLaVA-OneVision: an image alone in its row is its base view, then the unpadded tile grid row
    by row, each row ending in ``image_newline`` (image token id, no cell); an image sharing its
    row is not tiled: base view, then one newline. Checked against HF's own forward: the LM input
    at every newline slot is the model's ``image_newline`` and at every patch slot the projector
    output of that patch (read through the adapter's vision-side token map)."""
    model, proc = tiny.build_llava_onevision()
    m = interp.load(model, proc)
    if two_per_row:
        inputs = m.inputs([[tiny.image(seed=1), tiny.image(40, 60, seed=2)]], [m.prompt("what is this ?", n_images=2)])
    else:
        inputs = m.inputs([tiny.image(40, 60, seed=1)], [m.prompt("what is this ?")])
    imap = m.image_map(inputs)
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    x = trace(m, inputs, cache=["lm.input", "projector"]).cache
    img = imap.is_image[0].nonzero().flatten()
    newline = imap.is_image[0] & ~imap.is_patch[0]
    assert torch.equal(x["lm.input"][0][newline], model.model.image_newline.expand(int(newline.sum()), -1))
    for i in range(int(imap.image[0].max()) + 1):
        pos = img[imap.image[0][img] == i]
        assert (imap.view[0][pos[:side * side]] == 0).all() and (imap.row[0][pos[:side * side]] >= 0).all()
        if two_per_row:  # base view, then one newline
            assert len(pos) == side * side + 1 and bool(newline[pos[-1]])
            continue
        tiles = pos[side * side:]
        h, w = int(imap.rows[0][tiles[0]]), int(imap.cols[0][tiles[0]])
        assert len(tiles) == h * (w + 1) and h < w  # a wide image: rows dropped by unpadding
        assert newline[tiles].view(h, w + 1)[:, -1].all() and not newline[tiles].view(h, w + 1)[:, :-1].any()
        assert torch.equal(imap.row[0][tiles].view(h, w + 1)[:, :-1], torch.arange(h)[:, None].expand(h, w))
    # every patch slot of the LM input holds the projector output of the patch the token maps say
    pm = m.token_map(inputs, "projector")
    proj = x["projector"].reshape(-1, x["projector"].shape[-1])
    for p in imap.is_patch[0].nonzero().flatten().tolist():
        key = (int(imap.image[0, p]), int(imap.view[0, p]), int(imap.row[0, p]), int(imap.col[0, p]))
        src = ((pm.image == key[0]) & (pm.view == key[1]) & (pm.row == key[2]) & (pm.col == key[3])).nonzero().flatten()
        assert len(src) == 1 and torch.equal(proj[src[0]], x["lm.input"][0, p])


@pytest.mark.parametrize("build", [tiny.build_qwen3vl, tiny.build_qwen3vl_moe], ids=["qwen3vl", "qwen3vl_moe"])
def test_qwen3vl_deepstack_is_added_after_the_declared_blocks(build):
    """Qwen3-VL's DeepStack, read off HF's own forward: after LM block k < len(deepstack_visual_indexes)
    the stream entering block k + 1 is block k's output plus ``vision.deepstack.{k}`` at the image
    positions (in the adapter's token order, so positions="image" lines them up) and unchanged
    elsewhere; after the other blocks nothing is added. The adapter declares exactly these (Qwen3-VL-MoE's too)."""
    model, proc = build()
    m = interp.load(model, proc)
    inputs = m.inputs([tiny.image(seed=0), tiny.image(40, 60, seed=1)],
                      [m.prompt("describe the image ?"), m.prompt("what is this a picture of ?")])
    n = m.adapter.layer_count(model, "lm")
    k_ds = len(model.config.vision_config.deepstack_visual_indexes)
    assert m.adapter.injections(model) == {k: f"vision.deepstack.{k}" for k in range(k_ds)} and 0 < k_ds < n
    sites = [f"lm.blocks.{j}" for j in range(n)] + [f"lm.blocks.{j}#input" for j in range(1, n)] + \
        [f"vision.deepstack.{k}" for k in range(k_ds)] + ["projector"]
    img = trace(m, inputs, cache=sites, positions="image").cache
    raw = trace(m, inputs, cache=sites).cache
    text = ~m.image_mask(inputs["input_ids"])
    for j in range(n - 1):
        added = raw[f"lm.blocks.{j + 1}#input"] - raw[f"lm.blocks.{j}"]
        assert torch.equal(added[text], torch.zeros_like(added[text]))
        if j < k_ds:
            want = img[f"lm.blocks.{j}"] + img[f"vision.deepstack.{j}"]
            assert torch.equal(img[f"lm.blocks.{j + 1}#input"], want)
        else:
            assert torch.equal(raw[f"lm.blocks.{j + 1}#input"], raw[f"lm.blocks.{j}"])
    # the DeepStack mergers hold merged tokens in the projector's order
    for k in range(k_ds):
        a, b = m.token_map(inputs, f"vision.deepstack.{k}"), m.token_map(inputs, "projector")
        assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("batch_row", "image", "row", "col"))


def test_onevision_anyres_max_shrink_keeps_the_map_consistent_with_hf():
    """With ``anyres_max_1`` a 2×2-tile image's grid exceeds one base view by more than 1.1² and HF
    shrinks it bilinearly: the LM map's tile view is the shrunk grid (token counts equal HF's
    packing, newline slots hold ``image_newline``, every cell still covered). Projector and
    lm.input tokens no longer pair one for one there (the shrink mixes tokens), so the
    projector = lm.input parity tests run on the unshrunk tiny default."""
    model, proc = tiny.build_llava_onevision()
    model.config.vision_aspect_ratio = proc.vision_aspect_ratio = "anyres_max_1"
    m = interp.load(model, proc)
    inputs = m.inputs([tiny.image(64, 64, seed=1)], [m.prompt("what is this ?")])
    imap = m.image_map(inputs)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
                                               batch_num_images=inputs["batch_num_images"]).pooler_output
    assert int(imap.is_image.sum()) == feats[0].shape[0]
    tiles = imap.is_image[0] & (imap.view[0] == 1)
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    assert int(imap.rows[0][tiles][0]) < 2 * side  # shrunk from the 2 × 2 tiles' 8 × 8 patches
    x = trace(m, inputs, cache=["lm.input"]).cache["lm.input"]
    newline = imap.is_image[0] & ~imap.is_patch[0]
    assert torch.equal(x[0][newline], model.model.image_newline.expand(int(newline.sum()), -1))
    assert set(imap.cells(3, 3)[0][tiles & imap.is_patch[0]].tolist()) == set(range(9))
