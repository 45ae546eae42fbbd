"""The three organism architectures behind one small interface, so one trainer serves the zoo.

* ``llava-llama``: CLIP + projector + Llama (1-D RoPE) — the shipped organism's.
* ``llava-gpt2``: CLIP + projector + GPT-2 (learned absolute position embeddings ``wpe``).
* ``qwen2vl``: Qwen2-VL ViT + 2×2 merger + Qwen2 LM with 2-D M-RoPE.
* ``qwen3vl``: Qwen3-VL ViT (learned position embeddings) + 2×2 merger + DeepStack (vision block 0's
  features, through their own merger, added at the image positions after LM block 0) + Qwen3 LM
  with interleaved M-RoPE.
* ``llava-blind``: CLIP with zero, frozen position embeddings + projector + a one-layer Llama whose
  rotary angles are scaled to nothing: permutation-invariant over the grid's cells by construction
  (a ViT without position embeddings is permutation-equivariant over its patches; one attention
  layer without positions reads the image tokens as a set), so it cannot hold a position bias.
* ``llava-lmblind``: the same LM with CLIP's learned position embeddings kept: only the vision
  tower can tell cells apart, so any position bias it holds lives before the LM.

Every architecture turns uint8 canvases (B, 48, 48, 3) and queried shapes (B,) into exactly
the tensors its HF processor makes (tests check this), so training and probing see the same
inputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from analyses.organisms import build, qwen, qwen3
from interp.interventions import bapa_position_ids


@dataclass(frozen=True)
class Arch:
    """One architecture. ``name`` is the registry key; ``lm`` the LLaVA text model (unused for Qwen);
    ``is_qwen``: a Qwen2-VL organism (ViT + merger + M-RoPE LM) rather than a LLaVA one, declared
    here with the recipe rather than read off its name; ``deepstack``: with ``is_qwen``, the Qwen3-VL
    organism (:mod:`analyses.organisms.qwen3`: learned vision position embeddings, DeepStack, Qwen3
    LM) instead of the Qwen2-VL one (:mod:`analyses.organisms.qwen`)."""
    name: str
    lm: str = "llama"
    is_qwen: bool = False
    deepstack: bool = False
    position_blind: bool = False
    """The vision tower's position embeddings are zero and never trained (with a ``llama-blind``
    LM: a model that cannot see where anything is)."""

    def __post_init__(self):
        if self.deepstack and not self.is_qwen:
            raise ValueError(f"{self.name}: DeepStack is built on the Qwen3-VL organism only (is_qwen=True)")

    @property
    def _qwen(self):
        """The module that builds this Qwen organism: :mod:`~analyses.organisms.qwen3` or :mod:`~analyses.organisms.qwen`."""
        return qwen3 if self.deepstack else qwen

    def words(self, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
        """The vocabulary: the base words of the architecture, then ``extra`` (task words)."""
        return (qwen.WORDS if self.is_qwen else build.WORDS) + tuple(extra)

    def model(self, seed: int, words: tuple[str, ...]) -> torch.nn.Module:
        return self._qwen.model(seed, words) if self.is_qwen else build.model(seed, words, self.lm)

    def processor(self, words: tuple[str, ...]):
        return self._qwen.processor(words) if self.is_qwen else build.processor(words)

    def image_token(self) -> str:
        return "<|image_pad|>" if self.is_qwen else "<image>"

    def inputs(self, images: np.ndarray, shapes_idx: np.ndarray, words: tuple[str, ...],
               kind: str = "colour") -> dict[str, torch.Tensor]:
        """Model inputs for uint8 images (B, 48, 48, 3) and queried shape indices (B,); no padding.
        LLaVA: input_ids / attention_mask (B, L), pixel_values (B, 3, 48, 48); Qwen: see
        :func:`analyses.organisms.qwen.inputs`."""
        if self.is_qwen:
            return self._qwen.inputs(images, shapes_idx, words, kind)
        ids = build.input_ids(shapes_idx, words, kind)
        return {"input_ids": ids, "pixel_values": build.pixel_values(images), "attention_mask": torch.ones_like(ids)}

    def bapa_position_ids(self, inputs: dict[str, torch.Tensor], words: tuple[str, ...]) -> torch.Tensor:
        """BaPA ids for training (the engine's ``BaPA()`` at inference gives the same): (B, L), or
        (3, B, L) on Qwen with the 1-D scheme on all three rows (the reference variant)."""
        ids = inputs["input_ids"]
        pos = bapa_position_ids(ids, ids == words.index(self.image_token()), inputs["attention_mask"])
        return pos.unsqueeze(0).repeat(3, 1, 1) if self.is_qwen else pos

    def parts(self, model: torch.nn.Module) -> dict[str, list[torch.nn.Parameter]]:
        """Parameters by part: ``vision`` (the tower), ``projector`` (LLaVA's MLP, Qwen's merger),
        ``lm`` (the language model and its unembedding); on the DeepStack organism the DeepStack
        mergers count as projector too."""
        inner = model.model
        if self.is_qwen:
            projector = [p for m in self._mergers(model) for p in m.parameters()]
            merger = {id(p) for p in projector}
            vision = [p for p in inner.visual.parameters() if id(p) not in merger]
        else:
            vision, projector = list(inner.vision_tower.parameters()), list(inner.multi_modal_projector.parameters())
        return {"vision": vision, "projector": projector,
                "lm": list(inner.language_model.parameters()) + list(model.lm_head.parameters())}

    def _mergers(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """Qwen's merger, then (DeepStack) its DeepStack mergers."""
        visual = model.model.visual
        return [visual.merger, *(visual.deepstack_merger_list if self.deepstack else ())]

    def projector_module(self, model: torch.nn.Module) -> torch.nn.Module:
        """LLaVA's projector (output (B, 9, D)) or Qwen's merger (output (B·9, D))."""
        return model.model.visual.merger if self.is_qwen else model.model.multi_modal_projector

    def vision_position_embedding(self, model: torch.nn.Module) -> torch.nn.Embedding:
        """CLIP's learned position embedding (10 × 64: CLS + 9 patches); the Qwen3-VL ViT's (36 × 48: one
        per 8 px patch); the Qwen2-VL ViT has none."""
        if self.deepstack:
            return model.model.visual.pos_embed
        if self.is_qwen:
            raise ValueError("the Qwen2-VL vision tower has no absolute position embedding (2-D rotary only)")
        return model.model.vision_tower.embeddings.position_embedding

    def vision_module(self, model: torch.nn.Module) -> torch.nn.Module:
        """The vision tower (LLaVA's CLIP; Qwen's ViT including its merger)."""
        return model.model.visual if self.is_qwen else model.model.vision_tower

    def lora_targets(self) -> str:
        """Regex of the LM's linear layers that LoRA adapts (attention and MLP projections)."""
        if self.lm == "gpt2" and not self.is_qwen:
            return r".*language_model\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)"
        return r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


ARCHS: dict[str, Arch] = {a.name: a for a in (Arch("llava-llama"), Arch("llava-gpt2", lm="gpt2"),
                                              Arch("qwen2vl", is_qwen=True),
                                              Arch("qwen3vl", is_qwen=True, deepstack=True),
                                              Arch("llava-blind", lm="llama-blind", position_blind=True),
                                              Arch("llava-lmblind", lm="llama-blind"))}
