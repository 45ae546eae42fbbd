"""Patching, position-id patching, attention flow, knockout and attribution patching, on a 1-D
RoPE model (LLaVA) and an M-RoPE model (Qwen2-VL), plus the organism's planted mechanism."""
import pytest
import torch

import interp
from helpers import mirrored_pair
from interp import attention, attribution, patching, tiny
from interp.interventions import Knockout, PositionSwap


def make(name, n=3):
    model, proc = tiny.BUILDERS[name]()
    m = interp.load(model, proc)
    return (m, *mirrored_pair(m, n))


@pytest.fixture(scope="module", params=["llava", "qwen2vl"])
def setup(request):
    return (request.param, *make(request.param))


def _by_hand(m, base, source, site, correct, cands, image_only=False):
    """The patched metric of every row, computed without the patching engine: a plain forward of
    ``base`` with ``site``'s tensor (``image_only``: its image tokens) replaced by ``source``'s
    (cached by a separate trace; both placements have the same prompts, so the same slots)."""
    from interp.tracing import trace
    want = trace(m, source, cache=[site]).cache[site]
    sel = m.batch(base).imap.is_image if image_only else torch.ones(want.shape[:2], dtype=torch.bool)

    def edit(x):
        x = x.clone()
        x[sel] = want.to(x.dtype)[sel]
        return x
    logits = trace(m, base, edits={site: edit}).logits[:, -1]
    return patching.logit_diff(logits, correct, cands).numpy()


def test_patches_at_a_middle_site_equal_a_hand_built_edit(setup):
    """A patch of block 0's image tokens is what one plain forward with those tokens overwritten
    gives — not something the resumed engine could meet by returning the source or base metric
    (a shortcut fails: the values differ from both, checked)."""
    _, m, clean, corrupt, correct, cands = setup
    df = patching.run_patches(m, corrupt, clean, [patching.Patch("lm.blocks.0", "image")], correct, cands,
                              [(0, 8)] * 3).sort_values("item")
    got = df.metric.to_numpy()
    want = _by_hand(m, corrupt, clean, "lm.blocks.0", correct, cands, image_only=True)
    assert abs(got - want).max() < 1e-4, (got, want)
    for other in (df.base_metric, df.source_metric):  # neither shortcut meets it
        assert abs(got - other.to_numpy()).max() > 1e-3


def test_last_layer_full_residual_restores_exactly_one(setup):
    _, m, clean, corrupt, correct, cands = setup
    last = f"lm.blocks.{m.adapter.layer_count(m.model, 'lm') - 1}"
    for direction, base, src in (("denoise", corrupt, clean), ("noise", clean, corrupt)):
        df = patching.run_patches(m, base, src, [patching.Patch(last, "all")], correct, cands, [(0, 8)] * 3)
        assert abs(df.sort_values("item").metric.to_numpy()
                   - _by_hand(m, base, src, last, correct, cands)).max() < 1e-4
        r = patching.restoration(df, direction)
        assert (r.restoration - 1.0).abs().max() < 1e-6, r


def test_batched_patching_equals_one_forward_per_patch(setup):
    _, m, clean, corrupt, correct, cands = setup
    ps = [patching.Patch("lm.blocks.0", "target"), patching.Patch("lm.blocks.1", "text"), patching.Patch("projector")]
    df = patching.run_patches(m, corrupt, clean, ps, correct, cands, [(0, 8)] * 3, batch_size=64)
    small = patching.run_patches(m, corrupt, clean, ps, correct, cands, [(0, 8)] * 3, batch_size=3)  # 1 patch/forward
    assert torch.allclose(torch.tensor(small.metric.to_numpy()), torch.tensor(df.metric.to_numpy()), atol=1e-4)
    from interp.tracing import trace
    masks = patching.group_masks(m, corrupt, [(0, 8)] * 3)
    src = trace(m, clean, cache=[p.site for p in ps])
    for p in ps:
        if p.site == "projector":
            edit = {p.site: lambda x, s=src.cache[p.site]: s.clone()}
        else:
            edit = {p.site: lambda x, s=src.cache[p.site], mk=masks[p.group]: torch.where(mk[..., None], s, x)}
        lg = trace(m, corrupt, edits=edit).logits[:, -1]
        want = patching.logit_diff(lg, correct, cands)
        got = torch.tensor(df[(df.site == p.site) & (df.group == p.group)].sort_values("item").metric.to_numpy(),
                           dtype=torch.float32)
        assert torch.allclose(got, want.float(), atol=1e-4), (p, got, want)


