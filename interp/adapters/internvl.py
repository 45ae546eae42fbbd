"""InternVL (InternVLForConditionalGeneration, e.g. InternVL3-8B): an InternViT vision tower (a ViT
with a CLS token and learned absolute position embeddings), pixel shuffle (``downsample_ratio``
0.5: every 2×2 patches become one token of 4·Dv channels), an MLP projector
(``multi_modal_projector``: LayerNorm, Linear, GELU, Linear) and a Qwen2 LM with 1-D RoPE.

Shapes: C crops of all images (flattened, processor order), S the tile side in pixels
(``vision_config.image_size``), p = S / patch patches per side, P = p², s = p / 2 merged tokens
per side (s² = ``image_seq_length``), Dv vision width, D LM width.

Dynamic tiling (HF's ``GotOcr2ImageProcessorPil`` with ``crop_to_patches``): an image is resized
to gw·S × gh·S, the (gh, gw) grid picked by ``get_optimal_tiled_canvas`` from its aspect and
``min_patches``…``max_patches``, and cut into gh·gw tiles in row-major order; when gh·gw > 1 a
thumbnail (the whole image resized to S × S) follows as the last crop. ``pixel_values`` is
(C, 3, S, S): every crop of every image, one after another; HF's processor keeps neither the
images' sizes nor their grids, so the toolkit's processor (:func:`image_only_processor`) adds
``image_sizes`` (n_images, 2) = (h, w) of each image as given — an input HF's InternVL forward
declares (and ignores), so ``model(**inputs)`` and ``model.generate(**inputs)`` take it. The grid
is then exact: each image's crop count C_i is its run of ``<IMG_CONTEXT>`` tokens / s², its
tiles n_i = C_i − 1 (C_i > 1) or 1, and (gh, gw) is HF's own ``get_optimal_tiled_canvas`` for
its size restricted to n_i tiles — the same grid the processor picked among all allowed counts
(the processor's winner has the smallest aspect difference among the grids of its own count and
the same tie rule decides among those).

Prompt: ``<img>`` + ``<IMG_CONTEXT>`` × s²·C_i + ``</img>`` per image; ``<img>`` and ``</img>`` are
text tokens (no cell). LM token order of one image: tile 0's s×s merged tokens in raster order,
tile 1's, … (row-major tiles), then the thumbnail's s×s: two views, ``tiles`` — one
(gh·s)×(gw·s) grid over the whole image, held tile by tile (``View.tile``) — and ``thumbnail``
(s×s over the whole image). A grid cell's tokens are its tile-grid tokens *and* its thumbnail
tokens.

Pixel shuffle (HF's ``InternVLModel.pixel_shuffle`` on the (p, p, Dv) patch grid): merged token
(i, j) — index i·s + j, raster order — holds patches (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1)
(channels [(r % 2)·2Dv + (c % 2)·Dv …]); checked by marking patches in ``tests/test_internvl.py``.

Vision-side token order: per crop, the CLS token then its p×p patches in raster order
(``vision.embed``, ``vision.blocks.{i}``); ``vision.out`` (the projector's input, after the CLS
is dropped and the pixel shuffle) and ``projector`` hold s×s merged tokens per crop in raster
order. Tile k of a (gh, gw) grid covers rows (k // gw)·p… and cols (k % gw)·p… of the image's
(gh·p)×(gw·p) patch grid (view 0); the thumbnail is view 1.
"""
from __future__ import annotations

import math

import torch

from interp.adapters.base import Adapter, ChatFormat, MemoryFacts, View, raster_fields, text_keys
from interp.adapters.llava import LM, LM_SHAPES, N_LAYERS
from spatialbias.errors import SpatialBiasError

SIZES_KEY = "image_sizes"
"""The input the toolkit's processor adds: (n_images, 2) long, each image's (height, width) in pixels."""
MAX_PATCHES = 12
"""HF's and InternVL's default ``max_patches`` (``max_num`` in the authors' code), for the memory
model, which reads a config.json alone."""


def tile_grid(height: int, width: int, tile: int, min_patches: int = 1, max_patches: int = MAX_PATCHES,
              crop_to_patches: bool = True) -> tuple[int, int]:
    """(gh, gw): rows and columns of tiles HF's image processor cuts an image of ``height`` ×
    ``width`` px into (its own ``get_optimal_tiled_canvas``; (1, 1) without tiling)."""
    if not crop_to_patches or max_patches <= 1:
        return 1, 1
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas
    cols, rows = get_optimal_tiled_canvas((int(height), int(width)), (int(tile), int(tile)), int(min_patches),
                                          int(max_patches))
    return int(rows), int(cols)


