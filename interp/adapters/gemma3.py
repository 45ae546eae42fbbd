"""Gemma3 (Gemma3ForConditionalGeneration): SigLIP vision tower, a projector that average-pools
the patches to ``mm_tokens_per_image`` soft tokens (16×16 = 256 in Gemma3), and a Gemma3 LM
with interleaved sliding-window and global attention layers (two rotary embeddings, both fed
by the same position ids) and bidirectional attention among the tokens of one image.

A prompt marks the image with ``<start_of_image>`` (the processor's ``boi_token``), which the
processor expands to ``<start_of_image>`` + soft tokens + ``<end_of_image>``.

The LM calls its rotary module once per layer type in every forward: ``lm.rotary@sliding_attention``
and ``lm.rotary@full_attention`` (or ``@0``, ``@1``) name one call; ``lm.rotary`` alone edits both.
Token order: vision sites hold each image's patches in raster order (no CLS), the projector its
pooled soft tokens in raster order.
"""
from __future__ import annotations

import math

from interp.adapters.base import Adapter, ChatFormat, MemoryFacts, View, crop_pixel_bytes, projector_params, raster_fields
from interp.adapters.llava import LM, LM_SHAPES


class Gemma3Adapter(Adapter):
    def rotary(self, model, like, position_ids, layer):
        """Gemma3 keeps one rotary per layer type (sliding / full attention)."""
        layer_type = model.config.text_config.layer_types[layer]
        return self.module(model, "lm.rotary")(like, position_ids, layer_type)

    def calls(self, model, site):
        if site == "lm.rotary":
            return [f"lm.rotary@{t}" for t in sorted(set(model.config.text_config.layer_types))]
        return [site]

    def call_label(self, site, args, kwargs):
        """The rotary module's calls are named by the layer type they serve."""
        if site == "lm.rotary":
            return args[2] if len(args) > 2 else kwargs.get("layer_type")
        return None

    def memory_profile(self, cfg, image_px=(336, 336)):
        """``mm_tokens_per_image`` pooled tokens in the LM from (image_size / patch)² patches (no CLS)
        at the tower's fixed resolution; 4 RMSNorms of width D per LM block (before and after
        attention and MLP) and per-head norms of q and k."""
        v = cfg.get("vision_config", {})
        side = int(v.get("image_size", 896)) // int(v.get("patch_size", 14))
        n_vis = side * side
        return MemoryFacts(image_tokens=(int(cfg.get("mm_tokens_per_image", 256)), n_vis),
                           pixel_bytes=crop_pixel_bytes(v, n_vis), projector_params=projector_params(cfg),
                           block_norms=4, qk_norm=True)

    def image_views(self, model, inputs):
        side = math.isqrt(model.config.mm_tokens_per_image)
        return [[View("pooled", side, side)] for _ in range(inputs["pixel_values"].shape[0])]

    def vision_fields(self, model, inputs, site):
        vc = model.config.vision_config
        side = math.isqrt(model.config.mm_tokens_per_image) if site == "projector" else vc.image_size // vc.patch_size
        return [raster_fields(side, side)] * inputs["pixel_values"].shape[0], None


GEMMA3 = Gemma3Adapter(
    name="gemma3",
    model_classes=("Gemma3ForConditionalGeneration",),
    sites={"vision.embed": "model.vision_tower.embeddings",
           "vision.blocks.{i}": "model.vision_tower.encoder.layers.{i}",
           "projector": "model.multi_modal_projector", **LM},
    shapes={"vision.embed": "(n_images, P, Dv)", "vision.blocks.{i}": "(n_images, P, Dv)",
            "vision.out": "(n_images, P, Dv) what the projector pools",
            "projector": "(n_images, N, D) pooled soft tokens", **LM_SHAPES,
            "lm.rotary": "(cos, sin), each (B, L, head_dim); one call per layer type (@sliding_attention, @full_attention)",
            "lm.embed": "(B, L, D) token embeddings (scaled by sqrt(D)) before the image scatter"},
    n_layers={"vision": "vision_config.num_hidden_layers", "lm": "text_config.num_hidden_layers"},
    prompt_marker="boi_token",
    model_types=("gemma3",),
    chat=ChatFormat("{marker}", "<start_of_turn>user\n{images}{text}<end_of_turn>\n<start_of_turn>model\n", ""),
)
