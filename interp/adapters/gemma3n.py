"""Gemma3n (Gemma3nForConditionalGeneration, e.g. gemma-3n-E4B-it): timm's MobileNetV5 as the vision
tower (768 px → a 16×16 map of soft tokens), a soft-token embedder as the projector, and a Gemma3n
LM with four AltUp residual streams, per-layer inputs, LAuReL, sliding/full attention layers (one
rotary per layer type, named calls as Gemma3's) and layers that reuse earlier layers' keys and values.

Shapes: n images, h×w = ``vision_soft_tokens_per_image`` soft tokens per image (16×16), Dv the
tower's width, D the LM width, S = ``altup_num_inputs`` streams (4), N LM blocks, P
``hidden_size_per_layer_input``.

* ``lm.input`` is the text model's ``inputs_embeds`` (B, L, D): the embeddings with the image's
  soft tokens scattered in. The text model derives everything else from it *before* block 0 and
  outside every block — each layer's per-layer input (a projection of it plus a per-token table)
  and the S streams (stream 0 is it, streams 1… projections of it) — so an edit there (AGCI,
  patching) reaches all of them, as HF computes them.
* ``lm.blocks.{i}`` / ``lm.blocks.{i}#input``: HF holds the block state as (S, B, L, D); every
  runner sees it as (B, L, S·D) (:meth:`~interp.adapters.Adapter.merge_streams`). After the last
  block the text model un-projects streams 1… and averages the S streams
  (:meth:`Gemma3nAdapter.readout`) before ``lm.final_norm``.
* ``lm.blocks.{i}#per_layer_input`` (B, L, P): what block i reads beside the streams. A patch of
  the stream (``lm.blocks.{i}``, ``lm.blocks.{i}#input``) carries the source's per-layer inputs of
  the blocks still to come at its tokens, as DeepStack features are carried on Qwen3-VL
  (:meth:`~interp.adapters.Adapter.carried`); at ``lm.input`` the model derives them itself.
* Layers ``N − num_kv_shared_layers``… compute no keys and values: each reads those of the last
  earlier layer of its type (:meth:`kv_sources`); a resumed run hands them over.
* ``projector`` (``model.embed_vision``): the module also embeds the vision vocabulary's hard
  tokens (a call with ``input_ids``) in every forward; ``projector`` and ``vision.out`` name its
  soft-token call (``@image``) unless another is named (``projector@tokens``). ``vision.out``:
  (n, h·w, Dv) the tower's map in raster order, scaled by √Dv; ``projector``: (n, h·w, D).
  The tower is a convolutional network (timm): no canonical ``vision.blocks.{i}`` and no learned
  position table (the vision-side position patch is refused); ``module:`` reaches its layers.
* Attention over image tokens is causal (HF passes no bidirectional mask).

Loading a checkpoint needs timm (and so torchvision) for the tower; without it
:func:`interp.load` refuses in one line naming the fix. A model built in memory loads with any
tower that keeps MobileNetV5's interface (the tiny one: :mod:`interp.tiny.gemma3n`).
"""
from __future__ import annotations

import importlib.util
import math

import torch

from interp.adapters.base import ChatFormat, MemoryFacts, View, get_module, raster_fields
from interp.adapters.gemma3 import Gemma3Adapter
from interp.adapters.llava import LM, LM_SHAPES
from interp.adapters.memory_facts import LayerKind
from interp.adapters.per_layer import TEXT_MODEL, PerLayerInputs, SharedKV, per_layer_params
from spatialbias.errors import SpatialBiasError


