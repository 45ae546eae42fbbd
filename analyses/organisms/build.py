"""The model organism's architecture, tokenizer and processor, from real HF classes.

LlavaForConditionalGeneration = CLIP vision tower (48 px, 16 px patches → 9 patch tokens,
one per grid cell, CLS dropped) + 2-layer GELU projector + Llama LM (2 layers, hidden 128,
RoPE θ = 1e4) over a 17-word vocabulary. The processor is a stock LlavaProcessor with a
PIL image processor (no torchvision), so the checkpoint loads with ``from_pretrained`` /
``AutoProcessor`` like any real LLaVA.
"""
from __future__ import annotations

import numpy as np
import torch
from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

from interp.tiny import word_tokenizer
from probes import shapes

SPECIAL = ("<pad>", "<bos>", "<image>")
WORDS = SPECIAL + ("what", "colour", "is", "the", "?") + shapes.SHAPES + shapes.COLOURS
IMAGE_PX, PATCH_PX = 3 * 16, 16
N_IMAGE_TOKENS = (IMAGE_PX // PATCH_PX) ** 2
# Messages → "<image> what colour is the circle ?" (the tokenizer adds <bos>).
CHAT_TEMPLATE = ("{%- for m in messages -%}{%- for c in m['content'] -%}"
                 "{%- if c['type'] == 'image' -%}<image> {% elif c['type'] == 'text' -%}{{ c['text'] }}"
                 "{%- endif -%}{%- endfor -%}{%- endfor -%}")


def tokenizer() -> PreTrainedTokenizerFast:
    return word_tokenizer(WORDS, pad="<pad>", bos="<bos>", eos="<bos>", unk="<pad>")


def processor() -> LlavaProcessor:
    ip = CLIPImageProcessorPil(do_resize=False, do_center_crop=False, do_rescale=True, rescale_factor=1 / 255,
                               do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3, do_convert_rgb=True,
                               size={"shortest_edge": IMAGE_PX}, crop_size={"height": IMAGE_PX, "width": IMAGE_PX})
    return LlavaProcessor(image_processor=ip, tokenizer=tokenizer(), patch_size=PATCH_PX,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          image_token="<image>", chat_template=CHAT_TEMPLATE)


def config() -> LlavaConfig:
    vc = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                          image_size=IMAGE_PX, patch_size=PATCH_PX, num_channels=3)
    tc = LlamaConfig(vocab_size=len(WORDS), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                     rope_theta=10000.0, pad_token_id=0, bos_token_id=1, eos_token_id=1,
                     tie_word_embeddings=False)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=WORDS.index("<image>"),
                      vision_feature_layer=-1, vision_feature_select_strategy="default",
                      projector_hidden_act="gelu", image_seq_length=N_IMAGE_TOKENS)
    cfg.architectures = ["LlavaForConditionalGeneration"]
    return cfg


def model(seed: int) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config())


def pixel_values(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) → float (B, 3, H, W), normalised as the processor does: (x/255 − 0.5)/0.5."""
    x = torch.from_numpy(images).float().div_(255.0).permute(0, 3, 1, 2)
    return ((x - 0.5) / 0.5).contiguous()


def input_ids(shapes_idx: np.ndarray) -> torch.Tensor:
    """Token ids of "<bos> <image>×9 what colour is the <shape> ?" — (B, 16), what the processor makes."""
    w = {t: i for i, t in enumerate(WORDS)}
    head = [w["<bos>"]] + [w["<image>"]] * N_IMAGE_TOKENS + [w["what"], w["colour"], w["is"], w["the"]]
    return torch.tensor([head + [w[shapes.SHAPES[s]], w["?"]] for s in shapes_idx])


def colour_ids() -> torch.Tensor:
    return torch.tensor([WORDS.index(c) for c in shapes.COLOURS])