def crops_of(gh: int, gw: int) -> int:
    """Crops of one image with a (gh, gw) tile grid: the tiles, plus the thumbnail when there are several."""
    return gh * gw + (1 if gh * gw > 1 else 0)


def _pair(x) -> int:
    """One side of a size HF may store as an int or an (h, w) pair (square towers only)."""
    if isinstance(x, (list, tuple)):
        if int(x[0]) != int(x[-1]):
            raise SpatialBiasError(f"InternVL: a non-square vision size {list(x)} is not supported")
        return int(x[0])
    return int(x)


def image_only_processor(image_processor, tokenizer, chat_template=None, image_seq_length: int = 256, **kwargs):
    """InternVL's processor without its video processor (``InternVLVideoProcessor`` needs
    torchvision), whose outputs also carry ``image_sizes`` (n_images, 2): each image's (h, w), from
    which (with its crop count) the adapter recovers the tile grid; checked here against the crops
    the image processor made."""
    from transformers import InternVLProcessor
    from transformers.image_utils import ChannelDimension, get_image_size, infer_channel_dimension_format, \
        make_flat_list_of_images, to_numpy_array

    class InternVLImageOnlyProcessor(InternVLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, image_seq_length=256, chat_template=None, **kw):
            kw.pop("video_processor", None)
            super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                             image_seq_length=image_seq_length, chat_template=chat_template, **kw)

        def __call__(self, images=None, text=None, videos=None, **kw):
            out = super().__call__(images=images, text=text, videos=videos, **kw)
            if images is None:
                return out
            ikw = self._merge_kwargs(tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kw)["images_kwargs"]
            ip = self.image_processor
            size = ikw.get("size") or ip.size
            side = int(size["height"] if isinstance(size, dict) else size.height)
            sizes, n = [], 0
            for im in make_flat_list_of_images(images):
                arr = to_numpy_array(im)
                h, w = get_image_size(arr, channel_dim=infer_channel_dimension_format(arr)
                                      if arr.ndim == 3 else ChannelDimension.LAST)
                sizes.append((int(h), int(w)))
                n += crops_of(*tile_grid(h, w, side, ikw.get("min_patches", ip.min_patches),
                                         ikw.get("max_patches", ip.max_patches),
                                         ikw.get("crop_to_patches", ip.crop_to_patches)))
            if n != len(out["pixel_values"]):
                raise SpatialBiasError(f"InternVL processor: the image processor made {len(out['pixel_values'])} "
                                       f"crops, its tiling predicts {n}")
            out[SIZES_KEY] = torch.tensor(sizes, dtype=torch.long).reshape(-1, 2) \
                if isinstance(out["pixel_values"], torch.Tensor) else sizes
            return out

    return InternVLImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                      image_seq_length=image_seq_length, chat_template=chat_template, **kwargs)


QK_NORM_LMS = ("qwen3",)
"""Text ``model_type`` values of InternVL's LMs whose attention normalises q and k per head."""


