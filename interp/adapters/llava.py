"""LLaVA-1.5 (LlavaForConditionalGeneration) and LLaVA-NeXT (LlavaNextForConditionalGeneration):
CLIP vision tower + MLP projector + Llama/Mistral LM with 1-D RoPE.

Shapes: B batch, L sequence, P vision patches incl. CLS, N image tokens per image (crop for
NeXT), D LM width, Dv vision width, V vocab. LLaVA reads its image features from CLIP block
``vision_feature_layer`` (−2 in LLaVA-1.5, −1 in the organism): blocks after it run but cannot
affect the output.
"""
from __future__ import annotations

import torch

from interp.adapters.base import Adapter, View
from interp.errors import SpatialBiasError

LM = {
    "lm.embed": "model.language_model.embed_tokens",
    "lm.blocks.{i}.attn": "model.language_model.layers.{i}.self_attn",
    "lm.blocks.{i}.mlp": "model.language_model.layers.{i}.mlp",
    "lm.blocks.{i}": "model.language_model.layers.{i}",
    "lm.rotary": "model.language_model.rotary_emb",
    "lm.final_norm": "model.language_model.norm",
    "unembed": "lm_head",
}
LM_SHAPES = {
    "lm.input": "(B, L, D) embeddings after the image features were scattered in; input of block 0",
    "lm.embed": "(B, L, D) token embeddings before the image scatter",
    "lm.blocks.{i}.attn": "(B, L, D) attention output before the residual add",
    "lm.blocks.{i}.mlp": "(B, L, D) MLP output before the residual add",
    "lm.blocks.{i}": "(B, L, D) residual stream after block i",
    "lm.rotary": "(cos, sin), each (B, L, head_dim)",
    "lm.final_norm": "(B, L, D)",
    "unembed": "(B, L, V) logits",
}
CLIP = {
    "vision.embed": "model.vision_tower.embeddings",
    "vision.blocks.{i}": "model.vision_tower.encoder.layers.{i}",
    "projector": "model.multi_modal_projector",
}
N_LAYERS = {"vision": "vision_config.num_hidden_layers", "lm": "text_config.num_hidden_layers"}


def _side(model) -> int:
    vc = model.config.vision_config
    if model.config.vision_feature_select_strategy != "default":
        raise SpatialBiasError(f"{type(model).__name__}: vision_feature_select_strategy="
                               f"{model.config.vision_feature_select_strategy!r} is not supported (only 'default')")
    return vc.image_size // vc.patch_size


class LlavaAdapter(Adapter):
    def image_views(self, model, inputs):
        side = _side(model)
        return [[View("base", side, side)] for _ in range(inputs["pixel_values"].shape[0])]


class LlavaNextAdapter(Adapter):
    def image_views(self, model, inputs):
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image
        side = _side(model)
        cfg = model.config
        views = []
        for size in inputs["image_sizes"]:
            gh, gw = get_anyres_image_grid_shape(size.tolist(), cfg.image_grid_pinpoints, cfg.vision_config.image_size)
            h, w = unpad_image(torch.empty(1, gh * side, gw * side), size).shape[1:]
            views.append([View("base", side, side), View("tiles", int(h), int(w), newline_per_row=True)])
        return views


LLAVA = LlavaAdapter(
    name="llava",
    model_classes=("LlavaForConditionalGeneration",),
    sites={**CLIP, **LM},
    shapes={"vision.embed": "(n_images, P, Dv)", "vision.blocks.{i}": "(n_images, P, Dv)",
            "vision.out": "(n_images, N, Dv) features the projector reads (CLS dropped)",
            "projector": "(n_images, N, D)", **LM_SHAPES},
    n_layers=N_LAYERS,
)

LLAVA_NEXT = LlavaNextAdapter(
    name="llava_next",
    model_classes=("LlavaNextForConditionalGeneration",),
    sites={**CLIP, **LM},
    shapes={"vision.embed": "(n_crops, P, Dv) base view + anyres tiles of every image",
            "vision.blocks.{i}": "(n_crops, P, Dv)", "vision.out": "(n_crops, N, Dv)",
            "projector": "(n_crops, N, D) before unpadding and image_newline tokens", **LM_SHAPES},
    n_layers=N_LAYERS,
)
