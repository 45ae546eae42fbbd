"""Attribution estimators (plain AtP, pixel-path conductance, activation-path IG per site) against
hand computations and exact patching, and the exact per-position patching engine against single
hand-run patches and against :func:`interp.patching.run_patches`."""
import pytest
import torch

import interp
from helpers import mirrored_pair
from interp import attribution as A
from interp import patching, tiny
from spatialbias.errors import SpatialBiasError
from interp.tracing import trace


@pytest.fixture(scope="module")
def llava():
    m = interp.load(*tiny.build_llava())
    return (m, *mirrored_pair(m, 3))


def _effects(df):
    return torch.tensor((df.sort_values("item").metric - df.sort_values("item").base_metric).to_numpy(),
                        dtype=torch.float32)


@pytest.mark.parametrize("method,steps", [("atp", 1), ("conductance", 1), ("conductance", 3), ("site_ig", 1),
                                          ("site_ig", 2)])
def test_every_estimator_is_exact_where_the_metric_is_linear_in_the_site(llava, method, steps):
    """Two candidates make the metric a linear function of the final-norm output (lm_head, then
    one logit difference): every estimator must equal the exact patch effect."""
    m, clean, corrupt, correct, cands = llava
    two = cands[:2]
    corr = torch.tensor([two[i % 2] for i in range(3)])
    ps = [patching.Patch("lm.final_norm", "last"), patching.Patch("lm.final_norm", "all")]
    ex = patching.run_patches(m, corrupt, clean, ps, corr, two, [(0, 8)] * 3)
    at = A.attribution_patching(m, corrupt, clean, ps, corr, two, [(0, 8)] * 3, steps=steps, method=method)
    for p in ps:
        want = _effects(ex[ex.group == p.group])
        got = torch.tensor(at[at.group == p.group].sort_values("item").attribution.to_numpy(), dtype=torch.float32)
        assert want.abs().max() > 1e-3
        assert torch.allclose(got, want, atol=1e-4), (method, p, got, want)


def test_site_ig_equals_a_hand_line_integral(llava):
    m, clean, corrupt, correct, cands = llava
    site, k = "lm.blocks.0", 2
    scores, bm, sm = A.position_scores(m, corrupt, clean, [site], correct, cands, steps=k, method="site_ig")
    a_b = trace(m, corrupt, cache=[site]).cache[site]
    a_s = trace(m, clean, cache=[site]).cache[site]
    g_mean = torch.zeros_like(a_b)
    for j in range(k):
        x = (a_b + (j + 0.5) / k * (a_s - a_b)).requires_grad_(True)
        h = m.adapter.module(m.model, site).register_forward_hook(lambda _m, _a, _o, x=x: x)  # a plain hook
        try:
            lg = m.model(**corrupt, use_cache=False).logits[:, -1]
        finally:
            h.remove()
        g_mean += torch.autograd.grad(patching.logit_diff(lg, correct, cands).sum(), x)[0] / k
    want = ((a_s - a_b) * g_mean).sum(-1)  # (B, L)
    assert scores[site].shape == want.shape
    assert torch.allclose(scores[site], want, atol=1e-5)


def test_conductance_equals_a_hand_trapezoid_along_the_pixels(llava):
    m, clean, corrupt, correct, cands = llava
    site, k = "projector", 2
    scores, bm, sm = A.position_scores(m, corrupt, clean, [site], correct, cands, steps=k, method="conductance")
    acts, grads, metric = [], [], []
    for j in range(k + 1):
        a = j / k
        x = dict(corrupt, pixel_values=corrupt["pixel_values"] + a * (clean["pixel_values"] - corrupt["pixel_values"]))
        keep = {}
        h = m.adapter.module(m.model, site).register_forward_hook(lambda _m, _a, o: keep.setdefault("a", o))
        try:
            lg = m.model(**x, use_cache=False).logits[:, -1]
        finally:
            h.remove()
        md = patching.logit_diff(lg, correct, cands)
        grads.append(torch.autograd.grad(md.sum(), keep["a"])[0])
        acts.append(keep["a"].detach())
        metric.append(md.detach())
    want = sum((0.5 * (grads[j] + grads[j + 1]) * (acts[j + 1] - acts[j])).sum(-1) for j in range(k))
    assert torch.allclose(scores[site], want.reshape(3, -1), atol=1e-5)
    assert torch.allclose(bm, metric[0], atol=1e-5) and torch.allclose(sm, metric[-1], atol=1e-5)


