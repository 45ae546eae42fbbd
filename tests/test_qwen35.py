"""Qwen3.5 (Qwen3_5ForConditionalGeneration): a hybrid LM of Gated DeltaNet (linear attention) and
full-attention layers; the tiny model's layers are DeltaNet, full attention, DeltaNet.

What is decided (docs/architectures.md, "Qwen3.5") and checked here, each with a test that fails
when the decision is not what the code does:
* sites per layer kind: ``.attn`` / ``.attn.heads`` / ``.attn.pattern`` on full-attention layers
  only, ``.mixer`` (the DeltaNet output) on the others; the wrong one is one error line;
* position ids reach the full-attention layers only (BaPA leaves block 0 as it was; the rotary pair
  a DeltaNet layer is called with is unused); PositionSwap and Knockout act on the attention layers
  of their window and refuse a window of DeltaNet layers only;
* Knockout cuts attention routes only: the DeltaNet layers still carry the image to the question;
* flow and head attribution are NaN on DeltaNet layers; resuming keeps no keys for them;
* AGCI by hand, as on Qwen3-VL (the merger output at the image positions).
"""
import pytest
import torch
import torch.nn.functional as F

import interp
from helpers import mirrored_pair
from interp import attention, tiny
from interp.adapters import for_class, for_config
from interp.heads import head_attribution
from interp.interventions import AGCI, BaPA, Knockout, PositionSwap
from interp.resume import capture_lm
from interp.tracing import trace
from spatialbias.errors import SpatialBiasError

DELTANET, ATTENTION = (0, 2), 1


@pytest.fixture(scope="module")
def setup():
    m = interp.load(*tiny.build_qwen35())
    qs = [m.prompt("what is this ?"), m.prompt("what is this a picture of ?")]  # left padding in row 0
    clean, corrupt, correct, cands = mirrored_pair(m, 2, questions=qs)
    return m, clean, corrupt, correct, cands


def _logits(m, inputs, ivs=()):
    with torch.no_grad():
        return m.run(inputs, list(ivs))[:, -1].float()


def test_adapter_and_layer_kinds(setup):
    m, *_ = setup
    a = m.adapter
    assert a is for_class("Qwen3_5ForConditionalGeneration") and a is for_config({"model_type": "qwen3_5"})
    assert a.name == "qwen35" and a.injections(m.model) == {}  # no DeepStack
    assert a.attention_layers(m.model) == [ATTENTION]
    assert [a.layer_kind(m.model, i) for i in range(3)] == ["linear_attention", "full_attention", "linear_attention"]
    assert [a.mixer_site(m.model, i) for i in range(3)] == ["lm.blocks.0.mixer", "lm.blocks.1.attn", "lm.blocks.2.mixer"]
    sites = a.concrete_sites(m.model)
    assert [s for s in sites if s.endswith(".attn")] == ["lm.blocks.1.attn"]
    assert [s for s in sites if s.endswith(".mixer")] == ["lm.blocks.0.mixer", "lm.blocks.2.mixer"]
    assert a.path("lm.blocks.2.mixer", m.model) == "model.language_model.layers.2.linear_attn"
    assert a.path("lm.blocks.1.attn", m.model) == "model.language_model.layers.1.self_attn"


@pytest.mark.parametrize("site", ["lm.blocks.0.attn", "lm.blocks.2.attn.heads", "lm.blocks.-1.attn.pattern",
                                  "lm.blocks.1.mixer"])
def test_a_site_of_the_other_layer_kind_is_one_error_line(setup, site):
    m, clean, *_ = setup
    with pytest.raises(SpatialBiasError) as e:
        trace(m, clean, cache=[site])
    msg = str(e.value)
    assert "\n" not in msg and ("linear_attention" in msg or "full_attention" in msg) and "exists on layers" in msg