class Gemma3nAdapter(PerLayerInputs, SharedKV, Gemma3Adapter):
    """Gemma3's rotary facts (one rotary per layer type); per-layer inputs and shared keys and
    values (:mod:`interp.adapters.per_layer`); Gemma3n's AltUp streams, readout and soft-token
    vision side."""

    # ---------------------------------------------------------------- the LM's own structure
    def streams(self, model):
        return int(model.config.text_config.altup_num_inputs)

    def readout(self, model, h):
        """(…, D) from the last block's (…, S·D): streams 1… un-projected and scaled to stream 0's
        RMS, then the S streams averaged (HF's ``Gemma3nTextModel.forward`` after its layer loop)."""
        tm, S = get_module(model, TEXT_MODEL), self.streams(model)
        xs = h.unflatten(-1, (S, h.shape[-1] // S)).unbind(-2)
        return torch.stack(_rms_matched(xs[0], [p(x) for p, x in zip(tm.altup_unembed_projections, xs[1:])])).mean(0)

    def enter(self, model, x, part):
        """Block 0's input (R, Lq, S·D) — stream 0 is ``x`` (R, Lq, D), streams 1… its projections
        scaled to its RMS — and every block's per-layer input (R, Lq, P) from ``x`` and ``part``
        (:meth:`PerLayerInputs.per_layer_entry`). HF's ``Gemma3nTextModel.forward`` before its
        layer loop; all per token."""
        tm, S = get_module(model, TEXT_MODEL), self.streams(model)
        streams = _rms_matched(x, [p(x) for p in tm.altup_projections[:S - 1]])
        return self.merge_streams(torch.stack(streams)), self.per_layer_entry(model, x, part)

    # ---------------------------------------------------------------- calls
    def call_label(self, site, args, kwargs):
        """The rotary's calls by layer type; the embedder's by what it embeds (soft tokens: ``image``)."""
        if site in ("projector", "vision.out"):
            return "image" if kwargs.get("inputs_embeds") is not None else "tokens"
        return super().call_label(site, args, kwargs)

    def default_call(self, site):
        return "image" if site in ("projector", "vision.out") else None

    # ---------------------------------------------------------------- vision side
    def layer_count(self, model, stack):
        return 0 if stack == "vision" else super().layer_count(model, stack)

    def _side(self, model) -> int:
        n = int(model.config.vision_soft_tokens_per_image)
        side = math.isqrt(n)
        if side * side != n:
            raise SpatialBiasError(f"vision_soft_tokens_per_image={n} is not a square grid; Gemma3n's tower makes one")
        return side

    def image_views(self, model, inputs):
        side = self._side(model)
        return [[View("soft", side, side)] for _ in range(inputs["pixel_values"].shape[0])]

    def vision_fields(self, model, inputs, site):
        if site not in ("vision.out", "projector"):
            raise SpatialBiasError(f"{site}: Gemma3n's vision tower (timm) has no canonical token sites; use "
                                   "vision.out, projector or a module: path")
        side = self._side(model)
        return [raster_fields(side, side)] * inputs["pixel_values"].shape[0], None

    def vision_position_table(self, model):
        return None

    def vision_tokens(self, model, inputs):
        return self._side(model) ** 2 * int(inputs["pixel_values"].shape[0])

    def probe_canvas(self, config, image_processor):
        size = getattr(image_processor, "size", None) or {}
        return int(size.get("height", 768))

    def load_requirements(self) -> str | None:
        """Why a checkpoint cannot be loaded here (None: it can): the tower needs timm."""
        if importlib.util.find_spec("timm") is None:
            return ("its vision tower is timm's MobileNetV5 and timm is not installed (timm needs torchvision): "
                    "install both as CPU/GPU wheels matching this torch, e.g. pip install timm torchvision "
                    "--index-url https://download.pytorch.org/whl/cpu; or build the model in memory and pass it "
                    "to interp.load(model, processor)")
        return None

    # ---------------------------------------------------------------- memory
    def memory_profile(self, cfg, image_px=(768, 768)):
        """``vision_soft_tokens_per_image`` soft tokens per image in the LM; through the tower the
        same count is assumed (its convolutional stages hold more positions at lower widths; the
        memory model's vision term is a lower bound here); 3 × 768² fp32 pixels; the embedder's
        Dv·D projection; per LM block 8 width-D norm inputs kept in fp32 (input, LAuReL, post-attention,
        pre/post-MLP, per-layer input, AltUp's two router norms) and q/k/v norms; beyond them AltUp keeps
        the block's S-stream input and its correction (2·S·D), its coefficients (S² + S) and the
        per-layer gate 2·P at the model dtype, the routers' modalities (2·S) in fp32, and in an fp32
        model (S − 2)·D more (its norms' inputs are views of the S-stream tensors: measured with
        saved-tensor hooks, tests/test_bench_scale.py); S streams between blocks; the last
        ``num_kv_shared_layers`` blocks keep no keys and values."""
        n = int(cfg.get("vision_soft_tokens_per_image", 256))
        t, v = cfg.get("text_config", {}), cfg.get("vision_config", {})
        shared = int(t.get("num_kv_shared_layers", 0) or 0)
        Dv, D = int(v.get("hidden_size", 2048)), int(t.get("hidden_size", 2048))
        S, P = int(t.get("altup_num_inputs", 4)), int(t.get("hidden_size_per_layer_input", 256))
        return MemoryFacts(image_tokens=(n, n), pixel_bytes=3 * 768 * 768 * 4,
                           projector_params=int(v.get("vocab_size", 128)) * Dv + Dv * D,
                           block_norms=8, qk_norm=True, v_norm=True, lm_streams=S,
                           lm_block_extra=(2 * S * D + 2 * P + S * S + S, 2 * S, (S - 2) * D),
                           lm_layer_kinds=(LayerKind(count=shared, own_kv=False),) if shared else (),
                           other_params=other_params(cfg))


def other_params(cfg: dict) -> int:
    """Parameters of a Gemma3n config.json beyond the memory model's count from the shapes: the
    per-layer inputs' (:func:`~interp.adapters.per_layer.per_layer_params`), AltUp's stream
    projections and per-layer coefficients and LAuReL (per layer S³ + S² + D·S + 2·D·r), less the
    keys and values the shared-KV layers lack; the audio
    tower (≈ 24·Da² per conformer block: two 4× feed-forwards, attention with its relative-position
    projection, the light convolution) and its embedder; the vision tower's size from its timm name
    (``mobilenetv5_300m_enc``: 300 M)."""
    import re
    t, a, v = cfg.get("text_config", {}), cfg.get("audio_config", {}), cfg.get("vision_config", {})
    D, N = int(t["hidden_size"]), int(t["num_hidden_layers"])
    S, r = int(t.get("altup_num_inputs", 4)), int(t.get("laurel_rank", 64))
    hd = int(t.get("head_dim") or D // int(t["num_attention_heads"]))
    kv = int(t.get("num_key_value_heads") or t["num_attention_heads"])
    text = (per_layer_params(t) + 2 * (S - 1) * D * D + N * (S ** 3 + S * S + D * S + 2 * D * r)
            - int(t.get("num_kv_shared_layers", 0)) * 2 * D * kv * hd)
    Da = int(a.get("hidden_size", 1536))
    audio = 24 * Da * Da * int(a.get("conf_num_hidden_layers", 12)) + int(a.get("vocab_size", 128)) * Da + Da * D
    m = re.search(r"_(\d+)m(_|$)", str(v.get("architecture", "")))
    return text + audio + (int(m.group(1)) * 10 ** 6 if m else 0)


def _rms_matched(first: torch.Tensor, others: list[torch.Tensor]) -> list[torch.Tensor]:
    """``first`` (…, D) and each of ``others`` (…, D) scaled per token to ``first``'s RMS (its own
    clamped at 1e-5), as HF's text model makes its AltUp streams from ``inputs_embeds`` and reads
    them back after the last block."""
    target = torch.mean(first ** 2, dim=-1, keepdim=True) ** 0.5
    return [first] + [x.to(first.dtype) * target / torch.sqrt(torch.mean(x.to(first.dtype) ** 2, dim=-1,
                                                                          keepdim=True).clamp(min=1e-5))
                      for x in others]


SHAPES = {**LM_SHAPES,
          "lm.input": "(B, L, D) the text model's inputs_embeds: embeddings with the soft tokens scattered in",
          "lm.blocks.{i}": "(B, L, S·D) the S AltUp streams after block i (HF: (S, B, L, D))",
          "lm.rotary": "(cos, sin), each (B, L, head_dim); one call per layer type (@sliding_attention, @full_attention)",
          "vision.out": "(n, h·w, Dv) the tower's soft-token map in raster order, scaled by √Dv",
          "projector": "(n, h·w, D) soft tokens in LM space"}

GEMMA3N = Gemma3nAdapter(
    name="gemma3n",
    model_classes=("Gemma3nForConditionalGeneration",),
    sites={"projector": "model.embed_vision", **LM},
    shapes=SHAPES,
    n_layers={"lm": "text_config.num_hidden_layers"},
    prompt_marker="image_token",
    model_types=("gemma3n",),
    chat=ChatFormat("{marker}", "<start_of_turn>user\n{images}{text}<end_of_turn>\n<start_of_turn>model\n", ""),
)
