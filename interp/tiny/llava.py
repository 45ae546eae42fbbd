"""Tiny LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision."""
from __future__ import annotations

import torch

from interp.tiny.text import LLAVA_CHAT, _text_kw, tokenizer


def _clip_llama(tok, max_positions: int):
    """The tiny CLIP vision config (32 px, 8 px patches) and Llama text config of both LLaVA builders."""
    from transformers import CLIPVisionConfig, LlamaConfig
    vcfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=32, patch_size=8, projection_dim=32)
    tcfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=max_positions, **_text_kw(tok))
    return vcfg, tcfg


def build_llava(seed: int = 0, tokenizer_kind: str = "word"):
    """LlavaForConditionalGeneration: CLIP (32 px, 8 px patches → 16 image tokens) + Llama (2 layers, 64 wide);
    ``tokenizer_kind`` picks :func:`tokenizer` (the chat template is LLaVA-style for all, ending in ``ASSISTANT:``)."""
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    torch.manual_seed(seed)
    tok = tokenizer(tokenizer_kind)
    vcfg, tcfg = _clip_llama(tok, max_positions=256)
    cfg = LlavaConfig(vision_config=vcfg, text_config=tcfg, image_token_index=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_select_strategy="default", vision_feature_layer=-2, image_seq_length=16)
    cfg.architectures = ["LlavaForConditionalGeneration"]
    model = LlavaForConditionalGeneration(cfg).eval()
    ip = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, image_token="<image>", chat_template=LLAVA_CHAT)
    return model, proc


def build_llava_next(seed: int = 0):
    """LlavaNextForConditionalGeneration: anyres (base view + tiles + image_newline tokens)."""
    from transformers import (LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessorPil,
                              LlavaNextProcessor)
    torch.manual_seed(seed)
    tok = tokenizer()
    vcfg, tcfg = _clip_llama(tok, max_positions=512)
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    cfg = LlavaNextConfig(vision_config=vcfg, text_config=tcfg, image_token_index=tok.convert_tokens_to_ids("<image>"),
                          vision_feature_select_strategy="default", vision_feature_layer=-2,
                          image_grid_pinpoints=pinpoints, image_seq_length=16)
    cfg.architectures = ["LlavaNextForConditionalGeneration"]
    model = LlavaNextForConditionalGeneration(cfg).eval()
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                    image_grid_pinpoints=pinpoints)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                              num_additional_image_tokens=1, image_token="<image>", chat_template=LLAVA_CHAT)
    return model, proc


ONEVISION_CHAT = ("{%- for m in messages -%}<|im_start|> {{ m['role'] }} {% for c in m['content'] -%}"
                  "{%- if c['type'] == 'image' -%}<image> {% elif c['type'] == 'text' -%}{{ c['text'] }} {% endif -%}"
                  "{%- endfor -%}<|im_end|> {% endfor -%}{%- if add_generation_prompt -%}<|im_start|> assistant{%- endif -%}")
"""LLaVA-OneVision's ChatML shape for the word-level tokenizer (``<image>`` marks each image)."""


def build_llava_onevision(seed: int = 0):
    """LlavaOnevisionForConditionalGeneration: SigLIP (32 px, 8 px patches, no CLS; features of the
    last block, ``vision_feature_select_strategy="full"`` as in the released checkpoints) + MLP
    projector + Qwen2 LM (2 layers, 64 wide); AnyRes-Max: base view 4×4, then the tiles of a
    pinpoint grid (up to 2×2 tiles of 32 px) unpadded to the image's aspect, a newline after
    each row; several images in one row are not tiled (base view + one newline each)."""
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionImageProcessorPil, Qwen2Config, SiglipVisionConfig)

    from interp.adapters.llava_onevision import image_only_processor
    torch.manual_seed(seed)
    tok = tokenizer()
    c = tok.convert_tokens_to_ids
    vcfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, vision_use_head=False)
    tcfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=512, **_text_kw(tok))
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    cfg = LlavaOnevisionConfig(vision_config=vcfg, text_config=tcfg, image_token_index=c("<image>"),
                               video_token_index=c("<|video_pad|>"), vision_feature_select_strategy="full",
                               vision_feature_layer=-1, image_grid_pinpoints=pinpoints,
                               vision_aspect_ratio="anyres_max_9")
    cfg.architectures = ["LlavaOnevisionForConditionalGeneration"]
    model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    ip = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints)
    proc = image_only_processor(ip, tok, chat_template=ONEVISION_CHAT, num_image_tokens=16,
                                vision_feature_select_strategy="full", image_token="<image>",
                                video_token="<|video_pad|>", vision_aspect_ratio="anyres_max_9")
    return model, proc
