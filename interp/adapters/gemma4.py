"""Gemma4 (Gemma4ForConditionalGeneration, e.g. gemma-4-31B-it, gemma-4-26B-A4B-it): a ViT over
p×p pixel patches (16 px in Gemma4) with a learned 2-D position table *and* 2-D (axial) RoPE in
every block, average pooling of k×k patches (k = ``pooling_kernel_size``, 3 in Gemma4) into soft
tokens, a projector (``model.embed_vision``: a scale-free RMSNorm then one Linear Dv → D) and a
Gemma4 LM with interleaved sliding-window and full attention layers of different head sizes
(``head_dim`` / ``global_head_dim``; full layers may take their values from their keys,
``attention_k_eq_v``), one rotary per layer type (called by name as Gemma3's: ``lm.rotary@…``)
and final-logit softcapping.

Shapes: n images, P = ``max_soft_tokens``·k² patch slots per image (the processor pads every
image to P; padding slots have position (−1, −1)), Dv vision width, D LM width; an image resized
to H×W px has h = H/p rows and w = W/p columns of patches and (h/k)×(w/k) soft tokens; N the
soft tokens of all images of the batch.

Images: HF's ``Gemma4ImageProcessorPil`` (PIL/numpy, no torchvision) resizes each image keeping
its aspect ratio to the largest size with at most P patches whose sides are multiples of k·p px,
patchifies it in raster order and pads to P; ``image_position_ids`` (n, P, 2) hold each slot's
(x, y) patch coordinate. The grid of every image is read from them (max x + 1, max y + 1), so
the token maps need no image size. HF's ``Gemma4Processor`` also needs an audio feature
extractor and a video processor (torchvision); the toolkit's processor
(:func:`image_only_processor`) has neither.

Prompt: the marker ``<|image|>`` (the processor's ``image_token``) becomes ``<|image>`` + (h/k)(w/k)
``<|image|>`` soft tokens + ``<image|>``; the two delimiters are text (no cell). LM token order of
an image: its soft tokens in raster order (one view). Vision-side order: ``vision.embed`` and
``vision.blocks.{i}`` hold (n, P, Dv), each image's patch slots in processor order (raster, then
padding, which maps to no patch); ``vision.out`` (the pooled soft tokens, padding slots dropped)
and ``projector`` hold (N, ·): every image's soft tokens in raster order, images one after
another — HF pools patch (x, y) into soft token (y // k)·(w/k) + x // k.

Attention: with ``use_bidirectional_attention="vision"`` (Gemma4's checkpoints) HF lets the
tokens of one image attend to each other in the *sliding* layers (full layers stay causal) only
when ``mm_token_type_ids`` is passed; without it the image is read causally and the logits differ.
The processor returns it; inputs without it (or whose ids do not mark exactly the image tokens)
are refused here in one line, so every run is what HF runs.

The small checkpoints (gemma-4-E2B/E4B) have per-layer embeddings (``hidden_size_per_layer_input``
> 0), which the text model computes from the LM input *before* block 0, and KV-sharing layers
(``num_kv_shared_layers`` > 0), which read earlier layers' keys and values through a per-forward
dict: both as Gemma3n's (:mod:`interp.adapters.per_layer`: ``lm.input`` is the text model's
``inputs_embeds``, residual patches carry the per-layer inputs and reused keys and values, a
resumed run enters and hands them over). HF runs the KV-sharing layers on the last position only
when ``logits_to_keep`` is an integer; the engine asks for the last logits with a tensor index
(:meth:`Gemma4Adapter.last_logits`), so hooks there always see the whole sequence.
"""
from __future__ import annotations

import torch

from interp.adapters.base import ChatFormat, MemoryFacts, View, raster_fields, text_keys
from interp.adapters.gemma3 import Gemma3Adapter
from interp.adapters.llava import LM, LM_SHAPES, N_LAYERS
from interp.adapters.memory_facts import LayerKind
from interp.adapters.per_layer import PerLayerInputs, SharedKV, per_layer_params
from spatialbias.errors import SpatialBiasError

POSITIONS_KEY = "image_position_ids"
"""(n, P, 2) long: each patch slot's (x, y) coordinate, (−1, −1) for padding (HF's processor)."""
TYPES_KEY = "mm_token_type_ids"
"""(B, L) long: 1 at image tokens, 0 elsewhere (HF's processor); switches on the bidirectional image mask."""
MAX_SOFT_TOKENS = 280
"""HF's default ``max_soft_tokens`` (soft tokens per image at most), for the memory model, which
reads a config.json alone."""


