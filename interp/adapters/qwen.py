"""Qwen2-VL and Qwen2.5-VL: a ViT over 14 px (here 8 px) patches, a 2×2 patch merger as the
projector, and a Qwen2 LM with M-RoPE (three position rows t, h, w).

Vision tensors are flattened over images: T = total patches of the batch, T/4 merged tokens.

Token order: the processor lays each image's patches out merge group by merge group (2×2
patches contiguous, groups in raster order); that is the order of ``vision.embed`` (both
models) and of every vision site of Qwen2-VL, whose merger output is in merged raster order.
Qwen2.5-VL permutes the merge groups into vision-window order before its blocks and restores
image order only *after* the merger: its ``vision.blocks.{i}``, ``vision.out`` and ``projector``
hold tokens in window order (HF's ``get_vision_window_index``), and the adapter says so.
"""
from __future__ import annotations

import torch

from interp.adapters.base import Adapter, ChatFormat, MemoryFacts, View, projector_params, raster_fields
from interp.adapters.llava import LM, LM_SHAPES

PROBE_SIDE = 336
"""The probe side a dynamic-resolution model is given (LLaVA-1.5's and the paper's 336 px)."""


def image_only_processor(image_processor, tokenizer, chat_template=None):
    """Qwen2-VL's processor without its video processor, which needs torchvision (unusable with
    the CPU torch here): the class check for ``video_processor=None`` fails otherwise."""
    from transformers import Qwen2VLProcessor

    class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                             chat_template=chat_template, **kwargs)

    return Qwen2VLImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)


