"""The Qwen2-VL organism: Qwen2VLForConditionalGeneration with 2-D M-RoPE, from real HF classes.

Vision: Qwen2-VL ViT (width 48, 2 blocks; no absolute position embeddings, 2-D rotary inside
attention) over the same 48 px canvases as the LLaVA organisms, 8 px patches (6×6 = 36 patches,
temporal patch 2), then the 2×2 patch merger → 9 merged tokens, one per grid cell, projected to
the LM width 128. About 452k parameters (1.8 MB in fp32).
LM: Qwen2 (2 layers, hidden 128, 4 heads, head dim 32, M-RoPE sections (4, 6, 6) for t/h/w,
θ = 1e4). HF's default ids give image token (r, c) the triple (s, s + r, s + c).

The processor is the stock Qwen2-VL one without its video processor
(:func:`interp.adapters.qwen.image_only_processor`), so ``interp.load(folder)`` reads a saved
checkpoint as it would read Qwen/Qwen2-VL-*.
"""
from __future__ import annotations

import numpy as np
import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

from analyses.organisms import build
from interp.adapters.qwen import image_only_processor
from interp.tiny import word_tokenizer

VISION_SPECIAL = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>")
WORDS = ("<pad>", "<bos>") + VISION_SPECIAL + build.WORDS[3:]
IMAGE_PX, PATCH_PX, MERGE, TEMPORAL = 48, 8, 2, 2
GRID = IMAGE_PX // PATCH_PX                      # 6 patches a side
N_IMAGE_TOKENS = (GRID // MERGE) ** 2            # 9 merged tokens
PATCH_DIM = 3 * TEMPORAL * PATCH_PX * PATCH_PX   # 384 values per flattened patch
CHAT_TEMPLATE = ("{%- for m in messages -%}{%- for c in m['content'] -%}"
                 "{%- if c['type'] == 'image' -%}<|vision_start|> <|image_pad|> <|vision_end|> "
                 "{%- elif c['type'] == 'text' -%}{{ c['text'] }}{%- endif -%}{%- endfor -%}{%- endfor -%}")


def tokenizer(words: tuple[str, ...] = WORDS):
    return word_tokenizer(words, pad="<pad>", bos="<bos>", eos="<bos>", unk="<pad>", special=VISION_SPECIAL)


def processor(words: tuple[str, ...] = WORDS):
    ip = Qwen2VLImageProcessorPil(patch_size=PATCH_PX, temporal_patch_size=TEMPORAL, merge_size=MERGE,
                                  size={"shortest_edge": IMAGE_PX * IMAGE_PX, "longest_edge": IMAGE_PX * IMAGE_PX},
                                  image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return image_only_processor(ip, tokenizer(words), chat_template=CHAT_TEMPLATE)


def config(words: tuple[str, ...] = WORDS) -> Qwen2VLConfig:
    ids = {t: i for i, t in enumerate(words)}
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=len(words), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
                         pad_token_id=0, bos_token_id=1, eos_token_id=1, tie_word_embeddings=False),
        vision_config=dict(depth=2, embed_dim=48, hidden_size=128, num_heads=2, mlp_ratio=2, patch_size=PATCH_PX,
                           spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)
    cfg.architectures = ["Qwen2VLForConditionalGeneration"]
    return cfg


def model(seed: int, words: tuple[str, ...] = WORDS) -> Qwen2VLForConditionalGeneration:
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration(config(words))


def pixel_values(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, 48, 48, 3) → (B·36, 384) float patches, flattened as Qwen2-VL's image processor
    does: normalised (x/255 − 0.5)/0.5, ordered by 2×2 merge block then patch in block, each
    patch (C, temporal copy, 8, 8) flattened."""
    x = torch.from_numpy(images).float().div_(255.0).permute(0, 3, 1, 2)
    x = (x - 0.5) / 0.5
    B, p, m, g = x.shape[0], PATCH_PX, MERGE, GRID
    x = x.reshape(B, 3, g // m, m, p, g // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)  # B, gh, gw, mh, mw, C, ph, pw
    x = x.unsqueeze(6).expand(*x.shape[:6], TEMPORAL, p, p)
    return x.reshape(B * g * g, PATCH_DIM).contiguous()


def input_ids(shapes_idx: np.ndarray, words: tuple[str, ...] = WORDS, kind: str = "colour") -> torch.Tensor:
    """Token ids of "<bos> <|vision_start|> <|image_pad|>×9 <|vision_end|> <question>": (B, 18) for
    the colour question, what the processor makes from the chat template."""
    w = {t: i for i, t in enumerate(words)}
    head = [w["<bos>"], w["<|vision_start|>"]] + [w["<|image_pad|>"]] * N_IMAGE_TOKENS + [w["<|vision_end|>"]]
    return torch.tensor([head + [w[t] for t in build.question_words(kind, int(s))] for s in shapes_idx])


def inputs(images: np.ndarray, shapes_idx: np.ndarray, words: tuple[str, ...] = WORDS,
           kind: str = "colour") -> dict[str, torch.Tensor]:
    """Every model input the processor makes for these images and questions (no padding):
    input_ids / attention_mask / mm_token_type_ids (B, 18), pixel_values (B·36, 384),
    image_grid_thw (B, 3) = (1, 6, 6) per image."""
    ids = input_ids(shapes_idx, words, kind)
    B = ids.shape[0]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "mm_token_type_ids": (ids == words.index("<|image_pad|>")).long(),
            "pixel_values": pixel_values(images), "image_grid_thw": torch.tensor([[1, GRID, GRID]] * B)}
