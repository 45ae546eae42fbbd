"""LLaVA-1.5 (LlavaForConditionalGeneration) and LLaVA-NeXT (LlavaNextForConditionalGeneration):
CLIP vision tower + MLP projector + Llama/Mistral LM with 1-D RoPE (or, for the zoo's
learned-absolute organism, a GPT-2 LM with learned position embeddings).

Shapes: B batch, L sequence, P vision patches incl. CLS, N image tokens per image (crop for
NeXT), D LM width, Dv vision width, V vocab. LLaVA reads its image features from CLIP block
``vision_feature_layer`` (−2 in LLaVA-1.5, −1 in the organism): blocks after it run but cannot
affect the output.

Token order: vision sites hold each image's (NeXT: each crop's) patches in raster order after
one CLS token (``vision.out`` and ``projector``: without it). NeXT's tile crops are mapped onto
the unpadded tiles grid with HF's own ``unpad_image``; tokens that unpadding drops map to no patch.
"""
from __future__ import annotations

import torch

from interp.adapters.base import Adapter, ChatFormat, MemoryFacts, View, crop_pixel_bytes, projector_params, raster_fields
from spatialbias.errors import SpatialBiasError

LM = {
    "lm.embed": "model.language_model.embed_tokens",
    "lm.blocks.{i}.attn": "model.language_model.layers.{i}.self_attn",
    "lm.blocks.{i}.mlp": "model.language_model.layers.{i}.mlp",
    "lm.blocks.{i}": "model.language_model.layers.{i}",
    "lm.rotary": "model.language_model.rotary_emb",
    "lm.final_norm": "model.language_model.norm",
    "unembed": "lm_head",
}
GPT2_LM = {
    "lm.embed": "model.language_model.wte",
    "lm.positions": "model.language_model.wpe",
    "lm.blocks.{i}.attn": "model.language_model.h.{i}.attn",
    "lm.blocks.{i}.mlp": "model.language_model.h.{i}.mlp",
    "lm.blocks.{i}": "model.language_model.h.{i}",
    "lm.final_norm": "model.language_model.ln_f",
    "unembed": "lm_head",
}
"""A GPT-2 LM (learned absolute position embeddings, no rotary) under a LLaVA vision side."""
LM_SHAPES = {
    "lm.input": "(B, L, D) embeddings after the image features were scattered in; input of block 0",
    "lm.embed": "(B, L, D) token embeddings before the image scatter",
    "lm.positions": "(B or 1, L, D) learned absolute position embeddings (GPT-2's wpe), added to the scattered "
                    "embeddings to make lm.input",
    "lm.blocks.{i}.attn": "(B, L, D) attention output before the residual add",
    "lm.blocks.{i}.attn.heads": "(B, L, H, head_dim) per-head attention output: the o_proj input split into heads",
    "lm.blocks.{i}.attn.pattern": "(B, H, L, L) attention weights after softmax (the run switches to eager)",
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

    def vision_fields(self, model, inputs, site):
        side = _side(model)
        f = raster_fields(side, side, cls=site.startswith("vision.") and site != "vision.out")
        return [f] * inputs["pixel_values"].shape[0], None


class LlavaNextAdapter(Adapter):
    def memory_profile(self, cfg, image_px=(336, 336)):
        """The base view + the largest anyres grid of the pinpoints (worst case) with one newline
        token per row of two tiles' patches; every crop through the tower with its CLS."""
        v = cfg.get("vision_config", {})
        side = int(v.get("image_size", 336)) // int(v.get("patch_size", 14))
        pins = cfg.get("image_grid_pinpoints") or [[672, 672]]
        tiles = max(a * b for a, b in pins) // int(v.get("image_size", 336)) ** 2
        n_img, n_vis = side * side * (1 + tiles) + side * 2, (side * side + 1) * (1 + tiles)
        return MemoryFacts(image_tokens=(n_img, n_vis), pixel_bytes=crop_pixel_bytes(v, n_vis),
                           projector_params=projector_params(cfg))

    def _grid(self, model, size):
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape
        cfg = model.config
        return get_anyres_image_grid_shape(size.tolist(), cfg.image_grid_pinpoints, cfg.vision_config.image_size)

    def image_views(self, model, inputs):
        from transformers.models.llava_next.modeling_llava_next import unpad_image
        side = _side(model)
        views = []
        for size in inputs["image_sizes"]:
            gh, gw = self._grid(model, size)
            h, w = unpad_image(torch.empty(1, gh * side, gw * side), size).shape[1:]
            views.append([View("base", side, side), View("tiles", int(h), int(w), newline_per_row=True)])
        return views

    def vision_fields(self, model, inputs, site):
        """Per image: the base crop (raster), then every tile crop, each token mapped onto the
        unpadded tiles grid exactly as HF's ``pack_image_features`` lays crops out."""
        from transformers.models.llava_next.modeling_llava_next import unpad_image
        side = _side(model)
        cls = site.startswith("vision.") and site != "vision.out"
        out = []
        for size in inputs["image_sizes"]:
            gh, gw = self._grid(model, size)
            ids = torch.arange(gh * gw * side * side, dtype=torch.float64).view(gh, gw, side, side, 1)
            grid = ids.permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)  # HF's crop → grid layout
            kept = unpad_image(grid, size)[0].long()  # (h, w) token ids that survive unpadding
            h, w = kept.shape
            tile = torch.full((gh * gw * side * side, 5), -1, dtype=torch.long)
            tile[:, 0], tile[:, 3], tile[:, 4] = 1, h, w
            rr, cc = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            tile[kept.flatten(), 1], tile[kept.flatten(), 2] = rr.flatten(), cc.flatten()
            crops = [raster_fields(side, side, cls=cls)]  # the base crop; HF drops the padding crops
            for k in range(gh * gw):
                t = tile[k * side * side:(k + 1) * side * side]
                crops.append(torch.cat([torch.tensor([[1, -1, -1, h, w]]), t]) if cls else t)
            out.append(torch.cat(crops, 0))
        return out, None


LLAVA = LlavaAdapter(
    name="llava",
    model_classes=("LlavaForConditionalGeneration",),
    sites={**CLIP, **LM},
    shapes={"vision.embed": "(n_images, P, Dv)", "vision.blocks.{i}": "(n_images, P, Dv)",
            "vision.out": "(n_images, N, Dv) features the projector reads (CLS dropped)",
            "projector": "(n_images, N, D)", **LM_SHAPES},
    n_layers=N_LAYERS,
    lm_variants={"gpt2": GPT2_LM},
    model_types=("llava",),
    chat=ChatFormat("{marker}\n", "USER: {images}{text} ASSISTANT:", " "),  # LLaVA-1.5
)

LLAVA_NEXT = LlavaNextAdapter(
    name="llava_next",
    model_classes=("LlavaNextForConditionalGeneration",),
    sites={**CLIP, **LM},
    shapes={"vision.embed": "(n_crops, P, Dv) base view + anyres tiles of every image",
            "vision.blocks.{i}": "(n_crops, P, Dv)", "vision.out": "(n_crops, N, Dv)",
            "projector": "(n_crops, N, D) before unpadding and image_newline tokens", **LM_SHAPES},
    n_layers=N_LAYERS,
    image_inputs={"pixel_values": "image", "image_sizes": "image"},
    model_types=("llava_next",),
    chat=ChatFormat("{marker}\n", "[INST] {images}{text} [/INST]", " "),  # LLaVA-v1.6-Mistral
)