class InternVLAdapter(Adapter):
    def _geometry(self, model) -> tuple[int, int]:
        """(p, m): patches per tile side and the pixel-shuffle factor (2 for ``downsample_ratio`` 0.5)."""
        cfg = model.config
        if cfg.vision_feature_select_strategy != "default":
            raise SpatialBiasError(f"InternVL: vision_feature_select_strategy={cfg.vision_feature_select_strategy!r} "
                                   "is not supported (only 'default': the CLS token dropped)")
        vc = cfg.vision_config
        p = _pair(vc.image_size) // _pair(vc.patch_size)
        m = round(1 / float(cfg.downsample_ratio))
        if p % m:
            raise SpatialBiasError(f"InternVL: {p} patches per side do not pixel-shuffle by {m}")
        return p, m

    def _sizes(self, inputs) -> list[tuple[int, int]]:
        """Each image's (h, w) in pixels, from ``image_sizes``."""
        sizes = inputs.get(SIZES_KEY)
        if sizes is None:
            raise SpatialBiasError("InternVL inputs need 'image_sizes' (each image's height and width, which HF's "
                                   "processor drops): build them with LVLM.inputs, whose processor "
                                   "(interp.adapters.internvl.image_only_processor) adds them")
        return [(int(a), int(b)) for a, b in torch.as_tensor(sizes).reshape(-1, 2).tolist()]

    def crop_counts(self, model, inputs) -> list[int]:
        """Crops of each image (processor order): its run of image tokens in ``input_ids`` / s²
        (each image's tokens are one run between ``<img>`` and ``</img>``)."""
        p, m = self._geometry(model)
        per_crop = (p // m) ** 2
        ids = inputs["input_ids"]
        runs = []
        for row in (ids == self.image_token_id(model)).long().cpu():
            edges = torch.diff(torch.cat([row.new_zeros(1), row, row.new_zeros(1)])).nonzero().flatten().tolist()
            runs += [b - a for a, b in zip(edges[::2], edges[1::2])]
        if any(r % per_crop for r in runs) or len(runs) != len(self._sizes(inputs)):
            raise SpatialBiasError(f"InternVL: image-token runs {runs} are not whole crops of {per_crop} tokens, one "
                                   f"per image of image_sizes; were the inputs made by this model's processor?")
        return [r // per_crop for r in runs]

    def tile_grids(self, model, inputs) -> list[tuple[int, int]]:
        """Each image's (gh, gw) tile grid: HF's tiling of its size restricted to its tile count."""
        side = _pair(model.config.vision_config.image_size)
        out = []
        for (h, w), c in zip(self._sizes(inputs), self.crop_counts(model, inputs)):
            n = c - 1 if c > 1 else 1
            gh, gw = tile_grid(h, w, side, n, n)
            if gh * gw != n or (c > 1) != (n > 1):
                raise SpatialBiasError(f"InternVL: {c} crops do not tile an image of {h}x{w} px")
            out.append((gh, gw))
        return out

    def image_counts(self, inputs):
        if "pixel_values" not in inputs:
            return 0
        return len(self._sizes(inputs))

    def _patches(self, inputs, v, images):
        """``pixel_values`` holds every crop of every image in turn: split by each image's crop
        count, read off the batch's image map (an image's share of the image tokens; every crop has
        the same number)."""
        imap = getattr(inputs, "imap", None)
        if imap is None:
            raise SpatialBiasError("InternVL: selecting images needs a validated batch (LVLM.batch(inputs))")
        counts = [int((imap.image[b] == i).sum()) for b in range(imap.image.shape[0])
                  for i in range(int(imap.image[b].max()) + 1)]
        total = sum(counts)
        chunks = v.split([c * v.shape[0] // total for c in counts], 0)
        return torch.cat([chunks[i] for i in images], 0) if images else v[:0]

    def image_views(self, model, inputs):
        """Per image: ``tiles`` — the (gh·s)×(gw·s) merged grid over the whole image, held tile by
        tile — then, with more than one tile, ``thumbnail`` (s×s over the whole image)."""
        p, m = self._geometry(model)
        s = p // m
        views = []
        for gh, gw in self.tile_grids(model, inputs):
            if gh * gw == 1:
                views.append([View("tiles", s, s)])
            else:
                views.append([View("tiles", gh * s, gw * s, tile=(s, s)), View("thumbnail", s, s)])
        return views

    def vision_fields(self, model, inputs, site):
        """Per image: each tile crop (row-major), then the thumbnail; per crop the CLS token
        (``vision.embed``, ``vision.blocks``) then p×p patches in raster order, or s×s merged
        tokens (``vision.out``, ``projector``), each placed on the image's tile grid (view 0) or
        on the thumbnail (view 1)."""
        p, m = self._geometry(model)
        merged = not site.startswith("vision.") or site == "vision.out"
        n = p // m if merged else p
        out = []
        for gh, gw in self.tile_grids(model, inputs):
            crops = []
            for k in range(gh * gw):
                f = raster_fields(n, n, cls=not merged)
                patch = f[:, 1] >= 0
                f[patch, 1] += (k // gw) * n
                f[patch, 2] += (k % gw) * n
                f[:, 3], f[:, 4] = gh * n, gw * n
                crops.append(f)
            if gh * gw > 1:
                crops.append(raster_fields(n, n, view=1, cls=not merged))
            out.append(torch.cat(crops, 0))
        return out, None

    def vision_position_table(self, model):
        """(1 + P, Dv): InternViT's learned position embeddings (row 0 the CLS token's), added to
        every crop as it is (tiles are always S px, so HF never interpolates them)."""
        pe = getattr(self.module(model, "vision.embed"), "position_embeddings", None)
        return pe.detach()[0] if isinstance(pe, torch.Tensor) else None

    def vision_tokens(self, model, inputs):
        """Every crop through the tower: C × (P + 1) (the CLS token included)."""
        p, _ = self._geometry(model)
        return int(inputs["pixel_values"].shape[0]) * (p * p + 1)

    def probe_canvas(self, config, image_processor):
        """The largest k·S (k ≤ √max_patches) that the processor tiles as k×k tiles taken as drawn
        (no resize), preferring k a multiple of 3 so each grid cell is whole tiles (InternVL3's
        default ``max_patches`` 12 and S = 448: 1344 px, one 448 px tile per cell). Tiling is on
        whatever the image processor's own ``crop_to_patches``: HF's ``InternVLProcessor`` passes
        ``crop_to_patches=True`` by default."""
        size = getattr(image_processor, "size", None) or {}
        side = int(size["height"] if isinstance(size, dict) else getattr(size, "height", 0) or 0) or \
            _pair(config.vision_config.image_size)
        lo = int(getattr(image_processor, "min_patches", 1) or 1)
        hi = int(getattr(image_processor, "max_patches", 1) or 1)
        ks = [k for k in range(1, math.isqrt(hi) + 1)
              if tile_grid(k * side, k * side, side, lo, hi) == (k, k)]
        if not ks:
            return side
        thirds = [k for k in ks if k % 3 == 0]
        return max(thirds or ks) * side

    def memory_profile(self, cfg, image_px=(448, 448)):
        """One image of ``image_px`` tiled as HF's processor does with its default ``max_patches``
        (12): C crops (tiles + thumbnail) of s² LM tokens and P + 1 vision tokens each; the
        projector LayerNorm(4Dv) + Linear(4Dv → D) + Linear(D → D); q/k norms where the LM is
        Qwen3 (InternVL3.5; InternVL3's Qwen2 has none)."""
        v = cfg.get("vision_config", {})
        S, patch = _pair(v.get("image_size", 448)), _pair(v.get("patch_size", 14))
        p = S // patch
        m = round(1 / float(cfg.get("downsample_ratio", 0.5)))
        gh, gw = tile_grid(int(image_px[0]), int(image_px[1]), S)
        crops = crops_of(gh, gw)
        D = int(text_keys(cfg.get("text_config", {}))["hidden_size"])
        Dv = int(v.get("hidden_size", 1024))
        proj = 2 * m * m * Dv + (m * m * Dv + 1) * D + (D + 1) * D
        return MemoryFacts(image_tokens=(crops * (p // m) ** 2, crops * (p * p + 1)),
                           pixel_bytes=crops * 3 * S * S * 4, projector_params=proj,
                           qk_norm=(cfg.get("text_config") or {}).get("model_type") in QK_NORM_LMS)

    def load_processor(self, src, trust_remote_code=False):
        """The image-only processor (:func:`image_only_processor`) rebuilt from the checkpoint's
        tokenizer, image processor (``GotOcr2ImageProcessorPil``: PIL/numpy, no torchvision) and
        saved ``image_seq_length`` and chat template: HF's ``InternVLProcessor`` needs a video
        processor (torchvision) and would not add ``image_sizes``."""
        from transformers import GotOcr2ImageProcessorPil

        from interp.adapters.saved import rebuild_processor
        return rebuild_processor(src, "InternVL", GotOcr2ImageProcessorPil, image_only_processor, trust_remote_code,
                                 files=("processor_config.json", "preprocessor_config.json"))


INTERNVL = InternVLAdapter(
    name="internvl",
    model_classes=("InternVLForConditionalGeneration",),
    sites={"vision.embed": "model.vision_tower.embeddings",
           "vision.blocks.{i}": "model.vision_tower.encoder.layer.{i}",
           "projector": "model.multi_modal_projector", **LM},
    shapes={"vision.embed": "(C, 1 + P, Dv) CLS then patches (position embeddings added) of every crop: each "
                            "image's tiles (row-major), then its thumbnail",
            "vision.blocks.{i}": "(C, 1 + P, Dv)",
            "vision.out": "(C, P/4, 4·Dv) what the projector reads: CLS dropped, 2×2 patches pixel-shuffled into one "
                          "token, merged raster order",
            "projector": "(C, P/4, D) the image tokens of every crop, scattered in that order over <IMG_CONTEXT>",
            **LM_SHAPES},
    n_layers=N_LAYERS,
    image_inputs={"pixel_values": "patches", SIZES_KEY: "image"},
    model_types=("internvl",),
    chat=ChatFormat("{marker}\n", "<|im_start|>user\n{images}{text}<|im_end|>\n<|im_start|>assistant\n", ""),
)
"""InternVL (HF's ``-hf`` checkpoints): ChatML, each ``<IMG_CONTEXT>`` marker followed by a newline
(the HF processor expands it to ``<img>`` + the image's context tokens + ``</img>``)."""
