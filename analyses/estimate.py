"""What a plan will cost before it runs: forward rows per condition (a unit independent of the
machine) and, where earlier runs in the folder timed the same model and analysis, seconds.

Role: ``--dry-run``. May import: ``spatialbias``, ``probes.format``, ``analyses.{plan, store}``,
``interp.adapters`` (each architecture's memory facts, :meth:`interp.adapters.Adapter.memory_profile`).
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from analyses.plan import Condition, Plan
from analyses.store import Store
from spatialbias.errors import SpatialBiasError


def forward_rows(cond: Condition, n_probe_rows: int, n_items: int, lm_layers: int | None) -> int:
    """Rows pushed through the model by one condition (its analysis' registered ``cost``)."""
    from analyses import registry
    return int(registry.get(cond.analysis).cost(cond, n_probe_rows, n_items, lm_layers or 1))


def estimate(plan: Plan, out: Path) -> pd.DataFrame:
    """One row per condition: status (done/pending), forward rows, the memory model's rows per
    step under the budget and predicted peak (weights + activations, ``peak_GiB``; see
    :func:`memory_row`) and, where earlier runs in ``out`` timed the same model and analysis, an
    estimate of seconds (their seconds per row × rows). ``attrs["memory_notes"]``: one line per
    condition group that does not fit or has no config.json to read shapes from."""
    from probes.format import read_rows
    store = Store(out)
    done = store.done()
    probe_rows: dict[str, tuple[int, int]] = {}
    rows = []
    for c in plan.conditions:
        if c.probe_path not in probe_rows:
            try:
                rs = read_rows(c.probe_path)
                probe_rows[c.probe_path] = (len(rs), len({r.id for r in rs}))
            except SpatialBiasError:  # not built yet: use the build spec
                spec = plan.probes.get(c.probe, {})
                n = int(spec.get("n", 40))
                probe_rows[c.probe_path] = (9 * n * (2 if spec.get("negatives") else 1), n)
        nr, ni = probe_rows[c.probe_path]
        rows.append({"condition_id": c.id, "model": c.model, "probe": c.probe, "intervention": c.intervention,
                     "analysis": c.analysis, "seed": c.seed, "status": "done" if c.id in done else "pending",
                     "forward_rows": forward_rows(c, nr, ni, _lm_layers(c.model_path))})
    df = pd.DataFrame(rows)
    mem = [memory_row(c, plan.settings) for c in plan.conditions]
    df["rows_per_step"] = [r for r, _, _ in mem]
    df["peak_GiB"] = [round(p / 2 ** 30, 2) if p is not None else np.nan for _, p, _ in mem]
    df.attrs["memory_notes"] = sorted({n for _, _, n in mem if n})
    t = store.timings().merge(df[["condition_id", "forward_rows"]], on="condition_id")
    rate = (t.seconds / t.forward_rows).groupby([t.model, t.analysis]).median() if len(t) else pd.Series(dtype=float)
    df["est_seconds"] = [float(rate.get((m, a), np.nan)) * r for m, a, r in zip(df.model, df.analysis, df.forward_rows)]
    return df


@functools.cache
def _config(model_path: str) -> dict | None:
    from interp.load import ALIASES
    p = Path(ALIASES.get(model_path, model_path)) / "config.json"
    if not p.is_file():  # a hub id: its config.json in the HF cache, if there (nothing is downloaded)
        from huggingface_hub import try_to_load_from_cache
        try:
            got = try_to_load_from_cache(model_path, "config.json")
        except Exception:  # noqa: BLE001 — not a valid repo id: no estimate
            got = None
        p = Path(got) if isinstance(got, str) else p
    return json.loads(p.read_text()) if p.is_file() else None


def _lm_layers(model_path: str) -> int | None:
    cfg = _config(model_path)
    return None if cfg is None else cfg.get("text_config", cfg).get("num_hidden_layers")


@functools.cache
def _image_px(probe_path: str) -> tuple[int, int]:
    """(h, w) of the probe's first image; 336² when the probe is not built yet."""
    try:
        from PIL import Image

        from probes.format import find_probe, read_rows
        probe = find_probe(probe_path)
        with Image.open(probe.image_path(read_rows(probe_path)[0])) as im:
            return im.height, im.width
    except Exception:  # noqa: BLE001 — not built yet, or a layout without images: the default
        return 336, 336


def plan_budget(settings: dict) -> int | None:
    """Activation bytes per step of a plan's runs before loading: ``max_memory`` on the run's
    device (or its one size for all) less the weights, else what the device has free (the run
    measures again after loading); None when unknown (a GPU on a machine without one)."""
    dev = str(settings.get("device") or "cpu")
    mm = {} if settings.get("device_map") else settings.get("max_memory") or {}  # dispatched: bounds weights
    key = int(dev.split(":")[1]) if dev.startswith("cuda:") else 0 if dev == "cuda" else "cpu"
    if key in mm or "all" in mm:
        return int(mm.get(key, mm.get("all")))
    if dev.startswith("cuda"):
        try:
            import torch
            return int(torch.cuda.mem_get_info(key)[0]) if torch.cuda.is_available() else None
        except Exception:  # noqa: BLE001
            return None
    import psutil
    return int(psutil.virtual_memory().available)


def memory_row(cond: Condition, settings: dict) -> tuple[int, int | None, str]:
    """(rows per step, predicted peak bytes = weights + activations at those rows, note) of one
    condition, from its model's config.json (dtype and batch size from the condition, text of
    :data:`TEXT_TOKENS` tokens, images of the probe's size). Rows 0 and a note when one step does
    not fit the budget; peak None when the model has no config.json here."""
    cfg = _config(cond.model_path)
    if cfg is None:
        return 0, None, f"{cond.model}: no config.json to read shapes from; no memory estimate"
    s = Shapes.from_config(cfg, cond.options.get("dtype") or "float32", image_px=_image_px(cond.probe_path))
    room = plan_budget(settings)
    limit = int(cond.options.get("batch_size", 64))
    kinds = analysis_profiles(cond.analysis, cond.options)
    if settings.get("device_map"):  # weights placed by accelerate within max_memory; rows chosen after loading
        return limit, max(activation_peak(s, k, limit) for k in kinds), (
            f"{cond.model}: split by --device-map, so peak_GiB counts activations at {limit} rows only (the weights "
            "are placed within --max-memory per device); the run chooses its rows from what the execution device "
            "has free after loading")
    if room is None:
        return limit, s.weights + max(activation_peak(s, k, limit) for k in kinds), ""
    steps = []
    for k in kinds:  # each step of the analysis gets its own rows under the budget
        try:
            r = choose_rows(s, k, room - s.weights, limit, f"{cond.model} {cond.analysis}")
        except SpatialBiasError as e:
            return 0, s.weights + activation_peak(s, k, MIN_ROWS.get(k, 1)), str(e)
        steps.append((r, activation_peak(s, k, r)))
    return min(r for r, _ in steps), s.weights + max(p for _, p in steps), ""


def analysis_profiles(analysis: str, options: dict | None = None) -> tuple[str, ...]:
    """The memory profiles of an analysis' steps (its registered ``profile`` under ``options``):
    the dry run prices each step under the budget and reports the largest peak."""
    from analyses import registry
    p = registry.get(analysis).profile(options or {})
    return (p,) if isinstance(p, str) else tuple(p)


def profiles(name: str) -> tuple[str, ...]:
    """A memory profile named directly (:data:`analyses.registry.PROFILES`), else the profiles of
    the analysis ``name`` at its default options."""
    from analyses.registry import PROFILES
    return (name,) if name in PROFILES else analysis_profiles(name)


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
saved-tensor hooks on one Llama, Qwen2 and Gemma3 block in fp32 and bf16 (within 2 %), and per
layer in the bench section ``memory`` (docs/benchmarks.md). A vision block keeps 6 Dv + 3 Fv
(CLIP keeps 6 Dv + 2 Fv: an over-estimate there)."""
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
                pixel_bytes=facts.pixel_bytes)
        return replace(s, weights=weights if weights is not None else s.param_count(cfg) * s.bytes)

    def param_count(self, cfg: dict) -> int:
        """Parameters from the shapes (LM blocks, embeddings and head, vision blocks, projector);
        within a few % of the real count (biases and norms aside)."""
        D, F, hd = self.width, self.ffn, self.head_dim
        block = D * hd * (2 * self.heads + 2 * self.kv_heads) + 3 * D * F
        tied = cfg.get("tie_word_embeddings") or cfg.get("text_config", {}).get("tie_word_embeddings")
        lm = self.lm_layers * block + self.vocab * D * (1 if tied else 2)
        Dv, Fv = self.vision_width, self.vision_ffn
        vision = self.vision_layers * (4 * Dv * Dv + 2 * Dv * Fv) + 3 * 14 * 14 * Dv * 2
        return int(lm + vision + _facts(cfg).projector_params)

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
      and the LM's (B·L·(5.2 D + 3 F)·b): one block at a time, so no term grows with the number of
      layers but LLaVA's record of every vision block's output (it reads ``vision_feature_layer``
      from it), (Nv + 1)·B·P·Dv·b;
    * ``flow`` (attention flow: eager attention, reduced inside each block): the forward, or one
      block's attention map at its softmax (B·H·L²·(b + 8): the map, its fp32 copy and the fp32
      output) with 6 widths D alive, whichever is larger — one block's map, never all of them;
    * ``patching`` (resumed): ``rows`` // 2 = c items captured at once keep every block's residual
      stream and keys/values, 2c·L·((N+1)·D + 2N·Dkv)·b, on top of the larger of the capture's
      forward (2c rows; the forwards that stop at ``lm.input`` are no larger) and a resumed batch
      of ``rows`` rows (a block's MLP, or its attention with the reused keys and values: 6 D + 4 Dkv);
    * ``attribution`` (``rows`` // 2 = g base rows through the graph, parameters frozen, the
      source rows without it): per base row, token and LM block the norms' fp32 inputs (8 bytes
      × D for Llama and Qwen) + (2 Dq + 2 D + 2 Dkv + 3 F)·b kept for the backward
      (:func:`lm_block_saved`),
      per vision token and block 6 Dv + 3 Fv when the sites reach into the vision tower, plus
      the forward of the step.
    """
    b, B = s.bytes, max(1, rows)
    L, D, F, P = s.seq_len, s.width, s.ffn, s.vision_tokens
    Dv, Fv = s.vision_width, s.vision_ffn
    Dkv = s.kv_heads * s.head_dim

    def fwd(n: int) -> float:
        vision = n * P * max(VISION_LIVE * Dv + 3 * Fv, s.vision_attn_live * Dv) * b
        lm = n * L * (LM_LIVE * D + 3 * F) * b
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
        kept = 2 * c * L * ((s.lm_layers + 1) * D + 2 * s.lm_layers * Dkv) * b
        resumed = B * L * max(LM_LIVE * D + 3 * F, ATTN_LIVE * D + 4 * Dkv) * b
        return int(kept + max(fwd(2 * c), resumed))
    if kind == "attribution":
        g = max(1, B // 2)
        saved = g * s.lm_layers * L * lm_block_saved(s)
        if vision_sites:
            saved += g * s.vision_layers * P * (GRAD_SAVED_DV * Dv + GRAD_SAVED_FV * Fv) * b
        return int(saved + fwd(B))
    from analyses.registry import PROFILES
    raise SpatialBiasError(f"no memory profile {kind!r}; use {', '.join(PROFILES)}")


def lm_block_saved(s: Shapes, sites: bool = True) -> int:
    """Bytes autograd keeps per token of one LM block with frozen parameters (see
    :data:`GRAD_SAVED_D`); ``sites``: with the 2 D the attribution sites keep beside it."""
    Dq, Dkv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    norms = GRAD_NORM_BYTES * (s.block_norms * s.width + (Dq + Dkv if s.qk_norm else 0))
    widths = (GRAD_SAVED_D - 2) * Dq + (2 * s.width if sites else 0) + GRAD_SAVED_KV * Dkv + GRAD_SAVED_F * s.ffn
    return int(norms + widths * s.bytes)


MIN_ROWS = {"patching": 3, "attribution": 2}
"""Rows of the smallest step: patching runs a source, a base and one patched row together;
attribution a base row with its graph and its source row."""


def choose_rows(s: Shapes, analysis: str, budget: int | None, limit: int, what: str = "") -> int:
    """The most rows (≤ ``limit``) per step of memory profile ``analysis`` (or of an analysis
    whose steps share one profile) whose predicted peak fits ``budget`` bytes of activations (None:
    ``limit``). One row that does not fit is one error line naming the numbers."""
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
