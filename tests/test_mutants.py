"""Tests written to kill mutants that survived the mutmut run over ``interp/`` (docs/mutation.md).

Each test names the mutants it kills (``module.function``: the mutation). Every one was checked by
applying the mutation to the code by hand, seeing the test fail, and reverting. References never go
through the code under test: hand-built tensors, the model's own modules, formulas written out.
"""
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import interp
from interp import attention, patching, tiny
from interp import batch as batch_mod
from interp.dispatch import forward, then
from spatialbias.errors import SpatialBiasError
from interp.interventions import AGCI, BaPA, Knockout
from interp.interventions.agci import AdaptiveAGCI, adaptive_lambda, agci_inject
from interp.interventions.controls import PositionPermute
from interp.sites import every_site, resolve
from interp.tracing import trace


@pytest.fixture(scope="module")
def llava():
    model, proc = tiny.build_llava()
    return interp.load(model, proc)


@pytest.fixture(scope="module")
def qwen():
    model, proc = tiny.build_qwen2vl()
    return interp.load(model, proc)


def _cands(m):
    return [m.tokenizer.convert_tokens_to_ids(w) for w in ("cat", "dog", "red")]


# ------------------------------------------------------------------------------------------------
# batch.py: padding conversion, row selection and joining keep M-RoPE (3, B, L) position ids aligned


def test_right_padding_rolls_every_plane_of_mrope_position_ids():
    """Kills _left_padded: position_ids not rolled ("position_ids" misspelt); the mixed-padding check
    reduced over the whole batch (all(None)). (A flattened roll, roll(s, None), is equivalent: it
    moves the same real-token ids and only changes ids at masked padding slots.) Also the bug this
    found: a left-padded row of a mixed batch was rolled too, opening a padding hole."""
    ids = torch.tensor([[5, 6, 7, 0, 0], [1, 2, 3, 4, 9]])  # row 0 right padded, row 1 full
    mask = (torch.arange(5)[None] < torch.tensor([[3], [5]])).long()
    pos = torch.stack([torch.arange(5)[None].expand(2, 5) * (k + 1) + 10 * k for k in range(3)])  # (3, B, L)
    out = batch_mod._left_padded({"input_ids": ids, "attention_mask": mask, "position_ids": pos})
    assert out["input_ids"].tolist() == [[0, 0, 5, 6, 7], [1, 2, 3, 4, 9]]
    assert out["attention_mask"].tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    for k in range(3):  # each plane rolled on its own: real tokens keep their ids
        assert torch.equal(out["position_ids"][k, 0, 2:], pos[k, 0, :3])
        assert torch.equal(out["position_ids"][k, 1], pos[k, 1])
    # a batch mixing a left-padded and a right-padded row is converted, not refused
    mixed = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 0]])
    got = batch_mod._left_padded({"input_ids": torch.arange(8).view(2, 4), "attention_mask": mixed})
    assert got["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 1, 1, 1]]
    assert got["input_ids"].tolist() == [[0, 1, 2, 3], [7, 4, 5, 6]]


def test_padding_holes_are_refused_naming_the_row():
    """Kills _left_padded: the hole check disabled (bool(None)), the row index lost or wrong."""
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 1], [0, 1, 1, 1]])
    with pytest.raises(SpatialBiasError, match="row 1 of the attention mask has padding between"):
        batch_mod._left_padded({"input_ids": torch.zeros(3, 4, dtype=torch.long), "attention_mask": mask})


def test_validate_fills_the_mask_and_refuses_bad_inputs(llava):
    """Kills validate: missing attention_mask not filled (None / wrong key), the 2-D check's `or`
    made `and`, the "image tokens but no pixels" check disabled; need_one_image_per_row disabled."""
    inputs = llava.inputs([tiny.image(seed=1)], [llava.prompt("what is this ?")])
    no_mask = {k: v for k, v in inputs.items() if k != "attention_mask"}
    b = batch_mod.validate(llava, no_mask)
    assert torch.equal(b["attention_mask"], torch.ones_like(inputs["input_ids"]))
    with pytest.raises(SpatialBiasError, match="shape \\(batch, length\\)"):
        batch_mod.validate(llava, {"input_ids": inputs["input_ids"][0]})
    text_only = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    with pytest.raises(SpatialBiasError, match="no pixel values"):
        batch_mod.validate(llava, text_only)
    two = llava.inputs([[tiny.image(seed=1), tiny.image(seed=2)]], [llava.prompt("what is this ?", n_images=2)])
    with pytest.raises(SpatialBiasError, match="needs exactly one image per row; row 0 has 2"):
        llava.batch(two).need_one_image_per_row("this analysis")


