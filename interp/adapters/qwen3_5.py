"""Qwen3.5 (Qwen3_5ForConditionalGeneration): Qwen3-VL's vision side without DeepStack (a ViT over
16 px, here 8 px, patches with learned position embeddings resampled to each image's grid, 2×2
patch merger as the projector) and a *hybrid* LM: most layers mix tokens with a Gated DeltaNet
(linear attention with a gated delta-rule recurrent state and a causal depthwise convolution over
the last ``linear_conv_kernel_dim`` tokens), every ``full_attention_interval``-th layer (4 in the
released checkpoints: layers 3, 7, …) with gated softmax attention (q/k norms, an output gate)
whose rotary embedding is partial (``partial_rotary_factor`` 0.25 of the head dims rotate) and
interleaved M-RoPE (three id rows t, h, w from HF's ``get_rope_index``, which needs
``mm_token_type_ids``). The text config's ``layer_types`` says which layer is which.

Layer kinds, as this toolkit treats them (:meth:`Adapter.attention_layers`):

* ``full_attention`` layers: ``lm.blocks.{i}.attn`` (→ ``self_attn``), ``.attn.heads``,
  ``.attn.pattern``; they alone read the position ids (BaPA, PositionSwap act there only), take a
  (B, 1, Lq, Lk) attention mask (Knockout acts there only) and keep keys and values.
* ``linear_attention`` layers (Gated DeltaNet): ``lm.blocks.{i}.mixer`` (→ ``linear_attn``,
  output (B, L, D) before the residual add); no attention sites (naming one is one error line);
  no position information (the rotary pair they are called with is unused), no attention mask
  (only a (B, L) padding mask that zeroes padded tokens before the recurrence), a recurrent and a
  conv state that summarise the whole prefix: a resumed run re-runs them over the prefix
  (:func:`interp.resume.resume`), a generation carries their states in HF's cache.

``lm.blocks.{i}`` (every layer), ``lm.blocks.{i}.mlp``, ``lm.rotary`` (one call per forward; its
(cos, sin) reach every layer but only the full-attention ones use them), token order and image
views as Qwen3-VL.
"""
from __future__ import annotations

from dataclasses import replace

from interp.adapters.base import ChatFormat
from interp.adapters.memory_facts import LayerKind
from interp.adapters.qwen import IMAGE_INPUTS, SHAPES, SITES
from interp.adapters.qwen3_vl import QWEN3_VL, Qwen3VLAdapter

LINEAR = "linear_attention"
"""The ``layer_types`` entry of a Gated DeltaNet layer."""
ATTENTION_SITES = ("lm.blocks.{i}.attn",)
"""Patterns that exist on softmax-attention layers only."""
MIXER = "lm.blocks.{i}.mixer"
"""The Gated DeltaNet mixer's site: exists on linear-attention layers only."""
CHUNK = 64
"""Tokens per chunk of HF's Gated DeltaNet (``torch_chunk_gated_delta_rule``'s default)."""


def deltanet_kind(t: dict) -> LayerKind:
    """What autograd keeps per token of a Gated DeltaNet layer with frozen parameters (HF's torch
    path: ``causal_conv1d_fn`` and ``torch_chunk_gated_delta_rule``, no ``causal_conv1d`` / ``fla``
    kernels), read from the saved tensors' ops and counted with saved-tensor hooks (within 2 %,
    fp32 and bf16, at whole chunks, tests/test_bench_scale.py). Hv value heads of dk / dv, Hk key
    heads, C = :data:`CHUNK`:

    * model dtype: the conv's input and its SiLU's input (2 × (2 Hk·dk + Hv·dv)), the gated norm's
      input cast back (Hv·dv), β's sigmoid output (Hv);
    * fp32: 5 Hv·C (per chunk the pairwise decays, the UT system, the intra-chunk q·k map and its
      slice in the scan, the triangular solve's matrix), 8 Hv·dk (q and k before and after their L2
      norm, β·k, the decayed keys solved, their per-chunk slices) + 6 Hv·dv (values, β·v solved,
      its per-chunk correction, the gated norm's input, gate and SiLU(gate)), the recurrent state
      once per chunk (Hv·dk·dv / C per token), ~9 Hv per-head scalars;
    * fp32 models only: 4 Hv·dk more (the scan's batched q and k operands are copies there, views
      of the tensors above in bf16).

    A sequence padded to whole chunks costs its padding too (per token, a 40-token input keeps
    C/40 times the chunk terms); not counted: the model is for long multimodal inputs."""
    hv, hk = int(t.get("linear_num_value_heads", 32)), int(t.get("linear_num_key_heads", 16))
    dk, dv = int(t.get("linear_key_head_dim", 128)), int(t.get("linear_value_head_dim", 128))
    n = sum(1 for k in (t.get("layer_types") or [])[:int(t.get("num_hidden_layers") or 0)] if k == LINEAR)
    return LayerKind(n, mixer_fp32=5 * hv * CHUNK + 8 * hv * dk + 6 * hv * dv + hv * dk * dv // CHUNK + 9 * hv,
                     mixer_model=2 * (2 * hk * dk + hv * dv) + hv * dv + hv, mixer_fp32_only=4 * hv * dk)


