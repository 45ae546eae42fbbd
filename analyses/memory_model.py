"""The memory model: peak bytes of one step of an analysis, from config shapes × dtype × rows ×
what the step keeps (its memory profile), and the most rows per step under a budget.

Role: below the dry run (:mod:`analyses.estimate`) and the run-time row chunks
(:mod:`analyses.memory`), which both read it. May import: ``spatialbias``, ``interp.adapters``
(each architecture's memory facts), ``analyses.registry`` (the profile names).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from analyses import registry
from analyses.registry import PROFILES
from spatialbias.errors import SpatialBiasError


# ------------------------------------------------------------------------------------------------
# Memory: peak bytes of one condition, from config shapes × dtype × rows × what the analysis keeps


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
TEXT_TOKENS = 64
"""Text tokens per row the dry run assumes beside the image tokens (prompts of the built probes
and chat templates are 20–60 tokens); a run uses its inputs' real length."""

# Live tensors per token, in units of the layer width × dtype bytes (see activation_peak); each list
# below is what exists at the phase's peak, the numbers were checked against the bench section
# ``memory`` (docs/benchmarks.md): LLaVA-1.5-7B and Qwen2.5-VL-7B shapes, bf16, CPU.
LM_LIVE = 5.2
"""Beside an LM block's MLP (gate, its activation, up: 3 F): the embeddings the multimodal
wrapper still holds, the image features, the block input, its normed copy, the output forming."""
VISION_LIVE = 5.2
"""The same beside a vision block's MLP (3 Fv)."""
# A vision block's attention phase, where it is the larger one, is an architecture fact
# (interp.adapters.MemoryFacts.vision_attn_live: Qwen's fp32 vision rotary, 19 Dv; CLIP and SigLIP
# towers, 7 Dv, peak in their MLP).
ATTN_LIVE = 6.0
"""While an eager attention map exists (flow's pattern kernel): the wrapper's embeddings and image
features, the block input, its normed copy, q, k, v (rotated)."""
SOFTMAX_BYTES = 8
"""Bytes per attention-map element beyond the map itself at eager attention's softmax: the fp32
copy of a half-precision input and the fp32 output (fp32 maps: the output only, 4)."""
INPUT_COPIES = 3
"""Copies of the step's pixel inputs (fp32, as the processor makes them) a step makes: placements
joined, rows selected, rows prepared — large for Qwen (4.7 kB per 14 px patch)."""
GRAD_NORM_BYTES = 4
"""Bytes per width autograd keeps per token for each RMSNorm of an LM block: its input, upcast to
fp32 whatever the model dtype (Llama / Qwen2 blocks have 2 norms of width D; Gemma3 blocks 4, plus
per-head norms of q and k: 4 × (Dq + Dkv) more)."""
# RMSNorms of width D per LM block where not 2, and per-head q/k norms, are architecture facts
# (interp.adapters.MemoryFacts.block_norms, qk_norm: Gemma3's adapter declares 4 and True).
GRAD_SAVED_D, GRAD_SAVED_KV, GRAD_SAVED_F = 4.0, 2.0, 3.0
"""Widths (× dtype bytes) autograd keeps per token of one LM block when gradients flow to
activations only (parameters frozen, :func:`interp.attribution.frozen`), beside the norms: SDPA's
q and output (2 Dq, Dq = heads × head dim, D but for Gemma3) plus, for the attribution sites, the source's activation at the block and the
gradient returned for it (2 D); SDPA's k and v at the key/value width (2 Dkv: not repeated for
grouped-query attention); SiLU's input and the gate·up product's two factors (3 F). Counted with
saved-tensor hooks on one block of every LM block class (Llama, Qwen2, Qwen3, Gemma3, Qwen3-VL and
its MoE, Gemma4's two layer kinds and its MoE block, Qwen3.5's gated attention and Gated DeltaNet:
the adapters' ``MemoryFacts.v_norm``, ``attn_gate``, ``lm_layer_kinds``, ``lm_mlp_fp32``) in fp32
and bf16 (within 2 %), and per layer in the bench section ``memory`` (docs/benchmarks.md). A
vision block keeps 6 Dv + 3 Fv (CLIP keeps 6 Dv + 2 Fv: an over-estimate there)."""
GRAD_SAVED_DV, GRAD_SAVED_FV = 6.0, 3.0