def test_select_rows_and_concat_keep_mrope_position_ids(qwen):
    """Kills select_rows: position_ids not selected / selected on the wrong axis / the per-row
    branch's `and` made `or`; concat: position_ids dropped or joined on the wrong axis."""
    b = qwen.batch(qwen.inputs([tiny.image(seed=1), tiny.image(seed=2)], [qwen.prompt("what is this ?")] * 2))
    pos = qwen.adapter.generation_position_ids(qwen.model, b)
    pos = pos + torch.arange(3)[:, None, None] * 100 + torch.arange(2)[None, :, None] * 1000  # every (plane, row) distinct
    b = b.replace(position_ids=pos)
    sel = batch_mod.select_rows(qwen, b, [1, 0, 1])
    assert torch.equal(sel["position_ids"], pos[:, [1, 0, 1]])
    assert torch.equal(sel["input_ids"], b["input_ids"][[1, 0, 1]])
    both = batch_mod.concat(qwen, b, sel)
    assert both["position_ids"].shape == (3, 5, pos.shape[-1])
    assert torch.equal(both["position_ids"], torch.cat([pos, pos[:, [1, 0, 1]]], 1))


# ------------------------------------------------------------------------------------------------
# imagemap.py: image index of a third image, non-square patch grids


def test_three_images_in_a_row_get_image_indices_0_1_2(llava):
    """Kills imagemap.build: ``img += 1`` → ``img = 1`` (a third image labelled as the second)."""
    prompt = llava.prompt("what is this ?", n_images=3)
    b = llava.batch(llava.inputs([[tiny.image(seed=s) for s in range(3)]], [prompt]))
    imap = b.imap
    labels = imap.image[0][imap.is_image[0]]
    n = int(imap.is_image[0].sum()) // 3
    assert labels.tolist() == [0] * n + [1] * n + [2] * n
    assert b.images_per_row == [3]