def image_only_processor(image_processor, tokenizer, chat_template=None, image_seq_length: int = 280, **kwargs):
    """Gemma4's processor without its audio feature extractor and video processor (the video
    processor needs torchvision, and HF's check of the feature extractor's class fails without
    it): images and text only, returning ``input_ids``, ``attention_mask``, ``mm_token_type_ids``,
    ``pixel_values`` (n, P, 3p²) and ``image_position_ids`` (n, P, 2)."""
    from transformers import Gemma4Processor
    from transformers.processing_utils import ProcessorMixin

    class Gemma4ImageOnlyProcessor(Gemma4Processor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, image_seq_length=280, **kw):
            for k in ("feature_extractor", "video_processor", "audio_seq_length", "audio_ms_per_token"):
                kw.pop(k, None)
            self.image_seq_length = image_seq_length
            self.image_token, self.image_token_id = tokenizer.image_token, tokenizer.image_token_id
            self.boi_token, self.eoi_token = tokenizer.boi_token, tokenizer.eoi_token
            self.video_token = self.video_token_id = None
            self.audio_seq_length, self.audio_ms_per_token = 750, 40
            self.audio_token = self.audio_token_id = None
            # HF's validate_inputs refuses any call when these are unset, audio or not
            self.boa_token = getattr(tokenizer, "boa_token", None) or tokenizer.boi_token
            self.eoa_token = getattr(tokenizer, "eoa_token", None) or tokenizer.eoi_token
            ProcessorMixin.__init__(self, image_processor=image_processor, tokenizer=tokenizer,
                                    chat_template=chat_template, **kw)

    return Gemma4ImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template,
                                    image_seq_length=image_seq_length, **kwargs)


def soft_grid(positions: torch.Tensor, k: int) -> tuple[int, int, int, int]:
    """(h, w, h/k, w/k) of one image from its (P, 2) patch positions (x, y; padding −1)."""
    valid = (positions >= 0).all(-1)
    if not bool(valid.any()):
        raise SpatialBiasError("Gemma4: an image has no patch positions (all padding) in image_position_ids")
    w = int(positions[valid, 0].max()) + 1
    h = int(positions[valid, 1].max()) + 1
    if h % k or w % k or int(valid.sum()) != h * w:
        raise SpatialBiasError(f"Gemma4: an image's {int(valid.sum())} patches do not form an {h}x{w} grid that "
                               f"pools by {k}; were the inputs made by this model's processor?")
    return h, w, h // k, w // k