@dataclass(frozen=True)
class Shapes:
    """What the memory model reads from a model config, plus the run's token counts.

    ``seq_len``: L, LM tokens per row; ``vision_tokens``: tokens per row through the vision tower
    (all crops / patches of the row's image); ``image_tokens``: the row's image tokens in the LM;
    ``bytes``: per element of the model dtype; ``weights``: bytes of the parameters."""
    lm_layers: int
    width: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    vision_layers: int
    vision_width: int
    vision_ffn: int
    vision_heads: int
    seq_len: int
    vision_tokens: int
    image_tokens: int
    bytes: int
    weights: int
    keeps_vision_states: bool = False
    vision_attn_live: float = 7.0
    pixel_bytes: int = 0
    block_norms: int = 2
    qk_norm: bool = False
    mlp_live: int = 0
    mlp_saved: int = 0
    v_norm: bool = False
    attn_gate: bool = False
    layer_kinds: tuple = ()
    mlp_fp32: int = 0
    mlp_fp32_upcast: int = 0
    streams: int = 1
    block_extra: tuple = (0, 0, 0)

    @property
    def mlp(self) -> int:
        """Elements per token live at an LM block's MLP peak: gate, activation, up (3 F), or what a
        MoE block holds (:attr:`interp.adapters.MemoryFacts.lm_mlp_live`)."""
        return self.mlp_live or 3 * self.ffn

    @classmethod
    def from_config(cls, cfg: dict, dtype: str = "float32", image_px: tuple[int, int] = (336, 336),
                    text_tokens: int = TEXT_TOKENS, weights: int | None = None) -> "Shapes":
        """Shapes of a config.json mapping (an LVLM's: ``text_config`` and ``vision_config``) for
        images of ``image_px`` (h, w) pixels; ``weights`` defaults to a parameter count from the shapes."""
        if dtype not in DTYPE_BYTES:
            raise SpatialBiasError(f"dtype {dtype!r}: use one of {', '.join(DTYPE_BYTES)}")
        from interp.adapters.base import text_keys
        t, v = text_keys(cfg.get("text_config", cfg)), cfg.get("vision_config", {})
        D = int(t["hidden_size"])
        H = int(t["num_attention_heads"])
        hd = int(t.get("head_dim") or D // H)
        Dv = int(v.get("embed_dim") or v.get("hidden_size") or 1)  # Qwen2-VL names its vision width embed_dim
        Fv = int(v.get("intermediate_size") or Dv * v.get("mlp_ratio", 4))
        facts = _facts(cfg, image_px)  # the architecture's own (its adapter's) facts
        n_img, n_vis = facts.image_tokens
        s = cls(lm_layers=int(t["num_hidden_layers"]), width=D, ffn=int(t["intermediate_size"]), heads=H,
                kv_heads=int(t.get("num_key_value_heads") or H), head_dim=hd, vocab=int(t["vocab_size"]),
                vision_layers=int(v.get("num_hidden_layers") or v.get("depth") or 0), vision_width=Dv, vision_ffn=Fv,
                vision_heads=int(v.get("num_attention_heads") or v.get("num_heads") or 1),
                seq_len=n_img + text_tokens, vision_tokens=n_vis, image_tokens=n_img, bytes=DTYPE_BYTES[dtype],
                weights=0, keeps_vision_states="vision_feature_layer" in cfg,
                vision_attn_live=facts.vision_attn_live, block_norms=facts.block_norms, qk_norm=facts.qk_norm,
                pixel_bytes=facts.pixel_bytes, mlp_live=facts.lm_mlp_live or 0,
                mlp_saved=facts.lm_mlp_saved or 0, v_norm=facts.v_norm, attn_gate=facts.attn_gate,
                layer_kinds=tuple(facts.lm_layer_kinds), mlp_fp32=facts.lm_mlp_fp32,
                mlp_fp32_upcast=facts.lm_mlp_fp32_upcast, streams=facts.lm_streams,
                block_extra=tuple(facts.lm_block_extra))
        return replace(s, weights=weights if weights is not None else s.param_count(cfg) * s.bytes)

    def param_count(self, cfg: dict) -> int:
        """Parameters from the shapes (LM blocks, embeddings and head, vision blocks, projector);
        within a few % of the real count (biases and norms aside). A MoE LM's MLPs count every
        expert (:attr:`interp.adapters.MemoryFacts.lm_mlp_params`); an architecture's own extras are
        its ``MemoryFacts.other_params``."""
        D, F, hd = self.width, self.ffn, self.head_dim
        facts = _facts(cfg)
        mlps = facts.lm_mlp_params if facts.lm_mlp_params is not None else self.lm_layers * 3 * D * F
        tied = cfg.get("tie_word_embeddings") or cfg.get("text_config", {}).get("tie_word_embeddings")
        lm = self.lm_layers * D * hd * (2 * self.heads + 2 * self.kv_heads) + mlps + self.vocab * D * (1 if tied else 2)
        Dv, Fv = self.vision_width, self.vision_ffn
        vision = self.vision_layers * (4 * Dv * Dv + 2 * Dv * Fv) + 3 * 14 * 14 * Dv * 2
        return int(lm + vision + facts.projector_params + facts.other_params)

    def with_run(self, seq_len: int, vision_tokens: int, image_tokens: int | None = None) -> "Shapes":
        """The same model with a run's real token counts."""
        pixels = self.pixel_bytes * int(vision_tokens) // max(1, self.vision_tokens)
        return replace(self, seq_len=int(seq_len), vision_tokens=int(vision_tokens), pixel_bytes=pixels,
                       image_tokens=self.image_tokens if image_tokens is None else int(image_tokens))


def _facts(cfg: dict, image_px: tuple[int, int] = (336, 336)):
    """The memory facts the config's architecture declares (its adapter, found from the config's
    ``architectures``: :func:`interp.adapters.memory_profile`); no architecture is named here."""
    from interp.adapters import memory_profile
    return memory_profile(cfg, tuple(image_px))


def activation_peak(s: Shapes, kind: str, rows: int, vision_sites: bool = True) -> int:
    """Peak bytes above the loaded model of one step of ``rows`` rows (B rows, L tokens, widths
    D/F, N LM blocks, vision P tokens of width Dv/Fv, b bytes per element):

    * ``forward`` (a no-grad forward, last-position logits): the step's pixel-input copies, then
      the larger of the vision tower's phase (B·P·max(5.2 Dv + 3 Fv, its attention's live set)·b)
      and the LM's (B·L·(5.2 D + 3 F)·b; a MoE block's own count for 3 F): one block at a time, so no term grows with the number of
      layers but LLaVA's record of every vision block's output (it reads ``vision_feature_layer``
      from it), (Nv + 1)·B·P·Dv·b;
    * ``flow`` (attention flow: eager attention, reduced inside each block): the forward, or one
      block's attention map at its softmax (B·H·L²·(b + 8): the map, its fp32 copy and the fp32
      output) with 6 widths D alive, whichever is larger — one block's map, never all of them;
    * ``patching`` (resumed): ``rows`` // 2 = c items captured at once keep every block's residual
      stream and every attention block's keys/values at its own width, 2c·L·((N+1)·D + Σ 2·Dkv)·b
      (:func:`lm_states_bytes`: Dkv per layer kind, none for a recurrent one), on top of the larger
      of the capture's forward (2c rows; the forwards that stop at ``lm.input`` are no larger) and a
      resumed batch of ``rows`` rows (a block's MLP, or its attention with the reused keys and
      values at the widest kind's Dkv: 6 D + 4 Dkv);
    * ``attribution`` (``rows`` // 2 = g base rows through the graph, parameters frozen, the
      source rows without it): per base row, token and LM block the norms' fp32 inputs (8 bytes
      × D for Llama and Qwen) + (2 Dq + 2 D + 2 Dkv + 3 F)·b kept for the backward
      (:func:`lm_block_saved`; a MoE MLP its own count for 3 F, with its fp32 part; blocks of another
      kind, e.g. Gated DeltaNet, their own: :func:`lm_blocks_saved`),
      per vision token and block 6 Dv + 3 Fv when the sites reach into the vision tower, plus
      the forward of the step.
    """
    b, B = s.bytes, max(1, rows)
    L, D, P = s.seq_len, s.width, s.vision_tokens
    Dv, Fv = s.vision_width, s.vision_ffn
    Dkv = max((w for n, w in kv_widths(s) if n), default=s.kv_heads * s.head_dim)  # the widest kind's

    def fwd(n: int) -> float:
        vision = n * P * max(VISION_LIVE * Dv + 3 * Fv, s.vision_attn_live * Dv) * b
        lm = n * L * (LM_LIVE * D + s.mlp) * b
        return max(vision, lm) + kept_vision(n) + INPUT_COPIES * n * s.pixel_bytes

    def kept_vision(n: int) -> float:
        return n * P * Dv * b * (s.vision_layers + 1) if s.keeps_vision_states else 0

    if kind == "forward":
        return int(fwd(B))
    if kind == "flow":
        att = B * s.heads * L * L * (b + (SOFTMAX_BYTES if b < 4 else 4)) + B * L * ATTN_LIVE * D * b
        return int(max(fwd(B), att + kept_vision(B) + INPUT_COPIES * B * s.pixel_bytes))
    if kind == "patching":
        c = max(1, B // 2)
        kept = 2 * c * L * lm_states_bytes(s)
        resumed = B * L * max(LM_LIVE * D + s.mlp, ATTN_LIVE * D + 4 * Dkv) * b
        return int(kept + max(fwd(2 * c), resumed))
    if kind == "attribution":
        g = max(1, B // 2)
        saved = g * L * lm_blocks_saved(s)
        if vision_sites:
            saved += g * s.vision_layers * P * (GRAD_SAVED_DV * Dv + GRAD_SAVED_FV * Fv) * b
        return int(saved + fwd(B))
    raise SpatialBiasError(f"no memory profile {kind!r}; use {', '.join(PROFILES)}")


def lm_block_saved(s: Shapes, sites: bool = True, kind=None) -> int:
    """Bytes autograd keeps per token of one LM block with frozen parameters (see
    :data:`GRAD_SAVED_D`); ``sites``: with the 2 D the attribution sites keep beside it; ``kind``:
    a block of another kind (:class:`interp.adapters.memory_facts.LayerKind`: its own head size
    and key/value heads, or a token mixer that is no attention), None: the config-wide block. The
    MLP part: 3 F at the model dtype, or a MoE block's own elements at the model dtype and at 4
    bytes (:attr:`Shapes.mlp_saved`, :attr:`~Shapes.mlp_fp32`, and :attr:`~Shapes.mlp_fp32_upcast`
    below fp32: Gemma4's router, experts and their norms beside its dense MLP); beyond them the
    block's own extras (:attr:`Shapes.block_extra`: Gemma3n's AltUp). A block of a kind without
    keys and values of its own (``own_kv`` False) keeps no k/v norm inputs and no rotated k, v."""
    if kind is not None and kind.ffn:
        s = replace(s, ffn=kind.ffn)
    mlp = (s.mlp_saved or GRAD_SAVED_F * s.ffn) * s.bytes
    mlp += GRAD_NORM_BYTES * (s.mlp_fp32 + (s.mlp_fp32_upcast if s.bytes < 4 else 0))
    model, fp32, fp32_only = s.block_extra
    mlp += model * s.bytes + GRAD_NORM_BYTES * (fp32 + (fp32_only if s.bytes == 4 else 0))  # and the block's extras
    site = 2 * s.width if sites else 0
    if kind is not None and kind.mixer_fp32 is not None:
        fp32 = kind.mixer_fp32 + (kind.mixer_fp32_only if s.bytes == 4 else 0)
        return int(GRAD_NORM_BYTES * (s.block_norms * s.width + fp32) + (kind.mixer_model + site) * s.bytes + mlp)
    if kind is not None:
        s = replace(s, head_dim=kind.head_dim or s.head_dim, kv_heads=kind.kv_heads or s.kv_heads)
    Dq, Dkv = s.heads * s.head_dim, s.kv_heads * s.head_dim * (1 if kind is None or kind.own_kv else 0)
    qk = (Dq + Dkv + (Dq if s.attn_gate and s.bytes == 4 else 0)) if s.qk_norm else 0
    norms = GRAD_NORM_BYTES * (s.block_norms * s.width + qk + (Dkv if s.v_norm else 0))
    gate = 2 * Dq if s.attn_gate else 0
    widths = (GRAD_SAVED_D - 2) * Dq + site + GRAD_SAVED_KV * Dkv + gate
    return int(norms + widths * s.bytes + mlp)


def lm_blocks_saved(s: Shapes, sites: bool = True) -> int:
    """Bytes autograd keeps per token over all LM blocks: each block kind the architecture
    declares (``Shapes.layer_kinds``) at its own count, the rest as :func:`lm_block_saved`."""
    other = s.lm_layers - sum(k.count for k in s.layer_kinds)
    return other * lm_block_saved(s, sites) + sum(k.count * lm_block_saved(s, sites, k) for k in s.layer_kinds)


def kv_widths(s: Shapes) -> tuple[tuple[int, int], ...]:
    """(LM blocks, Dkv) per block kind: Dkv = key/value heads × head size of the kind's attention
    (the config's for blocks of no declared kind; :class:`interp.adapters.memory_facts.LayerKind`'s
    own where it has them), 0 for a kind whose token mixer is no attention (it keeps no keys or values)."""
    other = s.lm_layers - sum(k.count for k in s.layer_kinds)
    return ((other, s.kv_heads * s.head_dim),) + tuple(
        (k.count, (k.kv_heads or s.kv_heads) * (k.head_dim or s.head_dim) if k.attends and k.own_kv else 0)
        for k in s.layer_kinds)


def lm_states_bytes(s: Shapes) -> int:
    """Bytes per token of one row that resumed patching's capture keeps
    (:func:`interp.resume.capture_lm`'s ``LMStates``): the residual stream entering every LM block
    and leaving the last, (N + 1)·D (with S streams: ``lm.input``'s D and N block states of S·D),
    and every attention block's keys and values (a shared-KV block's are its source's: none), each
    (kv_heads, head_dim) per token at its kind's own width, Σ over blocks 2·Dkv (:func:`kv_widths`;
    none for a recurrent block, which resuming re-runs from position 0), all at b bytes."""
    return int(((s.lm_layers * s.streams + 1) * s.width + sum(2 * n * w for n, w in kv_widths(s))) * s.bytes)


MIN_ROWS = {"patching": 3, "attribution": 2}
"""Rows of the smallest step: patching runs a source, a base and one patched row together;
attribution a base row with its graph and its source row."""


def analysis_profiles(analysis: str, options: dict | None = None) -> tuple[str, ...]:
    """The memory profiles of an analysis' steps (its registered ``profile`` under ``options``):
    the dry run prices each step under the budget and reports the largest peak."""
    p = registry.get(analysis).profile(options or {})
    return (p,) if isinstance(p, str) else tuple(p)


def profiles(name: str) -> tuple[str, ...]:
    """A memory profile named directly (:data:`PROFILES`), else the profiles of the analysis
    ``name`` at its default options."""
    return (name,) if name in PROFILES else analysis_profiles(name)


def choose_rows(s: Shapes, analysis: str, budget: int | None, limit: int, what: str = "") -> int:
    """The most rows (≤ ``limit``) per step of memory profile ``analysis`` (:data:`PROFILES`, or an
    analysis whose steps share one profile) whose predicted peak fits ``budget`` bytes of
    activations (None: ``limit``). One row that does not fit is one error line naming the numbers."""
    kinds = profiles(analysis)
    if len(kinds) != 1:
        raise SpatialBiasError(f"{analysis}: its steps have the memory profiles {', '.join(kinds)}; choose rows per "
                               "profile")
    kind = kinds[0]
    lo = MIN_ROWS.get(kind, 1)
    if budget is None:
        return max(lo, limit)
    if activation_peak(s, kind, lo) > budget:
        raise SpatialBiasError(f"{what or analysis}: one step needs {gib(activation_peak(s, kind, lo))} of activations "
                               f"({s.seq_len} tokens, {s.lm_layers} LM layers, {s.bytes}-byte dtype) but --max-memory "
                               f"leaves {gib(budget)} after the weights; raise --max-memory, use bfloat16, or "
                               "offload weights (--device-map auto)")
    best = lo
    while best < limit and activation_peak(s, kind, best + 1) <= budget:
        best += 1
    return best


def gib(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB"