def test_non_square_grids_keep_rows_and_cols_apart(qwen):
    """Kills imagemap.build (rows=cols field) and from_fields (rows read from the cols column):
    on a 2×3 merged grid cells must follow the row and the column of each patch."""
    b = qwen.batch(qwen.inputs([tiny.image(56, 84, seed=3)], [qwen.prompt("what is this ?")]))
    _, h, w = b["image_grid_thw"][0].tolist()
    merge = qwen.model.config.vision_config.spatial_merge_size
    rows, cols = h // merge, w // merge
    assert rows != cols
    imap = b.imap
    sel = imap.is_patch[0]
    assert set(imap.rows[0][sel].tolist()) == {rows} and set(imap.cols[0][sel].tolist()) == {cols}
    # raster order: token k is patch (k // cols, k % cols); on a (1, cols) grid its cell is its column
    k = torch.arange(rows * cols)
    assert torch.equal(imap.cells(1, cols)[0][sel], k % cols)
    assert torch.equal(imap.cells(rows, 1)[0][sel], k // cols)
    vis = qwen.token_map(b, "projector")
    assert set(vis.rows.tolist()) == {rows} and set(vis.cols.tolist()) == {cols}


# ------------------------------------------------------------------------------------------------
# dispatch.py: composing edits, refusing edits that change shapes or never run, per-head image
# tokens, call labels


def test_then_runs_both_edits_in_order():
    """Kills dispatch.then: the earlier edit dropped (prev None / get(None)) or its result lost."""
    out = then({"a": lambda x: x + 1, "b": lambda x: x}, {"a": lambda x: x * 10, "c": lambda x: -x})
    assert out["a"](2) == 30 and out["c"](2) == -2 and out["b"](5) == 5


def test_edits_that_change_shape_or_never_run_and_bad_caches_are_refused(llava):
    """Kills _Run._visit (shape check `or` → `and`), _Run.end_forward (the never-ran check
    inverted; `<=` → `<` in the did-not-run cache check) and _Run.__init__ (positions="image" on a
    site without a token axis not refused)."""
    inputs = llava.inputs([tiny.image(seed=1)], [llava.prompt("what is this ?")])
    with pytest.raises(SpatialBiasError, match="an edit must keep the shape"):
        forward(llava, inputs, edits={"lm.blocks.0": lambda x: x[:, :-1]})
    text = llava.tokenizer(["what is this ?"], return_tensors="pt")
    with pytest.raises(SpatialBiasError, match="never ran in this forward"):
        forward(llava, dict(text), edits={"vision.blocks.0": lambda x: x})
    with pytest.raises(SpatialBiasError, match="did not run in this forward"):
        forward(llava, dict(text), cache=["vision.blocks.0"])
    with pytest.raises(SpatialBiasError, match="positions='image' needs sites with a token axis"):
        forward(llava, inputs, cache=["lm.blocks.0.attn.pattern"], positions="image")


def test_per_head_site_cached_at_image_positions(llava):
    """Kills _Run._image_tokens: the per-head width 2 → 3 (per-head values at image positions)."""
    b = llava.batch(llava.inputs([tiny.image(seed=1), tiny.image(seed=2)], [llava.prompt("what is this ?")] * 2))
    site = "lm.blocks.1.attn.heads"
    full = trace(llava, b, cache=[site]).cache[site]  # (B, L, H, d)
    img = trace(llava, b, cache=[site], positions="image").cache[site]
    assert full.dim() == 4 and torch.equal(img, full[b.imap.is_image & b.imap.is_patch])


def test_gemma3_rotary_call_labels_select_their_own_call():
    """Kills _Run._matching: a call label matching the other call (`==` → `!=`)."""
    model, proc = tiny.build_gemma3()
    m = interp.load(model, proc)
    inputs = m.inputs([tiny.image(seed=1)], [m.prompt("what is this ?")])
    labels = list(dict.fromkeys(model.config.text_config.layer_types))
    t = trace(m, inputs, cache=["lm.input"] + [f"lm.rotary@{lab}" for lab in labels])
    rot = dict(m.model.named_modules())[resolve(m.adapter, m.model, "lm.rotary").path]
    pos = torch.arange(inputs["input_ids"].shape[1])[None]
    for lab in labels:
        cos, sin = rot(t.cache["lm.input"], pos, lab)
        got_cos, got_sin = t.cache[f"lm.rotary@{lab}"]
        assert torch.equal(got_cos, cos) and torch.equal(got_sin, sin), lab


# ------------------------------------------------------------------------------------------------
# patching.py: the "text" group, single-position patches, interventions and grids in patching,
# refusals, the restoration table


def _items(m, n=2, prompts=None):
    imgs = [tiny.image(seed=s) for s in range(n)]
    prompts = prompts or [m.prompt("what is this ?")] * n
    base = m.inputs(imgs, prompts)
    src = m.inputs([im.transpose(0) for im in imgs], prompts)
    cands = _cands(m)
    return base, src, torch.tensor([cands[i % 3] for i in range(n)]), cands


def test_text_group_is_the_real_tokens_after_the_last_image_token(llava):
    """Kills group_masks: the text group starting one token early / at the wrong image token /
    one late / empty, or joined with `|` instead of `&` (padding counted as text)."""
    prompts = [llava.prompt("what is this ?"), llava.prompt("what is this a picture of the dog ?")]
    b = llava.batch(llava.inputs([tiny.image(seed=1), tiny.image(seed=2)], prompts))
    ids, am = b["input_ids"], b["attention_mask"].bool()
    img_id = llava.tokenizer.convert_tokens_to_ids(llava.image_token)
    masks = patching.group_masks(llava, b, [(0,), (0,)])
    for r in range(2):
        last_img = int((ids[r] == img_id).nonzero().max())
        want = torch.zeros_like(am[r])
        want[last_img + 1:] = True
        assert torch.equal(masks["text"][r], want & am[r]) and int(want.sum()) > 1
    assert not bool(am.all())  # the short row is padded, so `|` would differ


def test_sites_without_tokens_cannot_be_patched(llava):
    """Kills _check_site: the lm.rotary and unembed / no-token-axis refusals disabled."""
    base, src, correct, cands = _items(llava)
    for site, msg in [("lm.rotary", "lm.rotary cannot be activation-patched"), ("unembed", "no token axis"),
                      ("lm.blocks.0.attn.pattern", "no token axis")]:
        with pytest.raises(SpatialBiasError, match=msg):
            patching.run_patches(llava, base, src, [patching.Patch(site)], correct, cands, [(0,)] * 2)


@pytest.mark.parametrize("resume", [False, None])
def test_single_position_patch_equals_a_hand_made_copy(llava, resume):
    """Kills _selection: the position range check inverted / off by one at 0 and L, the slice
    taking two positions or none."""
    base, src, correct, cands = _items(llava)
    L = base["input_ids"].shape[1]
    site = "lm.blocks.0"
    src_h = trace(llava, src, cache=[site]).cache[site]
    for p in (0, L - 3):
        df = patching.run_patches(llava, base, src, [patching.Patch(site, position=p)], correct, cands,
                                  [(0,)] * 2, resume=resume).sort_values("item")

        def put(x, p=p):
            x = x.clone()
            x[:, p] = src_h[:, p]
            return x
        want = patching.logit_diff(forward(llava, base, edits={site: put}).logits[:, -1], correct, cands)
        assert torch.allclose(torch.tensor(df.metric.to_numpy()), want.double(), atol=1e-5), p
        assert df.position.tolist() == [p, p]
    with pytest.raises(SpatialBiasError, match=f"position {L} does not exist"):
        patching.run_patches(llava, base, src, [patching.Patch(site, position=L)], correct, cands, [(0,)] * 2)


def test_patching_runs_under_the_interventions(llava):
    """Kills _full_patches / _resumed_patches / _pre_jobs: lvlm.prepare(…) without the
    interventions (BaPA/AGCI silently off in the unpatched or the patched rows)."""
    base, src, correct, cands = _items(llava)
    ivs = [BaPA(), AGCI(lam=0.5)]
    ps = [patching.Patch("lm.input", "image"), patching.Patch("projector", "target"), patching.Patch("lm.blocks.1", "text")]
    full = patching.run_patches(llava, base, src, ps, correct, cands, [(0,)] * 2, interventions=ivs, resume=False)
    res = patching.run_patches(llava, base, src, ps, correct, cands, [(0,)] * 2, interventions=ivs)
    assert res.attrs["engine"] == "resumed"
    with torch.no_grad():
        want_base = patching.logit_diff(llava.run(base, ivs, last_only=True)[:, -1], correct, cands)
        plain = patching.logit_diff(llava.run(base, last_only=True)[:, -1], correct, cands)
    assert (want_base - plain).abs().max() > 1e-3  # the interventions matter here
    for df in (full, res):
        df = df.sort_values(["site", "item"])
        got = df[df.site == "lm.input"].base_metric.to_numpy()
        assert torch.allclose(torch.tensor(got), want_base.double(), atol=1e-5)
    a, b = full.sort_values(["site", "item"]), res.sort_values(["site", "item"])
    assert torch.allclose(torch.tensor(a.metric.to_numpy()), torch.tensor(b.metric.to_numpy()), atol=1e-4)


def test_grid_reaches_the_target_group_and_vision_sites_have_an_image_group(llava):
    """Kills _full_patches / site_groups: the grid not passed on (default 3×3 used); the vision
    sites' "image" group misspelt. On a 1×1 grid cell 0 is the whole image: target == image."""
    base, src, correct, cands = _items(llava)
    ps = [patching.Patch(s, g) for s in ("lm.input", "projector") for g in ("target", "image")]
    df = patching.run_patches(llava, base, src, ps, correct, cands, [(0,)] * 2, grid=(1, 1), resume=False)
    m = df.groupby(["site", "group"]).metric.mean()
    for s in ("lm.input", "projector"):
        assert abs(m[(s, "target")] - m[(s, "image")]) < 1e-6
    assert abs(m[("lm.input", "image")] - df.base_metric.mean()) > 1e-4  # the patch does something


def test_run_patches_refuses_mismatched_inputs(llava):
    """Kills run_patches: the shape/images-per-row check and the rows/targets/answers check with
    `or` → `and`; the one-image-per-row check of the target group skipped."""
    base, src, correct, cands = _items(llava)
    long_src, *_ = _items(llava, prompts=[llava.prompt("what is this a picture of ?")] * 2)
    with pytest.raises(SpatialBiasError, match="same shape and images per row"):
        patching.run_patches(llava, base, long_src, [patching.Patch("lm.input")], correct, cands, [(0,)] * 2)
    with pytest.raises(SpatialBiasError, match="2 rows but 1 target lists"):
        patching.run_patches(llava, base, src, [patching.Patch("lm.input")], correct, cands, [(0,)])
    prompt = llava.prompt("what is this ?", n_images=2)
    two = llava.inputs([[tiny.image(seed=1), tiny.image(seed=2)]], [prompt])
    two_src = llava.inputs([[tiny.image(seed=2), tiny.image(seed=1)]], [prompt])
    with pytest.raises(SpatialBiasError, match="'target' token group needs exactly one image per row"):
        patching.run_patches(llava, two, two_src, [patching.Patch("lm.input", "target")], correct[:1], cands, [(0,)])


def test_restoration_table_columns_order_and_counts():
    """Kills restoration: groups re-sorted (sort=True / default), columns misnamed or dropped
    (patched, clean, corrupt, n_items, direction). (Sorting the n_items groupby is equivalent:
    pandas aligns it on the index.)"""
    df = pd.DataFrame({"item": [0, 1, 0, 1, 0], "site": ["z", "z", "a", "a", "a"],
                       "group": ["all"] * 5, "metric": [1.0, 3.0, 0.0, 2.0, 4.0],
                       "base_metric": [0.0] * 5, "source_metric": [4.0] * 5})
    r = patching.restoration(df, "denoise")
    assert list(r.columns) == ["site", "group", "restoration", "patched", "clean", "corrupt", "n_items", "direction"]
    assert r.site.tolist() == ["z", "a"]  # first-seen order, as the patches were given
    assert r.patched.tolist() == [2.0, 2.0] and r.restoration.tolist() == [0.5, 0.5]
    assert r.clean.tolist() == [4.0, 4.0] and r.corrupt.tolist() == [0.0, 0.0]
    assert r.n_items.tolist() == [2, 2] and set(r.direction) == {"denoise"}


def test_default_patches_lists_every_site_and_group(llava):
    """Kills default_patches: `+=` → `=` (earlier patches dropped), the group not passed on."""
    a, mdl = llava.adapter, llava.model
    nv, nl = a.layer_count(mdl, "vision"), a.layer_count(mdl, "lm")
    ps = patching.default_patches(llava, groups=("target", "text"))
    want = [patching.Patch(f"vision.blocks.{i}") for i in range(nv)] + [patching.Patch("projector")]
    want += [patching.Patch("lm.input", g) for g in ("target", "text")]
    want += [patching.Patch(f"lm.blocks.{i}", g) for i in range(nl) for g in ("target", "text")]
    assert ps == want


# ------------------------------------------------------------------------------------------------
# attention.py: cell flow from the text rows, on a non-square grid, under an intervention


def test_cell_flow_text_query_equals_the_cached_patterns(llava):
    """Kills query_rows (text rows start one token early / at the wrong image token), cell_flow
    (query weights multiplied instead of normalised, grid[1]·grid[1] cells, the interventions not
    passed to the forward)."""
    prompts = [llava.prompt("what is this ?"), llava.prompt("what is this a picture of the dog ?")]
    b = llava.batch(llava.inputs([tiny.image(seed=1), tiny.image(seed=2)], prompts))
    ko = Knockout(cells=(0, 4), query="last")
    grid = (2, 3)
    got = attention.cell_flow(llava, b, [ko], query="text", grid=grid)  # (B, layers, heads, 6)
    n = llava.adapter.layer_count(llava.model, "lm")
    sites = [f"lm.blocks.{i}.attn.pattern" for i in range(n)]
    pat = trace(llava, b, cache=sites, interventions=[ko]).cache
    ids, am = b["input_ids"], b["attention_mask"].bool()
    img_id = llava.tokenizer.convert_tokens_to_ids(llava.image_token)
    cells = b.imap.cells(*grid)
    assert got.shape == (2, n, pat[sites[0]].shape[1], 6)
    for r in range(2):
        q = torch.zeros_like(am[r])
        q[int((ids[r] == img_id).nonzero().max()) + 1:] = True
        q &= am[r]
        for i, s in enumerate(sites):
            for c in range(6):
                want = pat[s][r][:, q][:, :, cells[r] == c].sum(-1).mean(-1)  # (H,): summed over keys, mean over queries
                assert torch.allclose(got[r, i, :, c], want, atol=1e-6), (r, i, c)
    plain = attention.cell_flow(llava, b, query="text", grid=grid)
    assert not torch.allclose(plain, got)  # the knockout moves the flow


# ------------------------------------------------------------------------------------------------
# interventions: AGCI's formula per image, adaptive λ's scale and cap, pooled λ, seeded shuffles


def test_agci_inject_is_the_per_image_formula():
    """Kills agci_inject: the per-image mean made a scalar (mean(None)); tokens_per_image checks
    (`or` → `and`, `<= 0` → `< 0` / `<= 1`)."""
    torch.manual_seed(0)
    v = torch.randn(6, 4)
    lam = 0.7
    want = []
    for part in v.split(3):
        g = part.mean(0)
        w = 1 - F.cosine_similarity(part, g[None], dim=-1)
        want.append(part + lam * w[:, None] * g)
    assert torch.allclose(agci_inject(v, lam, tokens_per_image=3), torch.cat(want), atol=1e-6)
    assert agci_inject(v, lam, tokens_per_image=1).shape == v.shape  # one token per image: allowed
    for bad in (0, 4):
        with pytest.raises(SpatialBiasError, match="do not split into images"):
            agci_inject(v, lam, tokens_per_image=bad)


def test_adaptive_agci_uses_its_scale_and_cap(llava):
    """Kills AdaptiveAGCI.strength (scale or lam_max not passed on) and AdaptiveAGCI.lambdas
    (``pooled`` not passed on)."""
    torch.manual_seed(0)
    v = torch.randn(9, 8)
    raw = adaptive_lambda(v, "norm_ratio", scale=1.0, lam_max=1e9)
    assert AdaptiveAGCI(rule="norm_ratio", scale=0.25, lam_max=100.0).strength(v) == pytest.approx(0.25 * raw)
    assert AdaptiveAGCI(rule="norm_ratio", scale=1.0, lam_max=0.5 * raw).strength(v) == pytest.approx(0.5 * raw)
    prompt = llava.prompt("what is this ?", n_images=2)
    two = llava.inputs([[tiny.image(seed=1), tiny.image(seed=2)]], [prompt])
    assert len(AdaptiveAGCI(pooled=False).lambdas(llava, two)) == 2  # one λ per image
    assert len(AdaptiveAGCI(pooled=True).lambdas(llava, two)) == 1  # one λ per row


def test_position_shuffle_is_fixed_by_its_seed(llava):
    """Kills PositionPermute.position_ids: the generator unseeded (None / not passed)."""
    b = llava.batch(llava.inputs([tiny.image(seed=1)], [llava.prompt("what is this ?")]))
    a1 = PositionPermute("shuffle", seed=3).position_ids(llava, b)
    a2 = PositionPermute("shuffle", seed=3).position_ids(llava, b)
    c = PositionPermute("shuffle", seed=4).position_ids(llava, b)
    assert torch.equal(a1, a2) and not torch.equal(a1, c)


# ------------------------------------------------------------------------------------------------
# sites.py: every field of a resolved site


def test_resolved_sites_carry_call_key_heads_and_token_axis(llava):
    """Kills resolve / _with_key / every_site / _layer_index mutants that drop a call index, a key,
    the head count, the canonical name or the token axis, or move the layer-index bounds."""
    a, mdl = llava.adapter, llava.model
    n = a.layer_count(mdl, "lm")
    H = a.head_count(mdl)
    def r(name):
        return resolve(a, mdl, name)
    s = r("module:model.language_model.norm@1")
    assert (s.hook, s.call, s.canonical) == ("output", 1, "module:model.language_model.norm")
    s = r("module:model.language_model.layers.0#attention_mask@1")
    assert (s.name, s.hook, s.key, s.call) == ("module:model.language_model.layers.0#attention_mask@1", "kwarg",
                                               "attention_mask", 1)
    s = r("lm.input@1")
    assert (s.hook, s.call, s.tokens, s.canonical) == ("input", 1, "lm", "lm.input")
    s = r("lm.blocks.0#input@1")
    assert (s.hook, s.call, s.tokens, s.canonical) == ("input", 1, "lm", "lm.input")
    s = r("lm.blocks.1#input")
    assert (s.hook, s.tokens, s.canonical) == ("input", "lm", "lm.blocks.1#input")
    s = r("lm.blocks.1#position_embeddings@0")
    assert (s.hook, s.key, s.call, s.canonical) == ("kwarg", "position_embeddings", 0,
                                                     "lm.blocks.1#position_embeddings")
    s = r("lm.blocks.-1.attn.heads@0")
    assert (s.hook, s.call, s.heads, s.tokens, s.canonical) == ("input", 0, H, "lm", f"lm.blocks.{n - 1}.attn.heads")
    s = r("lm.blocks.0.attn.pattern@1")
    assert (s.hook, s.call, s.heads, s.tokens) == ("pattern", 1, None, None)
    tokens = {name: r(name).tokens for name in ("lm.rotary", "lm.blocks.0", "lm.final_norm", "unembed", "lm.embed",
                                                "vision.blocks.0", "projector")}
    assert tokens == {"lm.rotary": None, "lm.blocks.0": "lm", "lm.final_norm": "lm", "unembed": "lm",
                      "lm.embed": "lm", "vision.blocks.0": "vision", "projector": "vision"}
    assert r(f"lm.blocks.-{n}").name == f"lm.blocks.-{n}" and r(f"lm.blocks.-{n}").canonical == "lm.blocks.0"
    for bad in (n, -n - 1):
        with pytest.raises(SpatialBiasError, match=f"has {n} lm layers"):
            r(f"lm.blocks.{bad}")
    sites = every_site(a, mdl)
    for i in range(n):
        assert f"lm.blocks.{i}.attn.heads" in sites and f"lm.blocks.{i}.attn.pattern" in sites
    assert not any(x.startswith("vision.") and x.endswith((".heads", ".pattern")) for x in sites)


def test_select_rows_keeps_inputs_after_the_image_inputs():
    """Kills select_rows: ``continue`` → ``break`` at the first image input (Gemma3's processor puts
    token_type_ids, which make image attention bidirectional, after pixel_values)."""
    model, proc = tiny.build_gemma3()
    m = interp.load(model, proc)
    b = m.batch(m.inputs([tiny.image(seed=1), tiny.image(seed=2)], [m.prompt("what is this ?")] * 2))
    assert list(b).index("token_type_ids") > list(b).index("pixel_values")
    sel = batch_mod.select_rows(m, b, [1, 0])
    assert set(sel) == set(b)
    assert torch.equal(sel["token_type_ids"], b["token_type_ids"][[1, 0]])


def test_knockout_on_decode_steps_blocks_an_image_token_at_column_0(llava):
    """Kills Knockout.decode_edits: ``col >= 0`` → ``col > 0`` / ``col >= 1`` (a prompt that starts
    with the image, as checkpoints without a chat template build it, has a patch at key 0)."""
    inputs = dict(llava.inputs([tiny.image(seed=1)], ["<image>\nwhat is this ?"]))
    for k in ("input_ids", "attention_mask"):  # drop the BOS: the image starts the sequence
        inputs[k] = inputs[k][:, 1:]
    img_id = llava.tokenizer.convert_tokens_to_ids(llava.image_token)
    assert int(inputs["input_ids"][0, 0]) == img_id
    ko = Knockout(cells=(0,), query="text")
    t = trace(llava, inputs, interventions=[ko], max_new_tokens=3)
    full = dict(inputs)
    full["input_ids"] = torch.cat([inputs["input_ids"], t.tokens[:, :2]], 1)
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    with torch.no_grad():
        want = llava.run(full, [ko])[0, -3:]
    assert torch.allclose(t.logits[0], want, atol=1e-4)


def test_one_line_refusals_instead_of_other_errors(llava):
    """Kills select_rows (row == B let through to torch's IndexError), bapa_position_ids (the 2-D
    check's `or` → `and`), from_dict (a dict without "kind": KeyError instead of the refusal)."""
    from interp.interventions import from_dict
    from interp.interventions.bapa import bapa_position_ids
    b = llava.batch(llava.inputs([tiny.image(seed=1)], [llava.prompt("what is this ?")]))
    with pytest.raises(SpatialBiasError, match="row index out of range"):
        batch_mod.select_rows(llava, b, [1])
    with pytest.raises(SpatialBiasError, match="must both be \\(B, L\\)"):
        bapa_position_ids(torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.bool))
    with pytest.raises(SpatialBiasError, match="unknown intervention kind None"):
        from_dict({"lam": 0.5})
