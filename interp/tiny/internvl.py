"""Tiny InternVL."""
from __future__ import annotations

import torch

from interp.tiny.text import _text_kw, tokenizer


INTERNVL_CHAT = ("{%- for m in messages -%}<|im_start|> {{ m['role'] }} {% for c in m['content'] -%}"
                 "{%- if c['type'] == 'image' -%}<IMG_CONTEXT> {% elif c['type'] == 'text' -%}{{ c['text'] }} {% endif -%}"
                 "{%- endfor -%}<|im_end|> {% endfor -%}{%- if add_generation_prompt -%}<|im_start|> assistant{%- endif -%}")
"""InternVL's ChatML shape for the word-level tokenizer (``<IMG_CONTEXT>`` marks each image)."""


def build_internvl(seed: int = 0):
    """InternVLForConditionalGeneration: InternViT (48 px tiles, 8 px patches → 6×6 patches and a CLS
    token per crop, 2 blocks), pixel shuffle 0.5 (3×3 = 9 tokens per crop), MLP projector, Qwen2 LM
    (2 layers, 64 wide); dynamic tiling on (``max_patches`` 12, HF's default): a square 144 px
    probe is 3×3 tiles + a thumbnail (90 image tokens), a 40×48 image 3 rows × 4 columns of tiles
    + a thumbnail (117 tokens), a 48×48 one a single crop (9 tokens)."""
    from transformers import (GotOcr2ImageProcessorPil, InternVLConfig, InternVLForConditionalGeneration,
                              InternVLVisionConfig, Qwen2Config)

    from interp.adapters.internvl import image_only_processor
    torch.manual_seed(seed)
    tok = tokenizer(start_image_token="<img>", end_image_token="</img>", context_image_token="<IMG_CONTEXT>",
                    video_token="<video>")
    vcfg = InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=48, patch_size=8)
    tcfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=512, **_text_kw(tok))
    cfg = InternVLConfig(vision_config=vcfg, text_config=tcfg, image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
                         image_seq_length=9, downsample_ratio=0.5, vision_feature_layer=-1,
                         vision_feature_select_strategy="default")
    cfg.architectures = ["InternVLForConditionalGeneration"]
    model = InternVLForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # HF initialises them to zero; random ones give every crop position its own code
        model.model.vision_tower.embeddings.position_embeddings.normal_(std=0.02)
        model.model.vision_tower.embeddings.cls_token.normal_(std=0.02)
    ip = GotOcr2ImageProcessorPil(size={"height": 48, "width": 48}, crop_to_patches=True, min_patches=1,
                                  max_patches=12)
    return model, image_only_processor(ip, tok, chat_template=INTERNVL_CHAT, image_seq_length=9)
