"""Tiny Gemma3, Gemma3n and Gemma4."""
from __future__ import annotations

import torch

from interp.tiny.text import _text_kw, tokenizer


GEMMA_CHAT = ("{%- for m in messages -%}{{ m['role'] }} {% for c in m['content'] -%}"
              "{%- if c['type'] == 'image' -%}<start_of_image> {% elif c['type'] == 'text' -%}{{ c['text'] }} "
              "{%- endif -%}{%- endfor -%}{%- endfor -%}{%- if add_generation_prompt -%} assistant{%- endif -%}")


def build_gemma3(seed: int = 0):
    """Gemma3ForConditionalGeneration: SigLIP + pooled soft tokens (2×2 here, 16×16 in Gemma3),
    sliding + global attention layers, bidirectional attention among image tokens."""
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil,
                              Gemma3Processor, Gemma3TextConfig, SiglipVisionConfig)
    torch.manual_seed(seed)
    tok = tokenizer(image_token="<image_soft_token>", boi_token="<start_of_image>", eoi_token="<end_of_image>")
    c = tok.convert_tokens_to_ids
    vcfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, vision_use_head=False)
    tcfg = Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                            layer_types=["sliding_attention", "full_attention"], max_position_embeddings=512,
                            **_text_kw(tok))
    cfg = Gemma3Config(vision_config=vcfg, text_config=tcfg, mm_tokens_per_image=4,
                       boi_token_index=c("<start_of_image>"), eoi_token_index=c("<end_of_image>"),
                       image_token_index=c("<image_soft_token>"))
    cfg.architectures = ["Gemma3ForConditionalGeneration"]
    model = Gemma3ForConditionalGeneration(cfg).eval()
    # Gemma3's init zeroes mm_input_projection_weight: the image would have no effect at all.
    with torch.no_grad():
        torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.1)
    ip = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    proc = Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=4, chat_template=GEMMA_CHAT)
    return model, proc


def build_gemma4(seed: int = 0):
    """Gemma4ForConditionalGeneration (:func:`interp.tiny.gemma4.build`: 8×8 pooled soft tokens on a 64 px probe)."""
    from interp.tiny.gemma4 import build
    return build(seed, tokenizer(image_token="<|image|>", boi_token="<|image>", eoi_token="<image|>"))


def build_gemma4_small(seed: int = 0):
    """Gemma4ForConditionalGeneration as the E2B/E4B checkpoints: per-layer embeddings and KV-sharing
    layers (:func:`interp.tiny.gemma4.build` with ``small``)."""
    from interp.tiny.gemma4 import build
    return build(seed, tokenizer(image_token="<|image|>", boi_token="<|image>", eoi_token="<image|>"), small=True)


def build_gemma3n(seed: int = 0):
    """Gemma3nForConditionalGeneration with a stand-in vision tower (:func:`interp.tiny.gemma3n.build`:
    6×6 soft tokens on a 48 px probe, 4 AltUp streams, per-layer inputs, shared keys and values)."""
    from interp.tiny.gemma3n import build
    return build(seed)
