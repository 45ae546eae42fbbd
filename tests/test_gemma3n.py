"""Gemma3n (Gemma3nForConditionalGeneration) is refused, and why: the evidence in HF's code (the
one-line refusal of a config-only folder is tested in ``tests/test_load.py``).

A tiny Gemma3n is built here with a stand-in vision tower (HF builds the real one, timm's
MobileNetV5, through ``AutoModel.from_config``, which needs timm and so torchvision). The
stand-in keeps the real tower's interface as ``Gemma3nModel.get_image_features`` reads it:
``pixel_values`` (n, 3, H, W) → ``last_hidden_state`` (n, Dv, h, w) with h·w =
``vision_soft_tokens_per_image``. On it these tests pin the facts the refusal rests on, so that a
transformers release that changes them fails here and the refusal is re-examined:

* block 0 of the LM reads (4, B, T, D) — AltUp's four streams — where ``lm.input`` (the input of
  ``lm.blocks.0``) is (B, T, D) on every supported architecture;
* an edit of that input (what AGCI and patching at ``lm.input`` do) does not reach any block's
  per-layer input, which ``Gemma3nTextModel.forward`` projects from ``inputs_embeds`` before
  block 0; an edit of the text model's ``inputs_embeds`` does.
"""
import importlib.util

import pytest
import torch

import interp
from interp import adapters
from spatialbias.errors import SpatialBiasError

CLASS = "Gemma3nForConditionalGeneration"
SOFT = 4
"""Soft tokens per image of the tiny model (a 2×2 grid of the stand-in tower's 8 px patches)."""
IMAGE, BOI, EOI = 257, 256, 258


class StandInTower(torch.nn.Module):
    """MobileNetV5's interface as ``get_image_features`` uses it: (n, 3, 16, 16) pixels →
    ``last_hidden_state`` (n, Dv, 2, 2), one 8 px patch per soft token."""

    def __init__(self, config):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, config.hidden_size, 8, 8)

    def forward(self, pixel_values, do_pooling=False, return_dict=True, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPooling
        return BaseModelOutputWithPooling(last_hidden_state=self.conv(pixel_values))


def tiny_config():
    """A 4-layer Gemma3n: D = 32, per-layer inputs of width 8, 4 AltUp streams, the last 2 layers
    reusing the keys and values of the first 2; vision tokens at ids 256–263 (its own table)."""
    from transformers import Gemma3nAudioConfig, Gemma3nConfig, Gemma3nTextConfig, Gemma3nVisionConfig
    tc = Gemma3nTextConfig(vocab_size=300, vocab_size_per_layer_input=256, hidden_size=32,
                           hidden_size_per_layer_input=8, intermediate_size=64, num_hidden_layers=4,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_kv_shared_layers=2,
                           sliding_window=8, layer_types=["sliding_attention", "full_attention"] * 2,
                           activation_sparsity_pattern=[0.0] * 4, laurel_rank=4, altup_num_inputs=4,
                           max_position_embeddings=128)
    vc = Gemma3nVisionConfig(hidden_size=24, vocab_size=8, vocab_offset=256)
    ac = Gemma3nAudioConfig(vocab_size=8, vocab_offset=264, hidden_size=16, conf_num_hidden_layers=1,
                            conf_num_attention_heads=2, sscp_conv_channel_size=[4, 4], input_feat_size=16)
    return Gemma3nConfig(text_config=tc, vision_config=vc, audio_config=ac, vision_soft_tokens_per_image=SOFT,
                         image_token_id=IMAGE, boi_token_id=BOI, eoi_token_id=EOI, audio_token_id=265,
                         boa_token_id=264, eoa_token_id=266)


def build_tiny():
    """The tiny Gemma3n (eval mode) with :class:`StandInTower` in place of MobileNetV5."""
    from transformers.models.gemma3n import modeling_gemma3n as hf
    torch.manual_seed(0)
    real = hf.AutoModel.from_config
    hf.AutoModel.from_config = lambda c, **kw: StandInTower(c) if c.model_type == "gemma3n_vision" else real(c, **kw)
    try:
        return hf.Gemma3nForConditionalGeneration(tiny_config()).eval()
    finally:
        hf.AutoModel.from_config = real


def inputs():
    """One prompt of 10 tokens with the image's 4 soft tokens at positions 3–6, and one image."""
    ids = torch.tensor([[2, 5, BOI, IMAGE, IMAGE, IMAGE, IMAGE, EOI, 7, 9]])
    return {"input_ids": ids, "pixel_values": torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))}


def per_layer_inputs(model, x, pre_hook=None, on=None):
    """Every block's per_layer_input (B, T, 8), with ``pre_hook`` (a kwargs pre-hook) on module ``on``."""
    seen, handles = [], []
    for block in model.model.language_model.layers:
        handles.append(block.register_forward_pre_hook(
            lambda m, a, k: seen.append((a[2] if len(a) > 2 else k["per_layer_input"]).clone()), with_kwargs=True))
    if pre_hook is not None:
        handles.append(on.register_forward_pre_hook(pre_hook, with_kwargs=True))
    try:
        with torch.no_grad():
            logits = model(**x).logits
    finally:
        for h in handles:
            h.remove()
    return seen, logits