def test_knockout_of_every_image_token_removes_the_image(setup):
    _, m, clean, corrupt, _, _ = setup
    ko = Knockout(cells=None, query="text")
    with torch.no_grad():
        a, b = m.run(clean, [ko]), m.run(corrupt, [ko])
        a0, b0 = m.run(clean), m.run(corrupt)
    last = slice(-3, None)
    assert torch.allclose(a[:, last], b[:, last], atol=1e-5)
    assert (a0[:, last] - b0[:, last]).abs().max() > 1e-4
    # a window of one layer only blocks part of the flow
    one = Knockout(cells=None, query="text", layers=(0, 1))
    with torch.no_grad():
        assert (m.run(clean, [one]) - m.run(corrupt, [one]))[:, last].abs().max() > 1e-5


def test_knockout_works_under_sdpa_and_eager_alike(setup):
    _, m, clean, _, _, _ = setup
    ko = Knockout(cells=(0, 4), query="last")
    with torch.no_grad():
        sdpa = m.run(clean, [ko])
        with attention.eager_attention(m.model):
            eager = m.run(clean, [ko])
    assert torch.allclose(sdpa, eager, atol=1e-4)


def test_cell_flow_against_attention_weights(setup):
    name, m, clean, _, _, _ = setup
    f = attention.cell_flow(m, clean, query="last")
    L = m.adapter.layer_count(m.model, "lm")
    assert f.shape[:2] == (3, L) and f.shape[-1] == 9
    with torch.no_grad(), attention.eager_attention(m.model):
        att = m.model(**clean, output_attentions=True).attentions
    cells = m.image_map(clean).cells(3, 3)
    for layer in range(L):
        for c in (0, 4, 8):
            want = torch.stack([att[layer][b, :, -1, cells[b] == c].sum(-1) for b in range(3)])
            assert torch.allclose(f[:, layer, :, c], want, atol=1e-6)
    assert (f.sum(-1) <= 1 + 1e-5).all()
    assert m.model.config._attn_implementation != "eager"  # switched back after the run


def test_position_swap_semantics(setup):
    name, m, clean, _, _, _ = setup
    sw = PositionSwap(a=0, b=8)
    pos = sw.prepare(m, clean)["position_ids"]
    base = m.default_position_ids(clean)
    cells = m.image_map(clean).cells(3, 3)
    flat, bflat = (pos, base) if pos.dim() == 2 else (pos[0], base[0])
    assert torch.equal(flat[0][cells[0] == 0], bflat[0][cells[0] == 8])
    assert torch.equal(flat[0][cells[0] == 8], bflat[0][cells[0] == 0])
    assert torch.equal(flat.sort(-1).values, bflat.sort(-1).values)  # a permutation
    n = m.adapter.layer_count(m.model, "lm")
    with torch.no_grad():
        everywhere = m.run(clean, [sw])
        window_all = m.run(clean, [PositionSwap(a=0, b=8, layers=(0, n))])
        one = m.run(clean, [PositionSwap(a=0, b=8, layers=(0, 1))])
        plain = m.run(clean)
    assert torch.allclose(everywhere, window_all, atol=1e-5)
    assert (one - plain).abs().max() > 1e-6 and (one - everywhere).abs().max() > 1e-6
    with torch.no_grad():
        assert torch.equal(m.run(clean, [PositionSwap(a=4, b=4)]), m.run(clean, [PositionSwap(a=4, b=4, layers=None)]))