def test_mixer_site_is_the_deltanet_output(setup):
    """Block 0 is ``x + mixer(norm x)`` then ``+ mlp(norm ·)``: the three sites add up to its output."""
    m, clean, *_ = setup
    c = trace(m, clean, cache=["lm.blocks.0#input", "lm.blocks.0.mixer", "lm.blocks.0.mlp", "lm.blocks.0"]).cache
    assert torch.allclose(c["lm.blocks.0#input"] + c["lm.blocks.0.mixer"] + c["lm.blocks.0.mlp"], c["lm.blocks.0"],
                          atol=1e-5)
    assert c["lm.blocks.0.mixer"].abs().max() > 1e-3


def test_bapa_reaches_the_attention_layers_only(setup):
    """Under BaPA the DeltaNet block before the first attention layer computes exactly what it did
    (it reads no position); the attention layer and everything after it change."""
    m, clean, *_ = setup
    sites = ["lm.input", "lm.blocks.0", "lm.blocks.1", "lm.blocks.2"]
    base = trace(m, clean, cache=sites).cache
    bapa = trace(m, clean, interventions=[BaPA()], cache=sites).cache
    for s in ("lm.input", "lm.blocks.0"):
        assert torch.allclose(base[s], bapa[s], atol=1e-6), s
    for s in ("lm.blocks.1", "lm.blocks.2"):
        assert (base[s] - bapa[s]).abs().max() > 1e-4, s


def test_the_rotary_pair_of_a_deltanet_layer_is_unused(setup):
    m, clean, *_ = setup

    def garbage(pair):
        return tuple(torch.randn_like(t) for t in pair)
    base = _logits(m, clean)
    with torch.no_grad():
        t0 = trace(m, clean, edits={"lm.blocks.0#position_embeddings": garbage}).logits[:, -1].float()
        t1 = trace(m, clean, edits={"lm.blocks.1#position_embeddings": garbage}).logits[:, -1].float()
    assert torch.allclose(t0, base, atol=1e-6)
    assert (t1 - base).abs().max() > 1e-4


def test_position_swap_acts_on_the_attention_layers_of_its_window(setup):
    m, clean, *_ = setup
    base = _logits(m, clean)
    every = _logits(m, clean, [PositionSwap(a=0, b=8)])  # ids swapped for the whole forward
    window = _logits(m, clean, [PositionSwap(a=0, b=8, layers=(0, 3))])  # rotary swapped in the window
    one = _logits(m, clean, [PositionSwap(a=0, b=8, layers=(1, 2))])
    assert (every - base).abs().max() > 1e-4
    assert torch.allclose(window, every, atol=1e-5) and torch.allclose(one, every, atol=1e-5)
    with pytest.raises(SpatialBiasError, match=r"linear_attention.*no attention mask and read no position ids") as e:
        _logits(m, clean, [PositionSwap(a=0, b=8, layers=(2, 3))])
    assert "\n" not in str(e.value)


def test_knockout_acts_on_the_attention_layers_and_refuses_deltanet_windows(setup):
    m, clean, *_ = setup
    base = _logits(m, clean)
    every = _logits(m, clean, [Knockout(cells=None, query="text")])
    one = _logits(m, clean, [Knockout(cells=None, query="text", layers=(1, 2))])
    assert (every - base).abs().max() > 1e-4 and torch.allclose(every, one, atol=1e-6)
    ko = trace(m, clean, interventions=[Knockout(cells=None, query="text")], cache=["lm.blocks.0"]).cache["lm.blocks.0"]
    assert torch.allclose(ko, trace(m, clean, cache=["lm.blocks.0"]).cache["lm.blocks.0"], atol=1e-6)
    for w in ((0, 1), (2, 3), (-1, None)):
        with pytest.raises(SpatialBiasError, match="linear_attention") as e:
            _logits(m, clean, [Knockout(cells=None, query="text", layers=w)])
        assert "\n" not in str(e.value)