def test_memory_estimate_of_its_config_is_refused_too():
    """The memory model does not make up facts for a class that cannot load (default profile)."""
    with pytest.raises(SpatialBiasError, match="timm"):
        adapters.memory_profile({"architectures": [CLASS], "model_type": "gemma3n"})
    assert adapters.for_config({"architectures": ["SomethingElse"]}) is None


@pytest.mark.skipif(importlib.util.find_spec("timm") is not None, reason="timm is installed here")
def test_hf_cannot_build_it_without_timm():
    """The first blocker: transformers refuses to build the class at all without timm."""
    from transformers.models.gemma3n import modeling_gemma3n as hf
    with pytest.raises(ImportError, match="timm"):
        hf.Gemma3nForConditionalGeneration(tiny_config())


def test_an_in_memory_model_is_refused_with_the_same_line():
    """Built with the stand-in tower (so timm is no longer in the way), it is still refused: the
    engine reason holds whatever the tower."""
    model = build_tiny()
    with pytest.raises(SpatialBiasError) as e:
        interp.load(model, processor=object())
    assert str(e.value) == f"unsupported model class {CLASS}: {adapters.REFUSED[CLASS]}"


def test_stand_in_tower_runs_hf_forward():
    """The stand-in gives get_image_features what MobileNetV5 gives: (n, Dv, h, w) with h·w soft
    tokens, scattered into the 4 image-token positions (other pixels, other logits there on)."""
    model, x = build_tiny(), inputs()
    with torch.no_grad():
        feats = model.model.get_image_features(x["pixel_values"]).pooler_output
        a = model(**x).logits
        b = model(**{**x, "pixel_values": x["pixel_values"] + 1}).logits
    assert feats.shape == (1, SOFT, 32)
    assert torch.equal(a[:, :3], b[:, :3]) and not torch.allclose(a[:, 3:], b[:, 3:])


def test_block_input_is_four_streams():
    """What ``lm.input`` would name (the input of ``lm.blocks.0``) is (4, B, T, D), not (B, T, D)."""
    model, shapes = build_tiny(), []
    h = model.model.language_model.layers[0].register_forward_pre_hook(
        lambda m, a, k: shapes.append(tuple((a[0] if a else k["hidden_states"]).shape)), with_kwargs=True)
    with torch.no_grad():
        model(**inputs())
    h.remove()
    assert shapes == [(4, 1, 10, 32)]


def test_block0_input_edit_misses_the_per_layer_inputs():
    """Adding to the image tokens of every stream at block 0's input changes the logits but no
    block's per-layer input; the same addition to the text model's ``inputs_embeds`` changes them
    all. So an ``lm.input`` edit at the first block would be incomplete, as on Gemma4 E2B/E4B."""
    model, x = build_tiny(), inputs()
    base, logits = per_layer_inputs(model, x)

    def at_block0(m, a, k):
        hs = (a[0] if a else k["hidden_states"]).clone()
        hs[:, :, 3:7] += 1.0
        return ((hs, *a[1:]), k) if a else (a, {**k, "hidden_states": hs})

    def at_embeds(m, a, k):
        e = k["inputs_embeds"].clone()
        e[:, 3:7] += 1.0
        return a, {**k, "inputs_embeds": e}

    lm = model.model.language_model
    blk, blk_logits = per_layer_inputs(model, x, at_block0, lm.layers[0])
    emb, _ = per_layer_inputs(model, x, at_embeds, lm)
    assert len(base) == len(blk) == len(emb) == 4
    assert not torch.allclose(blk_logits, logits)
    assert all(torch.equal(p, q) for p, q in zip(base, blk))
    assert all(not torch.allclose(p[:, 3:7], q[:, 3:7]) for p, q in zip(base, emb))
    assert all(torch.equal(p[:, :3], q[:, :3]) for p, q in zip(base, emb))


def test_shared_kv_layers_have_no_key_value_projections():
    """The K/V-sharing layers (the last ``num_kv_shared_layers``) read the keys and values of an
    earlier layer through a per-forward dict: they have no k_proj/v_proj to hook, and a resumed
    block among them would need that dict."""
    attn = [b.self_attn for b in build_tiny().model.language_model.layers]
    assert [a.is_kv_shared_layer for a in attn] == [False, False, True, True]
    assert not hasattr(attn[2], "k_proj") and hasattr(attn[0], "k_proj")


def test_its_image_processor_needs_no_torchvision():
    """The image side is not what blocks it: HF maps ``gemma3n`` to a PIL image processor, which
    resizes any image to the fixed size ((1, 3, 16, 16) here from a 40×30 image)."""
    from PIL import Image
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES
    from transformers import SiglipImageProcessorPil
    assert IMAGE_PROCESSOR_MAPPING_NAMES["gemma3n"]["pil"] == "SiglipImageProcessorPil"
    px = SiglipImageProcessorPil(size={"height": 16, "width": 16})(Image.new("RGB", (40, 30)), return_tensors="pt")
    assert tuple(px["pixel_values"].shape) == (1, 3, 16, 16)
