"""LLaVA-OneVision (LlavaOnevisionForConditionalGeneration): a SigLIP (or CLIP) vision tower, an
MLP projector, and a Qwen2 LM with 1-D RoPE; AnyRes-Max image layout.

Shapes: as LLaVA-NeXT. ``vision.*`` and ``projector`` hold crops (n_crops, P, ·): for each image
in processor order its base view (the whole image resized to the tower's side), then — for an
image alone in its row — its anyres tiles; ``pixel_values`` is (n_images, max_crops, 3, S, S)
padded, and HF keeps the first ``image_size_to_num_patches`` crops of each image.

Token order in the LM (HF's ``pack_image_features``), for an image alone in its row: the base
view (side × side patches, raster), then the tiles' features laid out as one grid (HF's
crop → grid permute), unpadded to the image's aspect with HF's ``unpad_image``, bilinearly
shrunk when its area exceeds ``anyres_max_N`` base views by more than 1.1² (``vision_aspect_ratio``),
then row by row, each row ending in one ``image_newline`` token: newline slots carry the image
token id but belong to no cell (row/col −1). An image in a row with several images
(``batch_num_images`` > 1) is not tiled: the processor pads it to a square (HF's
``pad_to_square``), and its tokens are the base view's patches followed by one newline token.

Vision-side token order: per crop its patches in raster order (after one CLS token on a CLIP
tower's ``vision.embed`` / ``vision.blocks``); tile tokens are mapped onto the unpadded tiles
grid exactly as HF lays crops out (tokens unpadding drops map to no patch). Where the grid is
shrunk (ratio > 1.1: never on the tiny model, whose largest grid is 2×2 tiles), tile tokens
keep their place on the grid before the shrink, so their cells are right but the projector and
``lm.input`` no longer hold the same tokens one for one.
"""
from __future__ import annotations

import math

import torch

from interp.adapters.base import Adapter, ChatFormat, MemoryFacts, View, projector_params, raster_fields
from interp.adapters.llava import CLIP, LM, LM_SHAPES, N_LAYERS


def image_only_processor(image_processor, tokenizer, chat_template=None, **kwargs):
    """LLaVA-OneVision's processor without its video processor, which needs torchvision (absent
    here): its class check for ``video_processor=None`` fails otherwise."""
    from transformers import LlavaOnevisionProcessor

    class LlavaOnevisionImageOnlyProcessor(LlavaOnevisionProcessor):
        def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None,
                     vision_feature_select_strategy=None, chat_template=None, image_token="<image>",
                     video_token="<video>", vision_aspect_ratio="anyres_max_9", **kw):
            super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                             num_image_tokens=num_image_tokens,
                             vision_feature_select_strategy=vision_feature_select_strategy,
                             chat_template=chat_template, image_token=image_token, video_token=video_token,
                             vision_aspect_ratio=vision_aspect_ratio, **kw)

    return LlavaOnevisionImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                            chat_template=chat_template, **kwargs)


def max_views(vision_aspect_ratio: str) -> int:
    """N of ``anyres_max_N`` (HF strips the prefix the same way)."""
    return int(str(vision_aspect_ratio).strip("anyres_max_"))