def test_integrated_estimators_converge_to_exact_patches(llava):
    """The straight path at the site (site_ig) is the exact line integral of the site's ``all``
    patch; conductance is exact at a cut (the projector's output) as the steps grow."""
    m, clean, corrupt, correct, cands = llava
    ps = [patching.Patch("lm.blocks.0", "all"), patching.Patch("projector")]
    ex = patching.run_patches(m, corrupt, clean, ps, correct, cands, [(0, 8)] * 3)
    gap = float((ex.source_metric - ex.base_metric).abs().mean())
    ig = A.attribution_patching(m, corrupt, clean, ps[:1], correct, cands, [(0, 8)] * 3, steps=32, method="site_ig")
    cond = A.attribution_patching(m, corrupt, clean, ps[1:], correct, cands, [(0, 8)] * 3, steps=64,
                                  method="conductance", batch_size=256)
    for p, df in ((ps[0], ig), (ps[1], cond)):
        want = _effects(ex[ex.site == p.site])
        got = torch.tensor(df.sort_values("item").attribution.to_numpy(), dtype=torch.float32)
        assert (got - want).abs().max() < 0.02 * gap, (p, got, want)


def test_position_patch_equals_a_hand_run_single_patch(llava):
    m, clean, corrupt, correct, cands = llava
    sites = ["lm.blocks.0", "vision.blocks.0", "projector"]
    pos = {"lm.blocks.0": [2, 7], "vision.blocks.0": [0, 5], "projector": [3]}
    df = A.run_position_patches(m, corrupt, clean, sites, correct, cands, positions=pos, batch_size=4)
    assert len(df) == 3 * 5
    src = trace(m, clean, cache=sites).cache
    for site, ps in pos.items():
        for p in ps:
            def edit(x, s=src[site], p=p):
                x = x.clone()
                x[:, p] = s[:, p]
                return x
            lg = trace(m, corrupt, edits={site: edit}).logits[:, -1]
            want = patching.logit_diff(lg, correct, cands)
            got = torch.tensor(df[(df.site == site) & (df.position == p)].sort_values("item").metric.to_numpy(),
                               dtype=torch.float32)
            assert torch.allclose(got, want, atol=1e-4), (site, p, got, want)


@pytest.fixture(scope="module")
def organism_pairs(organism, small_probe):
    from analyses.causal import placement_pairs
    return placement_pairs(organism, small_probe, clean_cell=8, corrupt_cell=0, n_items=4)


def test_position_patches_agree_with_run_patches(organism, organism_pairs):
    m, pr = organism, organism_pairs
    imap = m.image_map(pr.corrupt)
    cells = imap.cells(3, 3)[0]
    L = pr.corrupt["input_ids"].shape[1]
    sites = ["lm.input", "lm.blocks.0", "lm.blocks.1"]
    df = A.run_position_patches(m, pr.corrupt, pr.clean, sites, pr.correct, pr.candidates, batch_size=32)
    assert A.site_positions(m, pr.corrupt, sites) == {s: L for s in sites}
    for cell in (0, 4, 8):
        pos = int((cells == cell).nonzero().flatten()[0])
        assert int((cells == cell).sum()) == 1
        ref = patching.run_patches(m, pr.corrupt, pr.clean, [patching.Patch(s, "target") for s in sites],
                                   pr.correct, pr.candidates, [(cell,)] * 4)
        for s in sites:
            want = ref[ref.site == s].sort_values("item").metric.to_numpy()
            got = df[(df.site == s) & (df.position == pos)].sort_values("item").metric.to_numpy()
            assert abs(got - want).max() < 1e-4, (s, cell)
    ref = patching.run_patches(m, pr.corrupt, pr.clean, [patching.Patch(s, "last") for s in sites],
                               pr.correct, pr.candidates, pr.targets)
    for s in sites:
        want = ref[ref.site == s].sort_values("item").metric.to_numpy()
        got = df[(df.site == s) & (df.position == L - 1)].sort_values("item").metric.to_numpy()
        assert abs(got - want).max() < 1e-4
    r = A.position_restoration(df)
    assert abs(r[r.site == "lm.blocks.1"].set_index("position").restoration[L - 1] - 1.0) < 1e-6


