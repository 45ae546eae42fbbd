"""LLaVA-1.5 (LlavaForConditionalGeneration): CLIP vision tower + MLP projector + Llama/Mistral LM.

The bundled model organism is this architecture. Shapes (B batch, L sequence, P vision
patches incl. CLS, N image tokens per image, D LM width, Dv vision width, V vocab) are in ``LLAVA.shapes``.

LLaVA reads its image features from CLIP block ``vision_feature_layer`` (−2 in LLaVA-1.5, −1
in the organism): blocks after it run but cannot affect the output.
"""
from __future__ import annotations

from interp.adapters.base import Adapter

LLAVA = Adapter(
    name="llava",
    model_classes=("LlavaForConditionalGeneration",),
    sites={
        "vision.embed": "model.vision_tower.embeddings",
        "vision.blocks.{i}": "model.vision_tower.encoder.layers.{i}",
        "projector": "model.multi_modal_projector",
        "lm.embed": "model.language_model.embed_tokens",
        "lm.blocks.{i}.attn": "model.language_model.layers.{i}.self_attn",
        "lm.blocks.{i}.mlp": "model.language_model.layers.{i}.mlp",
        "lm.blocks.{i}": "model.language_model.layers.{i}",
        "lm.rotary": "model.language_model.rotary_emb",
        "lm.final_norm": "model.language_model.norm",
        "unembed": "lm_head",
    },
    shapes={
        "vision.embed": "(n_images, P, Dv)",
        "vision.blocks.{i}": "(n_images, P, Dv)",
        "projector": "(n_images, N, D)",
        "lm.embed": "(B, L, D)",
        "lm.blocks.{i}.attn": "(B, L, D) attention output before the residual add",
        "lm.blocks.{i}.mlp": "(B, L, D) MLP output before the residual add",
        "lm.blocks.{i}": "(B, L, D) residual stream after block i",
        "lm.rotary": "(cos, sin), each (B, L, head_dim)",
        "lm.final_norm": "(B, L, D)",
        "unembed": "(B, L, V) logits",
    },
    n_layers={"vision": "vision_config.num_hidden_layers", "lm": "text_config.num_hidden_layers"},
)
