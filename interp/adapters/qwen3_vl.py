"""Qwen3-VL (Qwen3VLForConditionalGeneration): a ViT over 16 px (here 8 px) patches with learned
position embeddings bilinearly resampled to each image's grid, a 2×2 patch merger as the
projector, DeepStack, and a Qwen3 LM (q/k norms) with interleaved M-RoPE (t, h, w frequencies
interleaved instead of in sections; ids still three rows t, h, w from HF's ``get_rope_index``,
which needs ``mm_token_type_ids``).

DeepStack: after vision blocks ``deepstack_visual_indexes`` (8, 16, 24 in Qwen3-VL) a merger of
their own (``vision.deepstack.{k}`` → ``model.visual.deepstack_merger_list.{k}``, output (T/4, D))
makes features that the text model adds to the residual stream at the image positions *after*
LM block k, inside its layer loop and outside every layer module. So ``lm.blocks.{k}`` (the block's
output) is the stream before the addition and ``lm.blocks.{k+1}#input`` after it; the adapter
declares the additions (:meth:`injections`) and resuming the LM re-applies them.

Token order as Qwen2-VL (no vision windows): patches merge group by merge group (2×2 contiguous,
groups in raster order) at ``vision.embed`` (the patch embeddings *before* the learned position
embeddings are added: ``vision.blocks.0#input`` is after), every block and ``vision.out``; the
merger and the DeepStack mergers output merged tokens in raster order.
"""
from __future__ import annotations

from dataclasses import replace

from interp.adapters.base import ChatFormat, raster_fields
from interp.adapters.qwen import IMAGE_INPUTS, SHAPES, SITES, QwenAdapter


def image_only_processor(image_processor, tokenizer, chat_template=None):
    """Qwen3-VL's processor without its video processor (which needs torchvision)."""
    from transformers import Qwen3VLProcessor

    class Qwen3VLImageOnlyProcessor(Qwen3VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                             chat_template=chat_template, **kwargs)

    return Qwen3VLImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)


class Qwen3VLAdapter(QwenAdapter):
    image_only = staticmethod(image_only_processor)

    def pattern_count(self, model, pattern):
        if pattern.startswith("vision.deepstack."):
            return len(model.config.vision_config.deepstack_visual_indexes)
        return super().pattern_count(model, pattern)

    def injections(self, model):
        """DeepStack: the k-th DeepStack merger's output is added at the image positions after LM block k."""
        return {k: f"vision.deepstack.{k}" for k in range(len(model.config.vision_config.deepstack_visual_indexes))}

    def vision_fields(self, model, inputs, site):
        if site.startswith("vision.deepstack."):  # merged tokens in raster order, as the merger's
            m = model.config.vision_config.spatial_merge_size
            return [raster_fields(t * h // m, w // m) for t, h, w in inputs["image_grid_thw"].tolist()], None
        return super().vision_fields(model, inputs, site)

    def memory_profile(self, cfg, image_px=(336, 336)):
        """Qwen2-VL's layout (patches, merged quarter in the LM); Qwen3's attention normalises q and k per head."""
        return replace(super().memory_profile(cfg, image_px), qk_norm=True)


QWEN3_VL = Qwen3VLAdapter(
    name="qwen3vl", model_classes=("Qwen3VLForConditionalGeneration",),
    sites={"vision.embed": SITES["vision.embed"], "vision.blocks.{i}": SITES["vision.blocks.{i}"],
           "vision.deepstack.{i}": "model.visual.deepstack_merger_list.{i}",
           **{k: v for k, v in SITES.items() if k not in ("vision.embed", "vision.blocks.{i}")}},
    shapes={**SHAPES, "vision.embed": "(T, Dv) patch embeddings of all images, flattened, before the learned "
                                      "position embeddings are added",
            "vision.deepstack.{i}": "(T/4, D) DeepStack features of all images, added at the image positions "
                                    "after LM block i",
            "lm.blocks.{i}": "(B, L, D) block i's output; for i < len(deepstack_visual_indexes) before the DeepStack "
                             "features are added (lm.blocks.{i+1}#input is after)",
            "lm.rotary": "(cos, sin), each (B, L, head_dim): the t/h/w frequencies interleaved"},
    n_layers={"vision": "vision_config.depth", "lm": "text_config.num_hidden_layers"},
    rope="mrope", image_inputs=IMAGE_INPUTS, model_types=("qwen3_vl",),
    chat=ChatFormat("<|vision_start|>{marker}<|vision_end|>",
                    "<|im_start|>user\n{images}{text}<|im_end|>\n<|im_start|>assistant\n", ""),
)
"""Qwen3-VL; its published ChatML has no default system turn."""