class Qwen35Adapter(Qwen3VLAdapter):
    """Qwen3-VL's facts (processor without video, M-RoPE ids from ``get_rope_index``, token order,
    memory layout) without DeepStack, plus the layer kinds of the hybrid LM."""

    def pattern_count(self, model, pattern):
        return super(Qwen3VLAdapter, self).pattern_count(model, pattern)

    def memory_profile(self, cfg, image_px=(336, 336)):
        """Qwen3-VL's layout and q/k norms; the full-attention layers' output gate; the Gated
        DeltaNet layers' own autograd term (:func:`deltanet_kind`)."""
        return replace(super().memory_profile(cfg, image_px), attn_gate=True,
                       lm_layer_kinds=(deltanet_kind(cfg.get("text_config", {}) or {}),))

    def injections(self, model):
        """No DeepStack: nothing is added between LM blocks."""
        return {}

    def _types(self, model) -> list[str]:
        return list(model.config.text_config.layer_types)

    def layers_of(self, model, pattern):
        """``.attn`` on the full-attention layers, ``.mixer`` on the Gated DeltaNet layers, every
        other pattern on every index."""
        if pattern in ATTENTION_SITES:
            return [i for i, t in enumerate(self._types(model)) if t != LINEAR]
        if pattern == MIXER:
            return [i for i, t in enumerate(self._types(model)) if t == LINEAR]
        return super().layers_of(model, pattern)

    def mixer_site(self, model, i):
        """``lm.blocks.{i}.mixer`` on a Gated DeltaNet layer, ``lm.blocks.{i}.attn`` otherwise."""
        return MIXER.format(i=i) if self._types(model)[i] == LINEAR else super().mixer_site(model, i)


QWEN3_5 = Qwen35Adapter(
    name="qwen35", model_classes=("Qwen3_5ForConditionalGeneration",),
    sites={k: v for key, val in SITES.items() for k, v in
           ((key, val), *(((MIXER, "model.language_model.layers.{i}.linear_attn"),) if key in ATTENTION_SITES else ()))},
    shapes={**SHAPES, "vision.embed": QWEN3_VL.shapes["vision.embed"],
            "lm.blocks.{i}.attn": "(B, L, D) gated attention output before the residual add (full-attention "
                                  "layers only)",
            "lm.blocks.{i}.attn.heads": "(B, L, H, head_dim) per-head attention output after the output gate: the "
                                        "o_proj input split into heads (full-attention layers only)",
            "lm.blocks.{i}.attn.pattern": "(B, H, L, L) attention weights after softmax (full-attention layers only)",
            MIXER: "(B, L, D) Gated DeltaNet output before the residual add (linear-attention layers only)",
            "lm.rotary": "(cos, sin), each (B, L, rotary_dim): the t/h/w frequencies interleaved; rotary_dim = "
                         "partial_rotary_factor × head_dim, read by the full-attention layers only"},
    n_layers={"vision": "vision_config.depth", "lm": "text_config.num_hidden_layers"},
    rope="mrope", image_inputs=IMAGE_INPUTS, model_types=("qwen3_5",),
    chat=ChatFormat("<|vision_start|>{marker}<|vision_end|>",
                    "<|im_start|>user\n{images}{text}<|im_end|>\n<|im_start|>assistant\n", ""),
)
"""Qwen3.5; its published ChatML has no default system turn (as Qwen3-VL's)."""
