"""The memory model's facts about an architecture, computed from a config.json mapping
(:meth:`interp.adapters.base.Adapter.memory_profile`), and the config readers they share."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MemoryFacts:
    """What the memory model (:mod:`analyses.estimate`) needs to know about an architecture,
    computed from a config.json mapping for one image of a given size (:meth:`Adapter.memory_profile`).

    ``image_tokens``: (image tokens in the LM, tokens through the vision tower) of one image;
    ``pixel_bytes``: bytes of one image's pixel inputs (fp32, as the processor makes them);
    ``vision_attn_live``: live tensors (× Dv) of a vision block's attention phase; ``block_norms``:
    RMSNorms of width D per LM block; ``qk_norm``: whether attention normalises q and k per head;
    ``v_norm``: whether attention also normalises v per head (Gemma4's scale-free v norm: autograd
    keeps its fp32 input, 4 bytes × Dkv); ``attn_gate``: whether attention's output is gated
    (Qwen3.5's full-attention layers: σ(gate) and the output it multiplies, 2 Dq, and in fp32 the q
    norm's input is a view of the fused q·gate projection, so its whole 2 Dq stays);
    ``projector_params``: parameters of the projector. MoE LMs (None: dense, 3 F each): elements per
    token live at an LM MLP's peak (``lm_mlp_live``) and kept by autograd (``lm_mlp_saved``);
    ``lm_mlp_params``: all LM MLPs' parameters (every expert). ``lm_mlp_fp32``: elements per token
    an LM block's MLP part keeps for autograd at 4 bytes whatever the model dtype, beside
    ``lm_mlp_saved`` at the model dtype (fp32 inputs of norms there, router probabilities and
    weights; an int64 index counts as 2); ``lm_mlp_fp32_upcast``: more of them when the model dtype
    is below fp32 (an fp32 copy of a tensor that, in an fp32 model, is one another norm keeps
    already; Gemma4's MoE block). ``lm_layer_kinds``: LM blocks whose autograd facts differ from the
    config-wide ones (:class:`LayerKind`); the other blocks have those. ``lm_streams``: parallel
    residual streams S between LM blocks (Gemma3n's AltUp: 4), so a block's input is S·D wide.
    ``other_params``: parameters the count from the shapes misses or over-counts (signed): an
    architecture's own tables, towers and per-layer extras. ``lm_block_extra``: elements per token
    an LM block keeps for autograd beyond attention, norms and MLP — (at the model dtype, at 4
    bytes, more at 4 bytes when the model dtype is fp32) — Gemma3n's AltUp and per-layer gate."""
    image_tokens: tuple[int, int]
    pixel_bytes: int
    projector_params: int
    vision_attn_live: float = 7.0
    block_norms: int = 2
    qk_norm: bool = False
    lm_mlp_live: int | None = None
    lm_mlp_saved: int | None = None
    lm_mlp_params: int | None = None
    v_norm: bool = False
    attn_gate: bool = False
    lm_layer_kinds: tuple["LayerKind", ...] = ()
    lm_mlp_fp32: int = 0
    lm_mlp_fp32_upcast: int = 0
    lm_streams: int = 1
    other_params: int = 0
    lm_block_extra: tuple[int, int, int] = (0, 0, 0)


@dataclass(frozen=True)
class LayerKind:
    """``count`` LM blocks whose attention has its own ``head_dim`` / ``kv_heads`` (None: the
    config's; Gemma4's full-attention layers), or whose token mixer is no attention at all
    (``mixer_fp32`` not None; Qwen3.5's Gated DeltaNet): then per token the mixer keeps
    ``mixer_fp32`` elements in fp32, ``mixer_model`` at the model dtype and ``mixer_fp32_only``
    more when the model dtype is fp32 (casts to fp32 that are then no-ops leave copies apart),
    in place of attention's q, k, v, output and q/k norms; the block's norms and MLP as any block's.
    Such a block keeps no keys or values (:attr:`attends`): resuming re-runs it from position 0.
    ``own_kv`` False: the blocks attend with keys and values another block made (shared-KV layers),
    so a run keeps none of theirs. ``ffn``: the blocks' own MLP width (Gemma4's double-wide MLPs
    on its shared-KV layers)."""
    count: int
    head_dim: int | None = None
    kv_heads: int | None = None
    mixer_fp32: int | None = None
    mixer_model: int = 0
    mixer_fp32_only: int = 0
    own_kv: bool = True
    ffn: int | None = None

    @property
    def attends(self) -> bool:
        """Whether the blocks' token mixer is attention (they have keys and values)."""
        return self.mixer_fp32 is None


def crop_pixel_bytes(v: dict, vision_tokens: int) -> int:
    """Bytes of one image's pixel inputs when it is given as crops at the tower's resolution
    (3 × side² fp32 per crop, crops counted from the vision tokens)."""
    side, patch = int(v.get("image_size", 336)), int(v.get("patch_size", 14))
    crops = max(1, round(vision_tokens / ((side // patch) ** 2 + 1)))
    return crops * 3 * side * side * 4


def default_memory_profile(cfg: dict, image_px: tuple[int, int] = (336, 336)) -> MemoryFacts:
    """One crop at the tower's ``image_size`` with a CLS token through the tower (LLaVA-1.5's
    layout) and an MLP projector: the facts of an architecture that declares nothing else (and
    of a config no adapter claims)."""
    v = cfg.get("vision_config", {})
    side = int(v.get("image_size", 336)) // int(v.get("patch_size", 14))
    n_img, n_vis = side * side, side * side + 1
    return MemoryFacts(image_tokens=(n_img, n_vis), pixel_bytes=crop_pixel_bytes(v, n_vis),
                       projector_params=projector_params(cfg))


TEXT_KEY_SPELLINGS = {"hidden_size": "n_embd", "num_attention_heads": "n_head", "num_hidden_layers": "n_layer",
                      "intermediate_size": "n_inner"}
"""Canonical text-config keys and the names GPT-2-style configs give them (HF maps those as
attributes only, so ``config.to_dict()`` has the GPT-2 names)."""


def text_keys(t: dict) -> dict:
    """A text config mapping with the canonical keys filled from the other spellings (an unset
    ``n_inner`` means 4 × the width)."""
    out = dict(t)
    for key, alt in TEXT_KEY_SPELLINGS.items():
        if out.get(key) is None and alt in out:
            out[key] = out[alt]
    if isinstance(out.get("intermediate_size"), list):  # one per layer (Gemma3n): the largest
        out["intermediate_size"] = max(out["intermediate_size"])
    if out.get("intermediate_size") is None and out.get("hidden_size") is not None:
        out["intermediate_size"] = 4 * int(out["hidden_size"])
    return out


def projector_params(cfg: dict) -> int:
    """Parameters of the projector from the config's widths: an MLP (Dv·D + D·D), or a 2×2
    merger (16 Dv² + 4 Dv·D) where the config names one."""
    t, v = text_keys(cfg.get("text_config", cfg)), cfg.get("vision_config", {})
    D = int(t["hidden_size"])
    Dv = int(v.get("embed_dim") or v.get("hidden_size") or 1)
    return Dv * D + D * D if "merger" not in str(cfg) else 16 * Dv * Dv + 4 * Dv * D
