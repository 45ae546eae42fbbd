"""The Qwen3-VL organism: Qwen3VLForConditionalGeneration with DeepStack, from real HF classes.

Vision: Qwen3-VL ViT (hidden 48, 2 blocks, learned absolute position embeddings on a 6×6 table —
the canvas's own patch grid, so HF's bilinear resampling is the identity — plus 2-D rotary inside
attention) over the 48 px canvases, 8 px patches (6×6 = 36 patches, temporal patch 2), then the
2×2 patch merger → 9 merged tokens, one per grid cell, projected to the LM width 128.
DeepStack: the output of vision block 0 goes through a merger of its own (``deepstack_merger_list.0``,
output (B·9, 128)) and is added to the LM's residual stream at the 9 image positions after LM
block 0 (``deepstack_visual_indexes = [0]``: with 2 LM blocks, an addition after the last block
could not reach the answer position, so one DeepStack layer is all a 2-block LM can use).
LM: Qwen3 (q/k norms; 2 layers, hidden 128, 4 query and 2 key-value heads, head dim 32) with interleaved M-RoPE
(sections (4, 6, 6) interleaved, θ = 1e4); HF's ids give image token (r, c) the triple
(s, s + r, s + c) as in Qwen2-VL. About 483k parameters (1.9 MB in fp32).

Tokens, pixels and every other processor input are those of the Qwen2-VL organism
(:mod:`analyses.organisms.qwen`: same vocabulary, chat template, patch flattening); the processor
is the stock Qwen3-VL one without its video processor
(:func:`interp.adapters.qwen3_vl.image_only_processor`), so ``interp.load(folder)`` reads a
saved checkpoint as it would read Qwen/Qwen3-VL-*.
"""
from __future__ import annotations

import torch
from transformers import Qwen2VLImageProcessorPil, Qwen3VLConfig, Qwen3VLForConditionalGeneration

from analyses.organisms.qwen import (CHAT_TEMPLATE, GRID, IMAGE_PX, MERGE, PATCH_PX, TEMPORAL, WORDS, inputs,
                                     pixel_values, tokenizer)
from interp.adapters.qwen3_vl import image_only_processor

DEEPSTACK = (0,)
"""Vision blocks whose features DeepStack adds after LM blocks 0, 1, … (one per entry)."""
__all__ = ["WORDS", "config", "model", "processor", "inputs", "pixel_values", "DEEPSTACK"]


def processor(words: tuple[str, ...] = WORDS):
    ip = Qwen2VLImageProcessorPil(patch_size=PATCH_PX, temporal_patch_size=TEMPORAL, merge_size=MERGE,
                                  size={"shortest_edge": IMAGE_PX * IMAGE_PX, "longest_edge": IMAGE_PX * IMAGE_PX},
                                  image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return image_only_processor(ip, tokenizer(words), chat_template=CHAT_TEMPLATE)


def config(words: tuple[str, ...] = WORDS) -> Qwen3VLConfig:
    ids = {t: i for i, t in enumerate(words)}
    cfg = Qwen3VLConfig(
        text_config=dict(vocab_size=len(words), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=128,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6],
                                          "mrope_interleaved": True},
                         pad_token_id=0, bos_token_id=1, eos_token_id=1, tie_word_embeddings=False),
        vision_config=dict(depth=2, hidden_size=48, intermediate_size=96, num_heads=2, out_hidden_size=128,
                           patch_size=PATCH_PX, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL,
                           num_position_embeddings=GRID * GRID, deepstack_visual_indexes=list(DEEPSTACK)),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)
    cfg.architectures = ["Qwen3VLForConditionalGeneration"]
    return cfg


def model(seed: int, words: tuple[str, ...] = WORDS) -> Qwen3VLForConditionalGeneration:
    """A freshly initialised organism (``torch.manual_seed(seed)`` first)."""
    torch.manual_seed(seed)
    return Qwen3VLForConditionalGeneration(config(words))