class QwenAdapter(Adapter):
    image_only = staticmethod(image_only_processor)
    """How to build the processor without its video processor (a subclass names its own)."""

    def load_processor(self, src, trust_remote_code=False):
        """AutoProcessor; without torchvision it silently returns the bare tokenizer, so then
        build the image-only processor from the image processor and tokenizer."""
        proc = super().load_processor(src, trust_remote_code)
        if hasattr(proc, "image_processor"):
            return proc
        from transformers import AutoImageProcessor, AutoTokenizer
        tok = AutoTokenizer.from_pretrained(src, local_files_only=True, trust_remote_code=trust_remote_code)
        ip = AutoImageProcessor.from_pretrained(src, local_files_only=True, trust_remote_code=trust_remote_code)
        return type(self).image_only(ip, tok, chat_template=getattr(tok, "chat_template", None) or _template(src))

    def probe_canvas(self, config, image_processor):
        """Dynamic resolution: the side nearest :data:`PROBE_SIDE` that is a whole number of merged
        tokens per grid cell (a multiple of 3 × patch × merge) and whose area the processor keeps
        as drawn (within its ``min_pixels``…``max_pixels``, ``size`` shortest/longest edge)."""
        vc = config.vision_config
        unit = 3 * int(vc.patch_size) * int(vc.spatial_merge_size)
        size = getattr(image_processor, "size", None) or {}
        lo = int(size.get("shortest_edge") or getattr(image_processor, "min_pixels", 0) or 0)
        hi = int(size.get("longest_edge") or getattr(image_processor, "max_pixels", 0) or 0)
        sides = [k * unit for k in range(1, 64) if (k * unit) ** 2 >= lo and (not hi or (k * unit) ** 2 <= hi)]
        return min(sides, key=lambda s: abs(s - PROBE_SIDE)) if sides else unit

    def memory_profile(self, cfg, image_px=(336, 336)):
        """Dynamic resolution: the image resized to a multiple of patch × merge, (h/p)(w/p) patches
        through the tower, a quarter of them merged into the LM; pixel inputs are the flattened
        patches (3 × temporal_patch_size × p² fp32 each). The vision rotary runs in fp32 (q and k
        copied: 8 Dv) beside qkv, q, k, v, the block input and its fp32-normed copy: 19 Dv live in
        a vision block's attention phase (the larger one here)."""
        v = cfg.get("vision_config", {})
        p, m = int(v.get("patch_size", 14)), int(v.get("spatial_merge_size", 2))
        h, w = (max(p * m, round(x / (p * m)) * p * m) for x in image_px)
        n = (h // p) * (w // p)
        return MemoryFacts(image_tokens=(n // (m * m), n),
                           pixel_bytes=n * 3 * int(v.get("temporal_patch_size", 2)) * p * p * 4,
                           projector_params=projector_params(cfg), vision_attn_live=19.0)

    def vision_tokens(self, model, inputs):
        """Patches of all images of the batch (flattened)."""
        return int(inputs["pixel_values"].shape[0])

    def image_views(self, model, inputs):
        m = model.config.vision_config.spatial_merge_size
        return [[View("merged", int(t) * int(h) // m, int(w) // m)] for t, h, w in inputs["image_grid_thw"]]

    def default_position_ids(self, model, inputs):
        """HF's own M-RoPE ids (``get_rope_index``): (3, B, L)."""
        pos, _ = model.model.get_rope_index(
            inputs["input_ids"], image_grid_thw=inputs.get("image_grid_thw"),
            attention_mask=inputs.get("attention_mask"), mm_token_type_ids=inputs.get("mm_token_type_ids"))
        return pos

    generation_position_ids = default_position_ids

    def _patches(self, inputs, v, images):
        """Qwen flattens pixel patches over images: split them by ``image_grid_thw``."""
        chunks = v.split(inputs["image_grid_thw"].prod(-1).tolist(), 0)
        return torch.cat([chunks[i] for i in images], 0) if images else v[:0]

    def vision_fields(self, model, inputs, site):
        m = model.config.vision_config.spatial_merge_size
        per_image = []
        for t, h, w in inputs["image_grid_thw"].tolist():
            if site == "projector":
                per_image.append(raster_fields(t * h // m, w // m))
                continue
            g = raster_fields(t * h // m, w // m)  # merge groups in raster order
            r = (g[:, 1, None] * m + torch.arange(m).repeat_interleave(m)).flatten()  # then m×m patches
            c = (g[:, 2, None] * m + torch.arange(m).repeat(m)).flatten()
            per_image.append(torch.stack([torch.zeros_like(r), r, c, torch.full_like(r, t * h),
                                          torch.full_like(r, w)], 1))
        return per_image, self.window_order(model, inputs, site)

    def window_order(self, model, inputs, site):
        """The site's token permutation (None: processor order)."""
        return None


class Qwen25Adapter(QwenAdapter):
    def window_order(self, model, inputs, site):
        """Blocks, merger input and merger output hold merge groups in vision-window order."""
        if site == "vision.embed":
            return None
        from transformers.vision_utils import get_vision_window_index
        vc = model.config.vision_config
        win, _ = get_vision_window_index(inputs["image_grid_thw"], spatial_merge_size=vc.spatial_merge_size,
                                         window_size=vc.window_size, patch_size=vc.patch_size)
        win = torch.as_tensor(win).cpu().long()
        if site == "projector":
            return win
        unit = vc.spatial_merge_size ** 2
        return (win[:, None] * unit + torch.arange(unit)).flatten()


def _template(src) -> str | None:
    from pathlib import Path
    p = Path(str(src)) / "chat_template.jinja"
    return p.read_text() if p.is_file() else None


SITES = {
    "vision.embed": "model.visual.patch_embed",
    "vision.blocks.{i}": "model.visual.blocks.{i}",
    "projector": "model.visual.merger",
    **LM,
}
SHAPES = {
    "vision.embed": "(T, Dv) patch embeddings of all images, flattened",
    "vision.blocks.{i}": "(T, Dv)",
    "vision.out": "(T, Dv) what the merger reads",
    "projector": "(T/4, D) merged tokens of all images, flattened in image order",
    **LM_SHAPES,
    "lm.rotary": "(cos, sin), each (3, B, L, head_dim) for the t/h/w rows",
}
N_LAYERS = {"vision": "vision_config.depth", "lm": "text_config.num_hidden_layers"}

IMAGE_INPUTS = {"pixel_values": "patches", "image_grid_thw": "image"}
CHATML = ChatFormat("<|vision_start|>{marker}<|vision_end|>",
                    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "{images}{text}<|im_end|>\n<|im_start|>assistant\n", "")
"""Qwen2-VL / Qwen2.5-VL's published ChatML with the default system turn."""
QWEN2_VL = QwenAdapter(name="qwen2vl", model_classes=("Qwen2VLForConditionalGeneration",), sites=SITES,
                       shapes=SHAPES, n_layers=N_LAYERS, rope="mrope", image_inputs=IMAGE_INPUTS,
                       model_types=("qwen2_vl",), chat=CHATML)
QWEN2_5_VL = Qwen25Adapter(name="qwen25vl", model_classes=("Qwen2_5_VLForConditionalGeneration",), sites=SITES,
                           shapes={**SHAPES, "vision.blocks.{i}": "(T, Dv) in vision-window order",
                                   "vision.out": "(T, Dv) in vision-window order",
                                   "projector": "(T/4, D) merged tokens in vision-window order (HF restores "
                                                "image order after the merger)"},
                           n_layers=N_LAYERS, rope="mrope", image_inputs=IMAGE_INPUTS,
                           model_types=("qwen2_5_vl",), chat=CHATML)