def test_attribution_matches_a_hand_gradient(setup):
    _, m, clean, corrupt, correct, cands = setup
    p = patching.Patch("lm.blocks.0", "last")
    df = attribution.attribution_patching(m, corrupt, clean, [p], correct, cands, [(0, 8)] * 3)
    from interp.tracing import trace
    src = trace(m, clean, cache=["lm.blocks.0"]).cache["lm.blocks.0"]
    acts = {}
    h = m.adapter.module(m.model, "lm.blocks.0").register_forward_hook(
        lambda mod, a, o: acts.setdefault("x", o[0] if isinstance(o, tuple) else o).retain_grad())
    try:
        lg = m.model(**corrupt, use_cache=False).logits[:, -1]
    finally:
        h.remove()
    patching.logit_diff(lg, correct, cands).sum().backward()
    m.model.zero_grad(set_to_none=True)
    want = ((src - acts["x"].detach()) * acts["x"].grad)[:, -1].sum(-1)
    got = torch.tensor(df.sort_values("item").attribution.to_numpy(), dtype=torch.float32)
    assert torch.allclose(got, want.float(), atol=1e-5)


def test_organism_bias_is_carried_by_position_ids(small_probe_50):
    """The shipped organism: swapping the image-token ids of the two cells restores most of the
    gap between its best and worst cell (a regression test of the planted mechanism)."""
    from analyses import causal
    m = interp.load("organism")
    pairs = causal.placement_pairs(m, small_probe_50, clean_cell=8, corrupt_cell=0, n_items=50)
    import numpy as np
    for ivs, check in (([], "baseline"), ([interp.BaPA()], "bapa")):
        items = causal.position_items(m, pairs, ivs)
        assert len(items) == 50 * (1 + m.adapter.layer_count(m.model, "lm"))  # per item × window
        rows = {(r["metric"], r["layer"]): r for r in causal.position_rows(items, np.random.default_rng(0))}
        r = rows[("position_restoration", None)]
        alls = items[items.layers == "all"]
        gap = alls.clean.mean() - alls.corrupt.mean()
        assert r["value"] == pytest.approx((alls.fixed.mean() - alls.corrupt.mean()) / gap)  # a ratio of item means
        if check == "baseline":
            assert gap > 1.0 and r["value"] > 0.8 and r["ci_low"] < r["value"] < r["ci_high"] and r["ci_low"] > 0.5
        else:
            assert (alls.fixed == alls.corrupt).all()  # one shared id: nothing to swap


@pytest.fixture(scope="module")
def small_probe_50(tmp_path_factory):
    from probes.build import shapes_probe
    out = tmp_path_factory.mktemp("probe50")
    shapes_probe(out, n_items=50, seed=11, progress=False)
    return out


def test_knockout_on_gemma3_keeps_the_bidirectional_image_mask():
    m, clean, corrupt, _, _ = make("gemma3")
    ko = Knockout(cells=None, query="text")
    with torch.no_grad():
        a, b = m.run(clean, [ko]), m.run(corrupt, [ko])
    assert torch.allclose(a[:, -2:], b[:, -2:], atol=1e-5)  # the question no longer sees the image
    # image tokens still attend to later image tokens (bidirectional) under the knockout
    from interp.tracing import trace
    img = m.image_mask(clean["input_ids"])[0].nonzero().flatten()

    def bump(x):
        x = x.clone()
        x[0, int(img[-1])] += 1.0
        return x
    h0 = trace(m, clean, cache=["lm.blocks.0"], interventions=[ko]).cache["lm.blocks.0"]
    h1 = trace(m, clean, cache=["lm.blocks.0"], interventions=[ko], edits={"lm.input": bump}).cache["lm.blocks.0"]
    assert (h0[0, int(img[0])] - h1[0, int(img[0])]).abs().max() > 1e-4
