"""The tiny Gemma4 (:func:`interp.tiny.build_gemma4`), apart from :mod:`interp.tiny` to keep that
module under the line limit (it imports nothing of it); built from configs with random weights, no downloads."""
from __future__ import annotations

import torch

GEMMA4_CHAT = ("{%- for m in messages -%}{{ m['role'] }} {% for c in m['content'] -%}"
               "{%- if c['type'] == 'image' -%}<|image|> {% elif c['type'] == 'text' -%}{{ c['text'] }} "
               "{%- endif -%}{%- endfor -%}{%- endfor -%}{%- if add_generation_prompt -%} assistant{%- endif -%}")
"""Gemma4's turn shape for the word-level tokenizer (``<|image|>`` marks each image)."""


def build(seed: int, tok, small: bool = False):
    """Gemma4ForConditionalGeneration: a ViT over 4 px patches (2 blocks, learned 2-D position
    table + 2-D RoPE), 2×2 pooling, at most 70 soft tokens (280 patch slots) per image — a 64 px
    probe is 16×16 patches → 8×8 soft tokens, a 40×48 image is resized to 56×72 px (7×9); LM of
    3 layers (sliding, sliding, full; head_dim 16 on sliding layers, 32 with one K=V head on the
    full one), sliding window 48 (a text query reaches part of the image), bidirectional image
    attention in the sliding layers (``mm_token_type_ids``),
    final-logit softcapping 3 (small, so it bites on random logits); no per-layer embeddings, no
    shared KV layers, no audio tower. ``tok``: :func:`interp.tiny.tokenizer` with Gemma4's image tokens.

    ``small``: as the E2B/E4B checkpoints — per-layer embeddings of width 8 and KV-sharing layers:
    5 layers (sliding, sliding, full, sliding, full), the last 2 reusing the keys and values of
    layers 1 and 2, double-wide MLPs on them as E2B's ``use_double_wide_mlp``."""
    from transformers import (Gemma4Config, Gemma4ForConditionalGeneration, Gemma4ImageProcessorPil,
                              Gemma4TextConfig, Gemma4VisionConfig)

    from interp.adapters.gemma4 import image_only_processor
    torch.manual_seed(seed)
    c = tok.convert_tokens_to_ids
    types = ["sliding_attention", "sliding_attention", "full_attention"] + (
        ["sliding_attention", "full_attention"] if small else [])
    tcfg = Gemma4TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=len(types), num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
                            attention_k_eq_v=True, sliding_window=48, max_position_embeddings=512, layer_types=types,
                            use_bidirectional_attention="vision", final_logit_softcapping=3.0,
                            hidden_size_per_layer_input=8 if small else 0, vocab_size_per_layer_input=len(tok),
                            num_kv_shared_layers=2 if small else 0, use_double_wide_mlp=small,
                            vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    vcfg = Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=4, head_dim=8, patch_size=4, pooling_kernel_size=2,
                              position_embedding_size=64)
    cfg = Gemma4Config(text_config=tcfg, vision_config=vcfg, audio_config=None, image_token_id=c("<|image|>"),
                       boi_token_id=c("<|image>"), eoi_token_id=c("<image|>"), video_token_id=c("<|video_pad|>"))
    cfg.architectures = ["Gemma4ForConditionalGeneration"]
    model = Gemma4ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # HF initialises the table to ones: every patch would get the same position code
        model.model.vision_tower.patch_embedder.position_embedding_table.normal_(std=0.02)
        # HF embeds image tokens as padding, so this row is read only by the (tied) unembedding: a zero
        # logit keeps greedy decoding of the random model from emitting an image placeholder
        model.model.language_model.embed_tokens.weight[c("<|image|>")] = 0
    ip = Gemma4ImageProcessorPil(patch_size=4, max_soft_tokens=70, pooling_kernel_size=2)
    return model, image_only_processor(ip, tok, chat_template=GEMMA4_CHAT, image_seq_length=70)
