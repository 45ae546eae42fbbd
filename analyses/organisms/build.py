"""The LLaVA organisms' architecture, tokenizer and processor, from real HF classes.

LlavaForConditionalGeneration = CLIP vision tower (48 px, 16 px patches → 9 patch tokens,
one per grid cell, CLS dropped) + 2-layer GELU projector + a 2-layer LM of hidden 128 over a
small word vocabulary: Llama with RoPE θ = 1e4 (the shipped organism), or GPT-2 with learned
absolute position embeddings (``lm="gpt2"``). The processor is a stock LlavaProcessor with a PIL
image processor (no torchvision), so a checkpoint loads with ``from_pretrained`` /
``AutoProcessor`` like any real LLaVA.

Vocabularies: :data:`WORDS` (17 words) is the shipped organism's; recipes append
:data:`WHERE_WORDS` (the "where is the <shape> ?" question and its 9 cell answers) or
:data:`ITEM_WORDS` (one token per colour-shape pair, for text-only LM pretraining).
"""
from __future__ import annotations

import numpy as np
import torch
from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, GPT2Config, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

from interp.tiny import word_tokenizer
from probes import shapes

SPECIAL = ("<pad>", "<bos>", "<image>")
WORDS = SPECIAL + ("what", "colour", "is", "the", "?") + shapes.SHAPES + shapes.COLOURS
CELL_WORDS = ("northwest", "north", "northeast", "west", "centre", "east", "southwest", "south", "southeast")
"""Answers of the where-question, row-major like the grid cells (one word each)."""
WHERE_WORDS = ("where",) + CELL_WORDS
ITEM_WORDS = tuple(f"{c}{s}" for s in shapes.SHAPES for c in shapes.COLOURS)
"""Composite text tokens ("redcircle", …), index ``shape * 5 + colour``: one grid cell as a word."""
IMAGE_PX, PATCH_PX = 3 * 16, 16
N_IMAGE_TOKENS = (IMAGE_PX // PATCH_PX) ** 2
LMS = ("llama", "llama-blind", "gpt2")
# Messages → "<image> what colour is the circle ?" (the tokenizer adds <bos>).
CHAT_TEMPLATE = ("{%- for m in messages -%}{%- for c in m['content'] -%}"
                 "{%- if c['type'] == 'image' -%}<image> {% elif c['type'] == 'text' -%}{{ c['text'] }}"
                 "{%- endif -%}{%- endfor -%}{%- endfor -%}")


def tokenizer(words: tuple[str, ...] = WORDS) -> PreTrainedTokenizerFast:
    return word_tokenizer(words, pad="<pad>", bos="<bos>", eos="<bos>", unk="<pad>")


def processor(words: tuple[str, ...] = WORDS) -> LlavaProcessor:
    ip = CLIPImageProcessorPil(do_resize=False, do_center_crop=False, do_rescale=True, rescale_factor=1 / 255,
                               do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3, do_convert_rgb=True,
                               size={"shortest_edge": IMAGE_PX}, crop_size={"height": IMAGE_PX, "width": IMAGE_PX})
    return LlavaProcessor(image_processor=ip, tokenizer=tokenizer(words), patch_size=PATCH_PX,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          image_token="<image>", chat_template=CHAT_TEMPLATE)


def text_config(words: tuple[str, ...] = WORDS, lm: str = "llama"):
    """The LM's config: Llama (RoPE) or GPT-2 (learned absolute positions, no dropout); both
    hidden 128, 2 layers, 4 heads, MLP 256, 128 positions, untied unembedding. ``llama-blind``:
    Llama with one layer and its rotary angles divided by 1e20 (linear scaling: every rotation is
    the identity in float32), so the answer position reads the tokens as a set — blind to their
    order and positions by construction."""
    if lm == "llama":
        return LlamaConfig(vocab_size=len(words), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                           rope_theta=10000.0, pad_token_id=0, bos_token_id=1, eos_token_id=1,
                           tie_word_embeddings=False)
    if lm == "llama-blind":  # one layer, rotary angles scaled to nothing: the LM cannot see token order
        return LlamaConfig(vocab_size=len(words), hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                           rope_parameters={"rope_type": "linear", "factor": 1e20, "rope_theta": 10000.0},
                           pad_token_id=0, bos_token_id=1, eos_token_id=1, tie_word_embeddings=False)
    if lm == "gpt2":
        return GPT2Config(vocab_size=len(words), n_embd=128, n_inner=256, n_layer=2, n_head=4, n_positions=128,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, bos_token_id=1,
                          eos_token_id=1, tie_word_embeddings=False)
    raise ValueError(f"unknown LM {lm!r}; use one of {LMS}")


def config(words: tuple[str, ...] = WORDS, lm: str = "llama") -> LlavaConfig:
    vc = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                          image_size=IMAGE_PX, patch_size=PATCH_PX, num_channels=3)
    cfg = LlavaConfig(vision_config=vc, text_config=text_config(words, lm), image_token_index=words.index("<image>"),
                      vision_feature_layer=-1, vision_feature_select_strategy="default",
                      projector_hidden_act="gelu", image_seq_length=N_IMAGE_TOKENS)
    cfg.architectures = ["LlavaForConditionalGeneration"]
    return cfg


def model(seed: int, words: tuple[str, ...] = WORDS, lm: str = "llama") -> LlavaForConditionalGeneration:
    """A freshly initialised organism (``torch.manual_seed(seed)`` first)."""
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config(words, lm))


def pixel_values(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) → float (B, 3, H, W), normalised as the processor does: (x/255 − 0.5)/0.5."""
    x = torch.from_numpy(images).float().div_(255.0).permute(0, 3, 1, 2)
    return ((x - 0.5) / 0.5).contiguous()


def question_words(kind: str, shape: int) -> list[str]:
    """The question's words: ``colour`` → what colour is the <shape> ?, ``where`` → where is the <shape> ?"""
    if kind == "colour":
        return ["what", "colour", "is", "the", shapes.SHAPES[shape], "?"]
    if kind == "where":
        return ["where", "is", "the", shapes.SHAPES[shape], "?"]
    raise ValueError(f"unknown question kind {kind!r}; use colour or where")


def question(kind: str, shape: int) -> str:
    return " ".join(question_words(kind, shape))


def input_ids(shapes_idx: np.ndarray, words: tuple[str, ...] = WORDS, kind: str = "colour") -> torch.Tensor:
    """Token ids of "<bos> <image>×9 <question>" — (B, 16) for the colour question, (B, 15) for
    where — exactly what the processor makes from the chat template."""
    w = {t: i for i, t in enumerate(words)}
    head = [w["<bos>"]] + [w["<image>"]] * N_IMAGE_TOKENS
    return torch.tensor([head + [w[t] for t in question_words(kind, int(s))] for s in shapes_idx])


def colour_ids(words: tuple[str, ...] = WORDS) -> torch.Tensor:
    return torch.tensor([words.index(c) for c in shapes.COLOURS])