def test_knockout_of_every_image_token_still_lets_deltanet_carry_the_image(setup):
    """On an all-attention LM, text queries blocked from every image token in every layer give
    last-token logits independent of the image; here the DeltaNet state still carries it."""
    m, clean, corrupt, *_ = setup
    ko = [Knockout(cells=None, query="text")]
    assert (_logits(m, clean, ko) - _logits(m, corrupt, ko)).abs().max() > 1e-4
    llava = interp.load(*tiny.build_llava())
    a, b, *_ = mirrored_pair(llava, 2)
    assert torch.allclose(_logits(llava, a, ko), _logits(llava, b, ko), atol=1e-5)  # the contrast


def test_flow_heads_and_kv_exist_on_attention_layers_only(setup):
    m, clean, corrupt, correct, cands = setup
    f = attention.cell_flow(m, clean)  # (B, layers, heads, cells)
    assert f.shape[1] == 3
    assert f[:, list(DELTANET)].isnan().all() and f[:, ATTENTION].isfinite().all()
    assert ((f[:, ATTENTION].sum(-1) > 0) & (f[:, ATTENTION].sum(-1) <= 1 + 1e-5)).all()
    scores, mb, ms = head_attribution(m, corrupt, clean, correct, cands)
    assert scores.shape == (2, 3, 4)
    assert torch.tensor(scores[:, list(DELTANET)]).isnan().all() and torch.tensor(scores[:, ATTENTION]).isfinite().all()
    _, st = capture_lm(m, clean)
    assert [x is None for x in st.kv] == [True, False, True]


def test_agci_by_hand(setup):
    """``v' = v + λ (1 − cos(v, g)) g`` per image on the merger output at the image positions, by
    hand from a cached ``lm.input``; equal to the same edit of the merger output (projector)."""
    m, clean, *_ = setup
    lam = 0.7
    x = trace(m, clean, cache=["lm.input"]).cache["lm.input"]
    img = m.image_map(clean).is_image
    want = x.clone()
    for b in range(x.shape[0]):
        v = x[b, img[b]].double()
        g = v.mean(0)
        cos = (v @ g) / (v.norm(dim=-1) * g.norm())
        want[b, img[b]] = (v + lam * (1 - cos)[:, None] * g).to(x.dtype)
    got = trace(m, clean, interventions=[AGCI(lam=lam)], cache=["lm.input"])
    assert torch.allclose(got.cache["lm.input"], want, atol=1e-5)
    assert (got.cache["lm.input"] - x).abs().max() > 1e-3

    per = (clean["image_grid_thw"].prod(-1) // 4).tolist()

    def merger(y):  # (T/4, D): the images' merged tokens, flattened
        out = []
        for v in y.split(per, 0):
            g = v.mean(0)
            out.append(v + lam * (1 - F.cosine_similarity(v, g[None], dim=-1))[:, None] * g)
        return torch.cat(out, 0)
    by_projector = trace(m, clean, edits={"projector": merger}).logits[:, -1]
    assert torch.allclose(got.logits[:, -1], by_projector, atol=1e-5)


def test_analyses_use_the_attention_layers_only(setup):
    """The knockout and position-id analyses' one-layer windows, and the heads analysis' ranked
    heads and share rows, are the attention layers'; nothing is refused on the DeltaNet layers."""
    import numpy as np

    from analyses import causal
    from analyses.kinds import heads
    m, clean, corrupt, correct, cands = setup
    pairs = causal.Pairs(clean, corrupt, correct, tuple(cands), [(0, 8)] * 2, ["a", "b"], clean_cell=0,
                         corrupt_cell=8)
    ko = causal.knockout_items(m, pairs, [])
    assert set(ko.layers) == {str(ATTENTION), "all"}
    pos = causal.position_items(m, pairs, [])
    assert set(pos.layers) == {str(ATTENTION), "all"}
    scores, mb, ms, tops, rank, confirm, exact = heads.measure(m, pairs, [], top=10, split=False, fwd=4, att=4)
    assert len(tops) == 4 and {layer for layer, _ in tops} == {ATTENTION}  # 4 heads exist, not 10
    rows = heads.rows_of(scores, mb, ms, tops, confirm, exact, np.random.default_rng(0))
    assert {r["layer"] for r in rows if r["metric"] == "head_share_estimate"} == {ATTENTION}