def tiles_grid(size, pinpoints, image_size: int, side: int, vision_aspect_ratio: str) -> tuple[int, int, int, int]:
    """(gh, gw, h, w): the anyres tile grid HF picks for an image of ``size`` (h, w) pixels, and the
    (h, w) patch grid of its tile features after unpadding and the anyres-max shrink, with HF's
    own ``get_anyres_image_grid_shape`` and ``unpad_image``."""
    from transformers.models.llava_onevision.modeling_llava_onevision import (get_anyres_image_grid_shape,
                                                                              unpad_image)
    size = [int(x) for x in (size.tolist() if hasattr(size, "tolist") else size)]
    gh, gw = get_anyres_image_grid_shape(size, pinpoints, image_size)
    h, w = unpad_image(torch.empty(1, gh * side, gw * side), size).shape[1:]
    ratio = math.sqrt(h * w / (max_views(vision_aspect_ratio) * side ** 2))
    if ratio > 1.1:
        h, w = int(h // ratio), int(w // ratio)
    return int(gh), int(gw), int(h), int(w)


class LlavaOnevisionAdapter(Adapter):
    def _side(self, model) -> int:
        vc = model.config.vision_config
        return vc.image_size // vc.patch_size

    def _tiled(self, inputs) -> list[bool]:
        """Per image: whether HF tiles it (alone in its row), from ``batch_num_images`` (absent:
        every image is tiled, as HF does without it)."""
        n = len(inputs["image_sizes"])
        per_row = inputs.get("batch_num_images")
        if per_row is None:
            return [True] * n
        return [int(k) == 1 for k in per_row.tolist() for _ in range(int(k))]

    def _grid(self, model, size):
        cfg = model.config
        return tiles_grid(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size, self._side(model),
                          cfg.vision_aspect_ratio)

    def image_views(self, model, inputs):
        side = self._side(model)
        views = []
        for size, tiled in zip(inputs["image_sizes"], self._tiled(inputs)):
            if not tiled:
                views.append([View("base", side, side, trailing=1)])
                continue
            _, _, h, w = self._grid(model, size)
            views.append([View("base", side, side), View("tiles", h, w, newline_per_row=True)])
        return views

    def vision_fields(self, model, inputs, site):
        """Per image: the base crop (raster), then (tiled images) every tile crop, each token
        mapped onto the unpadded tiles grid as HF's ``pack_image_features`` lays crops out."""
        from transformers.models.llava_onevision.modeling_llava_onevision import unpad_image
        side = self._side(model)
        cls = site.startswith("vision.") and site != "vision.out" and \
            hasattr(self.module(model, "vision.embed"), "class_embedding")  # CLIP's CLS; SigLIP has none
        out = []
        for size, tiled in zip(inputs["image_sizes"], self._tiled(inputs)):
            base = raster_fields(side, side, cls=cls)
            if not tiled:
                out.append(base)
                continue
            gh, gw, _, _ = self._grid(model, size)
            ids = torch.arange(gh * gw * side * side, dtype=torch.float64).view(gh, gw, side, side, 1)
            grid = ids.permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)  # HF's crop → grid layout
            kept = unpad_image(grid, [int(x) for x in size.tolist()])[0].long()  # token ids surviving unpadding
            h, w = kept.shape
            tile = torch.full((gh * gw * side * side, 5), -1, dtype=torch.long)
            tile[:, 0], tile[:, 3], tile[:, 4] = 1, h, w
            rr, cc = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            tile[kept.flatten(), 1], tile[kept.flatten(), 2] = rr.flatten(), cc.flatten()
            crops = [base]
            for k in range(gh * gw):
                t = tile[k * side * side:(k + 1) * side * side]
                crops.append(torch.cat([torch.tensor([[1, -1, -1, h, w]]), t]) if cls else t)
            out.append(torch.cat(crops, 0))
        return out, None

    def vision_tokens(self, model, inputs):
        """Crops HF runs through the tower (the padding crops of ``pixel_values`` are dropped)
        times the patches of one crop."""
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches
        cfg = model.config
        crops = sum(image_size_to_num_patches([int(x) for x in size.tolist()], cfg.image_grid_pinpoints,
                                              cfg.vision_config.image_size) if tiled else 1
                    for size, tiled in zip(inputs["image_sizes"], self._tiled(inputs)))
        cls = int(hasattr(self.module(model, "vision.embed"), "class_embedding"))
        return crops * (self._side(model) ** 2 + cls)

    def memory_profile(self, cfg, image_px=(336, 336)):
        """One image of ``image_px`` alone in its row: the base view + its unpadded (and anyres-max
        shrunk) tile grid with one newline per row in the LM; base + tile crops through the tower."""
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches
        v = cfg.get("vision_config", {})
        size, patch = int(v.get("image_size", 384)), int(v.get("patch_size", 14))
        side = size // patch
        pins = cfg.get("image_grid_pinpoints") or [[size, size]]
        _, _, h, w = tiles_grid(list(image_px), pins, size, side, cfg.get("vision_aspect_ratio", "anyres_max_9"))
        crops = image_size_to_num_patches(list(image_px), pins, size)
        n_vis = crops * (side * side + int(v.get("model_type") == "clip_vision_model"))  # CLIP's CLS
        return MemoryFacts(image_tokens=(side * side + h * (w + 1), n_vis), pixel_bytes=crops * 3 * size * size * 4,
                           projector_params=projector_params(cfg))

    def prefill_only_keys(self):
        return (*super().prefill_only_keys(), "batch_num_images")

    def load_processor(self, src, trust_remote_code=False):
        """AutoProcessor; without torchvision it cannot build the video processor, so then build
        the image-only processor from the image processor, the tokenizer and the saved
        processor settings."""
        try:
            proc = super().load_processor(src, trust_remote_code)
        except (AttributeError, ImportError, ValueError, OSError):
            proc = None
        if hasattr(proc, "image_processor"):
            return proc
        import json
        from pathlib import Path

        from transformers import AutoImageProcessor, AutoTokenizer
        tok = AutoTokenizer.from_pretrained(src, local_files_only=True, trust_remote_code=trust_remote_code)
        ip = AutoImageProcessor.from_pretrained(src, local_files_only=True, trust_remote_code=trust_remote_code)
        saved = Path(str(src)) / "processor_config.json"
        kw = json.loads(saved.read_text()) if saved.is_file() else {}
        kw = {k: kw[k] for k in ("num_image_tokens", "vision_feature_select_strategy", "image_token", "video_token",
                                 "vision_aspect_ratio") if k in kw}
        template = getattr(tok, "chat_template", None)
        jinja = Path(str(src)) / "chat_template.jinja"
        if not template and jinja.is_file():
            template = jinja.read_text()
        return image_only_processor(ip, tok, chat_template=template, **kw)


LLAVA_ONEVISION = LlavaOnevisionAdapter(
    name="llava_onevision",
    model_classes=("LlavaOnevisionForConditionalGeneration",),
    sites={**CLIP, **LM},
    shapes={"vision.embed": "(n_crops, P, Dv) base view (+ anyres tiles of an image alone in its row) of every image",
            "vision.blocks.{i}": "(n_crops, P, Dv)", "vision.out": "(n_crops, N, Dv)",
            "projector": "(n_crops, N, D) before unpadding, the anyres-max shrink and image_newline tokens",
            **LM_SHAPES},
    n_layers=N_LAYERS,
    image_inputs={"pixel_values": "image", "image_sizes": "image"},
    model_types=("llava_onevision",),
    chat=ChatFormat("{marker}\n", "<|im_start|>user\n{images}{text}<|im_end|>\n<|im_start|>assistant\n", ""),
)
"""LLaVA-OneVision (Qwen2 LM): ChatML, each image marker followed by a newline."""
