"""nnsight tracing on all five architectures: caches against HF's own tensors, writes against
the hook-based runner, two placements in one batch."""
import pytest
import torch

import interp
from interp import tiny
from spatialbias.errors import SpatialBiasError
from interp.sites import every_site
from interp.tracing import patch_rows, trace


@pytest.fixture(scope="module", params=list(tiny.BUILDERS))
def arch(request):
    model, proc = tiny.BUILDERS[request.param]()
    m = interp.load(model, proc)
    img = tiny.image(seed=3)
    # two placements of one item: same prompt, the image flipped (content moved across cells)
    inputs = m.inputs([img, img.transpose(0)], [m.prompt("what is this ?")] * 2)
    return request.param, m, inputs


def test_trace_caches_every_site_and_matches_hf(arch):
    name, m, inputs = arch
    sites = [s for s in every_site(m.adapter, m.model) if not s.endswith(".pattern")]  # patterns: eager kernel
    t = trace(m, inputs, cache=sites, to_cpu=True)
    with torch.no_grad():
        ref = m.model(**inputs, output_hidden_states=True)
    assert torch.equal(t.logits, ref.logits)
    assert set(t.cache) == set(sites)
    n, S = m.adapter.layer_count(m.model, "lm"), m.adapter.streams(m.model)
    view = m.adapter.merge_streams if S > 1 else (lambda h: h)  # Gemma3n's (S, B, L, D) block states
    for i in range(n - 1):  # HF's last hidden state has the final norm applied
        assert torch.equal(t.cache[f"lm.blocks.{i}"], view(ref.hidden_states[i + 1]))
    # HF records block 0's input; with S streams lm.input (the text model's input) is its stream 0
    assert torch.equal(t.cache["lm.input"], ref.hidden_states[0][0] if S > 1 else ref.hidden_states[0])
    assert all(v.device.type == "cpu" for v in t.cache.values() if isinstance(v, torch.Tensor))


def test_attention_pattern_sites_are_hf_eager_attentions(arch):
    _, m, inputs = arch
    att = m.adapter.attention_layers(m.model)  # every layer, or a hybrid LM's attention layers (HF's attentions)
    t = trace(m, inputs, cache=[f"lm.blocks.{i}.attn.pattern" for i in att])
    from interp.attention import eager_attention
    with torch.no_grad(), eager_attention(m.model):
        ref = m.model(**inputs, output_attentions=True)
    assert torch.equal(t.logits, ref.logits)
    assert len(ref.attentions) == len(att)
    for k, i in enumerate(att):
        assert torch.equal(t.cache[f"lm.blocks.{i}.attn.pattern"], ref.attentions[k])
    assert m.model.config.text_config._attn_implementation == "sdpa"  # switched back


def test_image_positions_only(arch):
    _, m, inputs = arch
    t = trace(m, inputs, cache=["lm.blocks.0", "projector", "lm.input"], positions="image")
    n_patch = int(m.image_map(inputs).is_patch.sum())  # image tokens that cover a patch (no newlines)
    D = m.model.config.text_config.hidden_size
    for site in ("lm.blocks.0", "projector", "lm.input"):
        width = D * (m.adapter.streams(m.model) if site == "lm.blocks.0" else 1)
        assert tuple(t.cache[site].shape) == (n_patch, width), site
    full = trace(m, inputs, cache=["lm.blocks.0"]).cache["lm.blocks.0"]
    raster = m.image_map(inputs).raster_order()  # sequence order, except InternVL's tiles (held tile by tile)
    assert torch.equal(t.cache["lm.blocks.0"], full.reshape(-1, full.shape[-1])[raster])
    assert torch.equal(t.cache["projector"], t.cache["lm.input"])  # token for token, every architecture


def test_writes_and_interventions_match_the_runner(arch):
    _, m, inputs = arch
    vision = "vision.blocks.0" if m.adapter.layer_count(m.model, "vision") else "vision.out"  # Gemma3n: timm's tower
    bump = {"lm.blocks.0": lambda x: x + torch.linspace(0, 1, x.shape[-1]),
            vision: lambda x: x * 1.1 + torch.linspace(0, 1, x.shape[-1])}
    t = trace(m, inputs, edits=bump, interventions=[interp.BaPA(), interp.AGCI(lam=0.5)])

    class Bump(interp.Intervention):
        kind = "bump"

        def edits(self, lvlm, inputs):
            return bump

    with torch.no_grad():
        want = m.run(inputs, [interp.BaPA(), interp.AGCI(lam=0.5), Bump()])
        base = m.run(inputs)
    assert torch.allclose(t.logits, want, atol=1e-6)
    assert (t.logits - base).abs().max() > 1e-4


def test_two_placements_in_one_batch(arch):
    _, m, inputs = arch
    both = trace(m, inputs, cache=["lm.blocks.1", "projector"])
    one = trace(m, {k: v[1:] if v.shape[0] == 2 else v for k, v in inputs.items()
                    if k not in ("pixel_values", "image_grid_thw", "image_sizes")} | _second_image(m, inputs),
                cache=["lm.blocks.1"])
    assert torch.allclose(both.cache["lm.blocks.1"][1], one.cache["lm.blocks.1"][0], atol=1e-5)
    # patching row 0's whole residual after the last block into row 1 makes row 1 answer as row 0
    last = f"lm.blocks.{m.adapter.layer_count(m.model, 'lm') - 1}"
    p = trace(m, inputs, edits=patch_rows(last, 0, 1))
    assert torch.equal(p.logits[1], p.logits[0])
    assert not torch.equal(both.logits[1], both.logits[0])


def _second_image(m, inputs):
    """The image inputs of row 1 alone, re-made by the processor."""
    img = tiny.image(seed=3).transpose(0)
    enc = m.inputs([img], [m.prompt("what is this ?")])
    return {k: v for k, v in enc.items() if k in ("pixel_values", "image_grid_thw", "image_sizes")}


def test_unknown_site_is_one_clear_error(arch):
    _, m, inputs = arch
    with pytest.raises(SpatialBiasError, match="unknown site"):
        trace(m, inputs, cache=["lm.blocks.99"])


def test_keyword_sites_knockout_and_layer_window_ids_match_the_runner(arch):
    from interp.interventions import Knockout
    from interp.interventions import PositionSwap
    _, m, inputs = arch
    a = m.adapter.attention_layers(m.model)[0]  # 0, or a hybrid LM's first attention layer
    for ivs in ([Knockout(cells=(0, 4), layers=(a, a + 1), query="text")], [PositionSwap(a=0, b=8, layers=(1, 2))]):
        t = trace(m, inputs, interventions=ivs, cache=["lm.blocks.0#attention_mask"])
        with torch.no_grad():
            want, base = m.run(inputs, ivs), m.run(inputs)
        assert torch.allclose(t.logits, want, atol=1e-6)
        assert (want - base).abs().max() > 1e-6
        assert "lm.blocks.0#attention_mask" in t.cache