def test_position_scores_sum_to_group_attributions_and_sites_are_listed(organism, organism_pairs):
    m, pr = organism, organism_pairs
    sites = A.position_sites(m)
    assert sites == ["vision.blocks.0", "vision.blocks.1", "projector", "lm.input", "lm.blocks.0.attn",
                     "lm.blocks.0.mlp", "lm.blocks.0", "lm.blocks.1.attn", "lm.blocks.1.mlp", "lm.blocks.1"]
    T = A.site_positions(m, pr.corrupt, sites)
    assert T["vision.blocks.0"] == 10 and T["projector"] == 9  # CLS + 9 patches; 9 image tokens
    pa = A.position_attribution(m, pr.corrupt, pr.clean, sites, pr.correct, pr.candidates)
    assert len(pa) == 4 * sum(T.values())
    gp = A.attribution_patching(m, pr.corrupt, pr.clean, patching.default_patches(m), pr.correct, pr.candidates,
                                pr.targets)
    for site, group in (("projector", "all"), ("lm.blocks.0", "text"), ("lm.input", "image")):
        want = gp[(gp.site == site) & (gp.group == group)].sort_values("item").attribution.to_numpy()
        masks = patching.group_masks(m, pr.corrupt, pr.targets)
        sel = pa[pa.site == site]
        got = []
        for i in range(4):
            s = sel[sel.item == i].sort_values("position")
            if site != "projector":
                s = s[masks[group][i].numpy()]
            got.append(s.attribution.sum())
        assert abs(torch.tensor(got).numpy() - want).max() < 1e-5, (site, group)
    with pytest.raises(SpatialBiasError, match="unknown attribution method"):
        A.position_scores(m, pr.corrupt, pr.clean, ["lm.input"], pr.correct, pr.candidates, method="nope")


def test_atp_with_steps_keeps_the_earlier_pixel_mean_gradient(llava):
    """``method="atp", steps=k``: Δa times the gradient averaged over pixel mixes at (j + ½)/k."""
    m, clean, corrupt, correct, cands = llava
    site, k = "lm.blocks.1", 2
    scores, _, _ = A.position_scores(m, corrupt, clean, [site], correct, cands, steps=k, method="atp")
    a_b = trace(m, corrupt, cache=[site]).cache[site]
    a_s = trace(m, clean, cache=[site]).cache[site]
    g = 0
    for j in range(k):
        a = (j + 0.5) / k
        x = dict(corrupt, pixel_values=corrupt["pixel_values"] + a * (clean["pixel_values"] - corrupt["pixel_values"]))
        keep = {}
        h = m.adapter.module(m.model, site).register_forward_hook(
            lambda _m, _a, o: keep.setdefault("a", o[0] if isinstance(o, tuple) else o))
        try:
            lg = m.model(**x, use_cache=False).logits[:, -1]
        finally:
            h.remove()
        g = g + torch.autograd.grad(patching.logit_diff(lg, correct, cands).sum(), keep["a"])[0] / k
    assert torch.allclose(scores[site], ((a_s - a_b) * g).sum(-1), atol=1e-5)


def test_attribution_error_is_read_over_the_patches_that_are_not_0_or_1_by_construction():
    """Hand-made tables, 3 items × 4 patches: ``whole`` (patched = source on every item: 1 by
    construction) and ``none`` (patched = base: 0) are left out; the error is the mean of
    |estimate − exact| over ``half`` and ``most`` computed by hand, and a bug that kept the trivial
    patches (errors 0.3 and 0.2 here) or took signed errors would change it."""
    import numpy as np
    import pandas as pd
    from analyses.kinds.attribution import error_rows
    base, src = np.array([0.0, 1.0, 2.0]), np.array([2.0, 3.0, 4.0])  # gap 2 on every item
    patched = {"whole": src, "none": base, "half": base + 1.0, "most": base + 1.6}
    estimate = {"whole": src - base - 0.6, "none": base * 0 + 0.4, "half": (src - base) * 0.8, "most": (src - base) * 0.5}
    exact = pd.DataFrame([{"item": i, "site": s, "group": "all", "metric": patched[s][i], "base_metric": base[i],
                           "source_metric": src[i], "direction": "denoise"} for s in patched for i in range(3)])
    est = pd.DataFrame([{"item": i, "site": s, "group": "all", "attribution": estimate[s][i], "base_metric": base[i],
                         "source_metric": src[i]} for s in patched for i in range(3)])
    rows = {r["metric"]: r for r in error_rows(exact, {"atp": est}, np.random.default_rng(0), 200)
            if r["metric"] != "attribution_estimate"}
    want = (abs(0.8 - 0.5) + abs(0.5 - 0.8)) / 2  # half: exact 0.5, estimate 0.8; most: exact 0.8, estimate 0.5
    assert rows["attribution_error"]["value"] == pytest.approx(want)
    assert rows["attribution_error_max"]["value"] == pytest.approx(0.3)
    assert rows["attribution_patches"]["value"] == 2
    assert rows["attribution_error"]["ci_low"] == pytest.approx(want) == rows["attribution_error"]["ci_high"]  # no item noise
