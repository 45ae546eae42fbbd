"""Qwen2-VL and Qwen2.5-VL: a ViT over 14 px (here 8 px) patches, a 2×2 patch merger as the
projector, and a Qwen2 LM with M-RoPE (three position rows t, h, w).

Vision tensors are flattened over images: T = total patches of the batch, T/4 merged tokens.
"""
from __future__ import annotations

import torch

from interp.adapters.base import Adapter, View
from interp.errors import SpatialBiasError
from interp.adapters.llava import LM, LM_SHAPES


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
    def load_processor(self, src, trust_remote_code=False):
        """AutoProcessor; without torchvision it silently returns the bare tokenizer, so then
        build the image-only processor from the image processor and tokenizer."""
        proc = super().load_processor(src, trust_remote_code)
        if hasattr(proc, "image_processor"):
            return proc
        from transformers import AutoImageProcessor, AutoTokenizer
        tok = AutoTokenizer.from_pretrained(src, local_files_only=True, trust_remote_code=trust_remote_code)
        ip = AutoImageProcessor.from_pretrained(src, local_files_only=True, trust_remote_code=trust_remote_code)
        return image_only_processor(ip, tok, chat_template=getattr(tok, "chat_template", None) or _template(src))

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

    def select_rows(self, inputs, rows):
        """Qwen flattens pixel patches over images: split them by ``image_grid_thw`` (one image per row)."""
        grid = inputs["image_grid_thw"]
        if grid.shape[0] != inputs["input_ids"].shape[0]:
            raise SpatialBiasError("row selection needs exactly one image per row")
        chunks = inputs["pixel_values"].split(grid.prod(-1).tolist(), 0)
        out = super().select_rows({k: v for k, v in inputs.items() if k != "pixel_values"}, rows)
        out["pixel_values"] = torch.cat([chunks[r] for r in rows], 0)
        return out


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

QWEN2_VL = QwenAdapter(name="qwen2vl", model_classes=("Qwen2VLForConditionalGeneration",), sites=SITES,
                       shapes=SHAPES, n_layers=N_LAYERS, rope="mrope")
QWEN2_5_VL = QwenAdapter(name="qwen25vl", model_classes=("Qwen2_5_VLForConditionalGeneration",), sites=SITES,
                         shapes=SHAPES, n_layers=N_LAYERS, rope="mrope")