class Gemma4Adapter(PerLayerInputs, SharedKV, Gemma3Adapter):
    """Gemma3's rotary facts (one rotary per layer type, named calls); per-layer inputs and shared
    keys and values where the checkpoint has them; Gemma4's own vision side, token maps and input checks."""

    def last_logits(self, model, length):
        """HF's Gemma4 text model runs its KV-sharing layers on the last ``logits_to_keep`` positions
        only when that is an integer (``_maybe_slice_kv_shared_inputs``): hooks there would see a
        truncated sequence. The last position's index as a tensor keeps every layer whole."""
        if self.kv_sources(model):
            return {"logits_to_keep": torch.tensor([length - 1])}
        return super().last_logits(model, length)

    def _k(self, model) -> int:
        return int(model.config.vision_config.pooling_kernel_size)

    def _positions(self, inputs) -> torch.Tensor:
        pos = inputs.get(POSITIONS_KEY)
        if pos is None:
            raise SpatialBiasError("Gemma4 inputs need 'image_position_ids' (each patch slot's x, y), which the "
                                   "processor returns; build inputs with LVLM.inputs")
        return pos

    def grids(self, model, inputs) -> list[tuple[int, int, int, int]]:
        """Per image (processor order): (h, w, h/k, w/k) patches and soft tokens per column and row."""
        k = self._k(model)
        return [soft_grid(p, k) for p in self._positions(inputs).cpu()]

    def image_views(self, model, inputs):
        """Per image one view: its (h/k)×(w/k) soft tokens in raster order. Checks that
        ``mm_token_type_ids`` is given and marks exactly the image tokens (refused otherwise)."""
        types = inputs.get(TYPES_KEY)
        ids = inputs["input_ids"]
        if types is None:
            raise SpatialBiasError("Gemma4 inputs need 'mm_token_type_ids' (1 at image tokens): without it HF reads "
                                   "the image causally instead of bidirectionally; build inputs with LVLM.inputs")
        if not torch.equal(torch.as_tensor(types).to(ids.device) == 1, ids == self.image_token_id(model)):
            raise SpatialBiasError("Gemma4: mm_token_type_ids does not mark exactly the image tokens of input_ids; "
                                   "build inputs with LVLM.inputs")
        return [[View("soft", r, c)] for _, _, r, c in self.grids(model, inputs)]

    def vision_fields(self, model, inputs, site):
        """``vision.embed`` / ``vision.blocks.{i}``: per image its P patch slots in processor order,
        each at its (y, x) on the h×w patch grid (padding slots: row and column −1);
        ``vision.out`` / ``projector``: per image its soft tokens in raster order on the
        (h/k)×(w/k) grid (padding slots are dropped by HF's pooler)."""
        if site.startswith("vision."):
            if site == "vision.out":
                return [raster_fields(r, c) for _, _, r, c in self.grids(model, inputs)], None
            out = []
            for pos, (h, w, _, _) in zip(self._positions(inputs).cpu(), self.grids(model, inputs)):
                pos = pos.long()
                pad = (pos < 0).any(-1)
                f = torch.stack([torch.zeros_like(pos[:, 0]), pos[:, 1], pos[:, 0], torch.full_like(pos[:, 0], h),
                                 torch.full_like(pos[:, 0], w)], 1)
                f[pad, 1:3] = -1
                out.append(f)
            return out, None
        return [raster_fields(r, c) for _, _, r, c in self.grids(model, inputs)], None

    def vision_position_table(self, model):
        """None: Gemma4's vision position code is a learned 2-D table (an x row plus a y row per
        patch, added at ``vision.embed``) *and* 2-D rotary embeddings in every block; swapping the
        table alone would leave the rotary half in place, so the vision-side position patch
        reports n/a rather than a partial swap."""
        return None

    def vision_tokens(self, model, inputs):
        """Every patch slot of every image runs through the tower, padding included: n × P."""
        px = inputs["pixel_values"]
        return int(px.shape[0]) * int(px.shape[1])

    def probe_canvas(self, config, image_processor):
        """The side HF's resize maps every square image to (so a square probe drawn at it is taken
        as drawn): ⌊√P / k⌋·k·p px for P = ``max_soft_tokens``·k² (768 px for Gemma4's 16 px
        patches, k = 3, 280 soft tokens: 16×16 soft tokens; 64 px on the tiny model)."""
        from transformers.models.gemma4.image_processing_pil_gemma4 import get_aspect_ratio_preserving_size
        vc = config.vision_config
        p = int(getattr(image_processor, "patch_size", None) or vc.patch_size)
        k = int(getattr(image_processor, "pooling_kernel_size", None) or vc.pooling_kernel_size)
        soft = int(getattr(image_processor, "max_soft_tokens", None) or MAX_SOFT_TOKENS)
        side, _ = get_aspect_ratio_preserving_size(1000, 1000, p, soft * k * k, k)
        return int(side)

    def memory_profile(self, cfg, image_px=(768, 768)):
        """One image of ``image_px`` resized as HF's processor does at its default 280 soft tokens:
        (h/k)(w/k) LM tokens, P = 280·k² patch slots through the tower (padding included),
        P·3p² fp32 pixels; the projector one Linear Dv → D; Gemma's 4 norms per block, q/k norms
        and the scale-free v norm; full-attention layers at their own head size and key/value
        heads (:func:`layer_kinds`); with ``enable_moe_block`` (26B-A4B) the router and experts
        beside every block's dense MLP (:func:`moe_facts`); per-layer embeddings and KV-sharing layers
        where the checkpoint has them (:func:`small_facts`, :func:`layer_kinds`)."""
        from transformers.models.gemma4.image_processing_pil_gemma4 import get_aspect_ratio_preserving_size
        v = cfg.get("vision_config", {}) or {}
        p, k = int(v.get("patch_size", 16)), int(v.get("pooling_kernel_size", 3))
        P = MAX_SOFT_TOKENS * k * k
        H, W = get_aspect_ratio_preserving_size(int(image_px[0]), int(image_px[1]), p, P, k)
        t = text_keys(cfg.get("text_config", {}) or {})
        D = int(t["hidden_size"])
        return MemoryFacts(image_tokens=((H // p // k) * (W // p // k), P), pixel_bytes=P * 3 * p * p * 4,
                           projector_params=int(v.get("hidden_size", 768)) * D, qk_norm=True, v_norm=True,
                           lm_layer_kinds=layer_kinds(t), **{"block_norms": 4, **small_facts(t)}, **moe_facts(t))

    def load_processor(self, src, trust_remote_code=False):
        """The image-only processor (:func:`image_only_processor`) rebuilt from the checkpoint's
        tokenizer, image processor (``Gemma4ImageProcessorPil``) and chat template: HF's
        ``Gemma4Processor`` needs a video processor (torchvision) and an audio feature extractor."""
        from transformers import Gemma4ImageProcessorPil

        from interp.adapters.saved import rebuild_processor
        return rebuild_processor(src, "Gemma4", Gemma4ImageProcessorPil, image_only_processor, trust_remote_code)


GEMMA4 = Gemma4Adapter(
    name="gemma4",
    model_classes=("Gemma4ForConditionalGeneration",),
    sites={"vision.embed": "model.vision_tower.patch_embedder",
           "vision.blocks.{i}": "model.vision_tower.encoder.layers.{i}",
           "projector": "model.embed_vision", **LM},
    shapes={"vision.embed": "(n, P, Dv) patch embeddings + the learned 2-D position table (x row + y row; zero on "
                            "padding slots), each image's P slots in processor order",
            "vision.blocks.{i}": "(n, P, Dv)",
            "vision.out": "(N, Dv) what the projector reads: k×k patches average-pooled and scaled by √Dv, padding "
                          "dropped, every image's soft tokens in raster order",
            "projector": "(N, D) the soft tokens of all images, scattered in that order over the <|image|> tokens",
            **LM_SHAPES,
            "lm.blocks.{i}.attn.heads": "(B, L, H, head_dim) per-head outputs; head_dim is the layer type's "
                                        "(head_dim on sliding layers, global_head_dim on full ones)",
            "lm.rotary": "(cos, sin), each (B, L, head_dim of the layer type); one call per layer type "
                         "(@sliding_attention, @full_attention)",
            "lm.embed": "(B, L, D) token embeddings (scaled by sqrt(D)) before the image scatter",
            "unembed": "(B, L, V) logits before the final softcapping (HF's logits: cap·tanh(z / cap))"},
    n_layers=N_LAYERS,
    image_inputs={"pixel_values": "image", POSITIONS_KEY: "image"},
    model_types=("gemma4",),
    chat=ChatFormat("{marker}", "<|turn>user\n{images}{text}<turn|>\n<|turn>model\n", ""),
)
"""Gemma4; its published chat format (``<|turn>user … <turn|>``, ``<|image|>`` where an image goes)."""

def layer_kinds(t: dict) -> tuple[LayerKind, ...]:
    """The LM layers whose blocks differ from the config-wide ones, grouped: attention at another
    ``head_dim`` / ``num_key_value_heads`` — from the saved ``per_layer_config`` (HF's ``to_dict``:
    {index: overrides}), else from the published keys (``global_head_dim``, and
    ``num_global_key_value_heads`` where ``attention_k_eq_v``) on the ``full_attention`` layers of
    ``layer_types`` — and the last ``num_kv_shared_layers``, which keep no keys and values of their
    own and, with ``use_double_wide_mlp``, have MLPs twice ``intermediate_size`` wide."""
    n = int(t.get("num_hidden_layers") or 0)
    per = t.get("per_layer_config")
    if per is None:
        over = {"head_dim": t.get("global_head_dim", 512)}
        if t.get("attention_k_eq_v", True) and t.get("num_global_key_value_heads") is not None:
            over["num_key_value_heads"] = t["num_global_key_value_heads"]
        per = {i: over for i, kind in enumerate(t.get("layer_types") or []) if kind == "full_attention"}
    per = {int(i): over for i, over in per.items() if isinstance(over, dict)}
    shared_from = n - int(t.get("num_kv_shared_layers") or 0)
    wide = 2 * int(t["intermediate_size"]) if t.get("use_double_wide_mlp") else None
    counts: dict[tuple, int] = {}
    for i in range(n):
        over, shared = per.get(i, {}), i >= shared_from
        key = (over.get("head_dim"), over.get("num_key_value_heads"), shared)
        if key != (None, None, False):
            counts[key] = counts.get(key, 0) + 1
    return tuple(LayerKind(c, head_dim=hd, kv_heads=kv, own_kv=not shared, ffn=wide if shared else None)
                 for (hd, kv, shared), c in sorted(counts.items(), key=str))


def small_facts(t: dict) -> dict:
    """The facts of the small checkpoints' structures as :class:`MemoryFacts` keyword arguments ({}
    without them). Per-layer embeddings (``hidden_size_per_layer_input`` P > 0, E2B/E4B): per block
    the gate's output and the per-layer input it multiplies (2 P at the model dtype) and one more
    width-D norm input in fp32 (measured with saved-tensor hooks, tests/test_bench_scale.py);
    parameters: :func:`~interp.adapters.per_layer.per_layer_params`. Double-wide MLPs on the
    ``num_kv_shared_layers`` (``use_double_wide_mlp``): 3 D·F more parameters each."""
    P, shared = int(t.get("hidden_size_per_layer_input") or 0), int(t.get("num_kv_shared_layers") or 0)
    if not P and not (shared and t.get("use_double_wide_mlp")):
        return {}
    wide = 3 * int(t["hidden_size"]) * int(t["intermediate_size"]) * shared if t.get("use_double_wide_mlp") else 0
    if not P:
        return {"other_params": wide}
    return {"block_norms": 5, "lm_block_extra": (2 * P, 0, 0), "other_params": per_layer_params(t) + wide}


def moe_facts(t: dict) -> dict:
    """The MLP facts of a Gemma4 LM with ``enable_moe_block`` (every block: the dense MLP, then a
    router and ``num_experts`` = E experts of width ``moe_intermediate_size`` = Fe, top
    ``top_k_experts`` = k per token, on the block's MLP input; the two outputs, each normed, are
    summed), as :class:`MemoryFacts` keyword arguments; {} for a dense LM. Per token, with frozen
    parameters and HF's default ``grouped_mm`` experts, autograd keeps (counted with saved-tensor
    hooks, tests/test_bench_scale.py) beside the dense MLP's 3 F at the model dtype:

    * the experts' 3 k·Fe (gate·up output, the activation of the gate) and k·D (their outputs,
      before the routing weights multiply them) and the k gathered per-expert scales, model dtype;
    * at 4 bytes: the fp32 inputs of the two new norms on fresh tensors (the experts' output and
      the sum, 2 D; the dense output's norm stands where the dense block's post-MLP norm was),
      the router's fp32 softmax (E), top-k indices (int64, 2k), weights and their sum (k + 1),
      the expert sort's three int64 permutations (6k) and the sorted weights (k);
    * below fp32, 2 D more: the router's and the experts' pre-norms each keep an fp32 copy of the
      MLP input (in fp32 it is the tensor the dense MLP's pre-norm keeps already).

    HF's ``eager`` experts loop (``experts_implementation="eager"``) keeps about k·D more at the
    model dtype: 4062 / 2014 bytes per token more on the test's block (D = 256, k = 4; fp32 / bf16),
    which this term does not count.

    Live at the MLP's peak (not measured): the dense output, its normed copy and the experts'
    normed input (3 D) plus the experts' max(k(D + 3 Fe), 4 k·D) (as Qwen3-VL-MoE's), or 3 F;
    parameters per block 3 D·F + E·(3 D·Fe + D) + D + E (dense MLP, experts, router)."""
    if not t.get("enable_moe_block"):
        return {}
    D, F, n = int(t["hidden_size"]), int(t["intermediate_size"]), int(t["num_hidden_layers"])
    E, k, Fe = (int(t.get(key) or 0) for key in ("num_experts", "top_k_experts", "moe_intermediate_size"))
    if not (E and k and Fe):
        raise SpatialBiasError(f"Gemma4 config with enable_moe_block needs num_experts, top_k_experts and "
                               f"moe_intermediate_size (got {E or None}, {k or None}, {Fe or None})")
    return {"lm_mlp_saved": 3 * F + 3 * k * Fe + k * D + k, "lm_mlp_fp32": 2 * D + E + 10 * k + 1,
            "lm_mlp_fp32_upcast": 2 * D, "lm_mlp_live": max(3 * F, 3 * D + max(k * (D + 3 * Fe), 4 * k * D)),
            "lm_mlp_params": n * (3 * D * F + E * (3 * D * Fe + D) + D + E)}


__all__ = ["GEMMA4", "Gemma4Adapter", "image_only_processor", "layer_kinds", "moe_facts", "soft_grid"]
