"""The tiny Gemma3n (:func:`interp.tiny.build_gemma3n`), built from configs with random weights, no
downloads, and a stand-in for its vision tower.

HF builds Gemma3n's tower, timm's MobileNetV5, through ``AutoModel.from_config``, and timm needs
torchvision, which this install leaves out. :class:`StandInTower` keeps that tower's interface as
``Gemma3nModel.get_image_features`` reads it — ``pixel_values`` (n, 3, H, W) → ``last_hidden_state``
(n, Dv, H/8, W/8), one soft token per 8 px patch in raster order — so everything after the tower
(the soft-token embedder, the AltUp LM, per-layer inputs, shared keys and values) is HF's own.
"""
from __future__ import annotations

import contextlib

import torch

from interp.tiny.text import SPECIALS, WORDS, word_tokenizer

GEMMA3N_CHAT = ("{%- for m in messages -%}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }} "
                "{% for c in m['content'] -%}"
                "{%- if c['type'] == 'image' -%}<image_soft_token> {% elif c['type'] == 'text' -%}{{ c['text'] }} "
                "{%- endif -%}{%- endfor -%}<end_of_turn> {%- endfor -%}"
                "{%- if add_generation_prompt -%} <start_of_turn>model{%- endif -%}")
"""Gemma3n's turn shape for the word-level tokenizer (``<image_soft_token>`` marks each image; the
processor expands it to ``<start_of_image>`` + the soft tokens + ``<end_of_image>``)."""
VISION = ("<image_soft_token>", *(f"<vision_{i}>" for i in range(1, 8)))
AUDIO = ("<audio_soft_token>", "<end_of_audio>", *(f"<audio_{i}>" for i in range(2, 8)))
TEXT = tuple(t for t in (*SPECIALS, *WORDS, "<start_of_audio>", "<start_of_turn>", "<end_of_turn>", "model")
             if t not in VISION)
SIDE = 48
"""Probe side in pixels: 6×6 soft tokens of 8 px."""


class StandInTower(torch.nn.Module):
    """MobileNetV5's interface as ``get_image_features`` uses it: (n, 3, H, W) pixels →
    ``last_hidden_state`` (n, Dv, H/8, W/8): one 8 px patch per soft token (a strided
    convolution, then a pointwise mix so each token is not a single linear map of its pixels)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.patch = torch.nn.Conv2d(3, config.hidden_size, 8, 8)
        self.mix = torch.nn.Conv2d(config.hidden_size, config.hidden_size, 1)

    def forward(self, pixel_values, do_pooling=False, return_dict=True, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPooling
        x = self.patch(pixel_values.to(self.patch.weight.dtype))
        return BaseModelOutputWithPooling(last_hidden_state=x + self.mix(torch.nn.functional.gelu(x)))


@contextlib.contextmanager
def stand_in_tower():
    """Within it, HF builds :class:`StandInTower` where it would build timm's MobileNetV5 (a
    Gemma3n built from a config or loaded from a folder); HF's own builder again after it."""
    from transformers.models.gemma3n import modeling_gemma3n as hf
    real = hf.AutoModel.from_config
    hf.AutoModel.from_config = lambda conf, **kw: (StandInTower(conf) if conf.model_type == "gemma3n_vision"
                                                   else real(conf, **kw))
    try:
        yield
    finally:
        hf.AutoModel.from_config = real


def tokenizer():
    """Word-level tokenizer with Gemma3n's id layout: text ids first (the per-layer table covers
    them only), then 8 vision ids (the soft image token first) and 8 audio ids, each range embedded
    by its own table."""
    named = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
             "audio_token": "<audio_soft_token>", "boa_token": "<start_of_audio>", "eoa_token": "<end_of_audio>"}
    special = tuple(t for t in (*TEXT, *VISION, *AUDIO) if t.startswith("<") and t.endswith(">") and len(t) > 3)
    return word_tokenizer((*TEXT, *VISION, *AUDIO), pad="<pad>", bos="<s>", eos="</s>", unk="<unk>",
                          special=special, named=named)


def build(seed: int = 0):
    """Gemma3nForConditionalGeneration: :class:`StandInTower` (48 px → 6×6 = 36 soft tokens of
    width 24), HF's soft-token embedder, and a 5-layer Gemma3n LM (D 32, 4 AltUp streams,
    per-layer inputs of width 8, LAuReL, sliding window 40, layer types sliding/full/sliding/full/
    sliding, the last 2 layers reusing the keys and values of layers 1 and 2, so that a per-layer
    input of block 1 still reaches a layer that computes keys and values)."""
    from transformers import (Gemma3nAudioConfig, Gemma3nAudioFeatureExtractor, Gemma3nConfig, Gemma3nProcessor,
                              Gemma3nTextConfig, Gemma3nVisionConfig, SiglipImageProcessorPil)
    from transformers.models.gemma3n import modeling_gemma3n as hf
    torch.manual_seed(seed)
    tok = tokenizer()
    c = tok.convert_tokens_to_ids
    n_text = len(TEXT)
    tc = Gemma3nTextConfig(vocab_size=n_text + 16, vocab_size_per_layer_input=n_text, hidden_size=32,
                           hidden_size_per_layer_input=8, intermediate_size=64, num_hidden_layers=5,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_kv_shared_layers=2,
                           sliding_window=40,
                           layer_types=["sliding_attention", "full_attention"] * 2 + ["sliding_attention"],
                           activation_sparsity_pattern=[0.0] * 5, laurel_rank=4, altup_num_inputs=4,
                           max_position_embeddings=512, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id)
    vc = Gemma3nVisionConfig(hidden_size=24, vocab_size=8, vocab_offset=n_text)
    ac = Gemma3nAudioConfig(vocab_size=8, vocab_offset=n_text + 8, hidden_size=16, conf_num_hidden_layers=1,
                            conf_num_attention_heads=2, sscp_conv_channel_size=[4, 4], input_feat_size=16)
    cfg = Gemma3nConfig(text_config=tc, vision_config=vc, audio_config=ac, vision_soft_tokens_per_image=36,
                        image_token_id=c("<image_soft_token>"), boi_token_id=c("<start_of_image>"),
                        eoi_token_id=c("<end_of_image>"), audio_token_id=c("<audio_soft_token>"),
                        boa_token_id=c("<start_of_audio>"), eoa_token_id=c("<end_of_audio>"))
    cfg.architectures = ["Gemma3nForConditionalGeneration"]
    with stand_in_tower():
        model = hf.Gemma3nForConditionalGeneration(cfg).eval()
    # HF initialises AltUp's output scale to zeros (the per-layer inputs would be multiplied by 0) and its
    # stream-mixing coefficients and per-layer projection small: trained values are neither
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.altup.correct_output_scale.normal_(1.0, 0.1)
            layer.altup.prediction_coefs.weight.normal_(0.0, 0.5)  # streams mix into the active one
            layer.per_layer_projection.weight.normal_(0.0, 0.5)
    ip = SiglipImageProcessorPil(size={"height": SIDE, "width": SIDE})
    proc = Gemma3nProcessor(feature_extractor=Gemma3nAudioFeatureExtractor(), image_processor=ip, tokenizer=tok,
                            chat_template=GEMMA3N_CHAT, image_seq_length=36, audio_seq_length=4)
    return model, proc
