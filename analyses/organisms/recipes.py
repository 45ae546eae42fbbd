"""The zoo's recipes: one small frozen dataclass per organism, in :data:`RECIPES`.

A recipe fixes everything that decides the weights except the seed and the thread count:
architecture, vocabulary, task, target-cell weights, optimiser, stop rule, which parts train,
whether BaPA position ids are used in training, an optional text-only pretraining stage, an
optional LoRA fine-tuning of another recipe's checkpoint. ``expected`` states in machine-readable
form what the construction is meant to show; ``description`` says in plain words what it does
and what it does NOT say about pretrained LVLMs. Measured results live in docs/zoo.md.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from analyses.organisms import build

SKEW = tuple(float(k * k) for k in range(1, 10))
"""Row-major target-cell weights 1², 2², …, 9²: top-left 0.35 % of targets, bottom-right 28 %."""
UNIFORM = (1.0,) * 9
PARTS = ("vision", "projector", "lm")
LATE_FIELDS = {"first_kind_until": None}
"""Recipe fields added after the first checkpoints were shipped, with their defaults."""


@dataclass(frozen=True)
class TextStage:
    """Text-only pretraining of the LM (and its unembedding) before any image, on
    :func:`analyses.organisms.data.recency_batch`: AdamW at ``lr`` (cosine over ``steps``) until
    the running accuracy reaches ``stop_acc`` after ``min_steps`` (None: all ``steps``)."""
    steps: int = 1500
    stop_acc: float | None = 0.90
    min_steps: int = 50
    n_items: tuple[int, int] = (5, 12)
    skew: float = 2.0
    copies: int = 2
    lr: float = 2e-3
    batch: int = 128


@dataclass(frozen=True)
class Lora:
    """LoRA on the LM's attention and MLP projections (peft), merged into the weights at the end."""
    r: int = 8
    alpha: int = 16


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    expected: dict[str, Any] = field(default_factory=dict)
    arch: str = "llava-llama"
    extra_words: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ("colour",)
    cell_weights: tuple[float, ...] = SKEW
    batch: int = 128
    lr: float = 2e-3
    warmup: int = 100
    max_steps: int = 3000
    min_steps: int = 50
    stop_acc: float | None = 0.80
    bapa_train: bool = False
    shuffle_image_tokens: bool = False
    fill_weights: tuple[float, ...] | None = None
    vision_pos_std: float | None = None
    train_parts: tuple[str, ...] = PARTS
    text_stage: TextStage | None = None
    vision_from: str | None = None
    base: str | None = None
    lora: Lora | None = None
    first_kind_until: float | None = None

    def __post_init__(self):
        if set(self.train_parts) - set(PARTS):
            raise ValueError(f"{self.name}: unknown parts {set(self.train_parts) - set(PARTS)}; use {PARTS}")
        if self.lora is not None and self.base is None:
            raise ValueError(f"{self.name}: LoRA needs a base recipe to fine-tune")
        if self.stop_acc is None and self.max_steps < 1:
            raise ValueError(f"{self.name}: a fixed-length run needs max_steps ≥ 1")

    def training_config(self) -> dict[str, Any]:
        """Every field that decides the weights (all but name, description and expected); fields
        added after checkpoints were shipped (:data:`LATE_FIELDS`) only when not at their default,
        so older fingerprints stay valid."""
        d = asdict(self)
        for k in ("name", "description", "expected"):
            d.pop(k)
        for k, default in LATE_FIELDS.items():
            if d[k] == default:
                d.pop(k)
        return json.loads(json.dumps(d))

    def fingerprint(self) -> str:
        """sha256 of :meth:`training_config` (with the base recipe's, recursively): the cache key."""
        d = self.training_config()
        for k in ("base", "vision_from"):
            if d[k]:
                d[k] = RECIPES[d[k]].fingerprint()
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()

    def with_(self, **changes) -> "Recipe":
        """A copy with some fields changed (e.g. ``max_steps`` for a short test run)."""
        return replace(self, **changes)


_NOT_LVLM = "It is a fact about this training recipe and says nothing about pretrained LVLMs."

RECIPES: dict[str, Recipe] = {r.name: r for r in [
    Recipe(
        "planted-lm",
        "The shipped organism (CLIP + projector + Llama with RoPE): planted on purpose: training targets were "
        "placed with cell weights 1, 4, 9, ..., 81 (k squared, row-major from top-left to bottom-right) and "
        "training stopped at 80% running training accuracy, so rare cells are answered worse. The LM reads the "
        "target's cell from the image tokens' RoPE position ids; BaPA (one shared id) is expected to remove most "
        "of the bias. It shows that a skewed, under-trained LVLM can store a position prior in its LM's position "
        "ids and that the toolkit finds it there. " + _NOT_LVLM,
        expected={"bias": True, "locus": "lm_position_ids", "bapa_removes": True}),
    Recipe(
        "uniform",
        "The planted-lm recipe with uniform target cells, stopped at the same 80% running accuracy: the null "
        "organism. Any per-cell difference it shows is noise or an artefact of under-training, not a position "
        "prior; it calibrates how large a range the probes report when there is no planted bias. It does not show "
        "that architectures like this are free of bias when trained on real data. " + _NOT_LVLM,
        cell_weights=UNIFORM, expected={"bias": False}),
    Recipe(
        "planted-order",
        "The planted skew, trained with BaPA position ids in the LM (all image tokens share one RoPE id; the "
        "attention mask is passed). BaPA removes the ids' information but keeps the causal mask, so the LM can "
        "still tell the 9 image tokens apart by their order (token k attends to tokens 0..k). This recipe was "
        "built as 'planted-vision'; the token-reversal control showed its bias follows the sequence slot, not "
        "the image content, so it is an LM bias that BaPA cannot remove. It shows that collapsing position ids "
        "does not make an LM blind to token order; it does not show that pretrained LVLMs use the order. "
        + _NOT_LVLM,
        bapa_train=True, expected={"bias": True, "locus": "lm_causal_order", "bapa_removes": False}),
    Recipe(
        "planted-vision",
        "The planted skew, with the LM made blind to where an image token came from: BaPA position ids in "
        "training (one shared RoPE id) AND the 9 image tokens fed to the LM in a random order per sample (so "
        "neither ids nor causal order tell cells apart); CLIP's position embeddings are initialised with std "
        "2.0 (HF's default is 0.02) so the tower's patch features depend strongly on position. What position "
        "dependence the model learns must then live in the vision tower or projector. Expected: BaPA at "
        "inference (its training condition) does NOT remove the bias, and reversing the image-token order "
        "does not move it. Plain ids at inference are off-distribution for it. It shows that a bias can sit "
        "before the LM, out of reach of LM-side fixes; it does not say where bias lives in pretrained LVLMs. "
        + _NOT_LVLM,
        bapa_train=True, shuffle_image_tokens=True, vision_pos_std=2.0,
        expected={"bias": True, "locus": "vision_or_projector", "bapa_removes": False}),
    Recipe(
        "learned-absolute",
        "The planted skew with GPT-2 as the LM: learned absolute position embeddings (wpe) instead of RoPE, "
        "the ids passed as position_ids. BaPA then gives every image token the same absolute embedding. "
        "Question it answers for this toy: does one shared absolute position remove a position prior as it does "
        "for RoPE (the causal mask still orders the tokens)? It does not say how LVLMs with absolute positions "
        "behave at scale. " + _NOT_LVLM,
        arch="llava-gpt2", expected={"bias": True, "locus": "lm_position_ids", "bapa_removes": None}),
    Recipe(
        "mrope",
        "The planted skew on a Qwen2-VL-class model: Qwen2-VL ViT (no absolute position embeddings) + 2x2 merger "
        "(one merged token per cell) + Qwen2 LM with 2-D M-RoPE, image token (r, c) at (t, h, w) = (s, s+r, s+c). "
        "Compares BaPA's reference variant (all three rows 1-D: the (row, col) structure is gone) with keep_hw "
        "(t collapsed, h/w offsets kept). Expected: reference removes most of the bias; keep_hw, which keeps "
        "the cell readable from h/w, removes less. It shows how the two variants differ on a model whose bias "
        "sits in M-RoPE ids; it says nothing about Qwen2-VL checkpoints. " + _NOT_LVLM,
        arch="qwen2vl",
        expected={"bias": True, "locus": "lm_position_ids", "bapa_removes": {"reference": True, "keep_hw": False}}),
    Recipe(
        "deepstack",
        "The planted skew (planted-lm's cell weights 1, 4, ..., 81 and its stop at 80% running accuracy) on a "
        "Qwen3-VL-class model: Qwen3-VL ViT with learned position embeddings (HF's init, std 0.02) + 2x2 merger "
        "(one merged token per cell) + DeepStack (vision block 0's features, through a merger of their own, added "
        "to the LM's residual stream at the 9 image positions after LM block 0) + Qwen3 LM with interleaved "
        "M-RoPE, image token (r, c) at (t, h, w) = (s, s+r, s+c). Vision features thus enter the LM twice, at its "
        "input and inside it. Pre-registered (docs/zoo_preregistration.md): the bias is expected in the LM's "
        "position ids, not in the vision side that DeepStack feeds into the LM. It shows whether the toolkit's "
        "decomposition still finds a planted LM-side bias when vision features also enter after the first LM "
        "block; it says nothing about Qwen3-VL checkpoints. " + _NOT_LVLM,
        arch="qwen3vl", expected={"bias": True, "locus": "lm_position_ids", "preregistered": True}),
    Recipe(
        "where",
        "Uniform target cells, two questions: 'what colour is the <shape> ?' (answer a colour) and 'where is "
        "the <shape> ?' (answer one of 9 cell words). The colour question alone until its running accuracy "
        "reaches 80%, then the two alternate batch by batch until both reach 80%. The where-question needs "
        "position; the organism may read it from the LM's position ids or from CLIP's position embeddings. "
        "Measures what BaPA costs on a task that needs location versus one that does not. It does not say "
        "how much location pretrained LVLMs read from position ids. " + _NOT_LVLM,
        cell_weights=UNIFORM, kinds=("colour", "where"), extra_words=build.WHERE_WORDS, first_kind_until=0.80,
        expected={"bias": False, "bapa_cost": {"where": "large", "colour": "small"}}),
    Recipe(
        "recency",
        "Exploratory, pre-registered (docs/zoo_preregistration.md). The Llama LM is first pretrained alone on "
        "text with a recency prior (items as colour-shape words, targets drawn with weight (i+1)^2 towards the "
        "question, answer = the last copy's colour); then LM and vision tower are frozen (the tower taken from "
        "the uniform organism of the same seed) and only the projector learns the grid task with UNIFORM target "
        "cells (LLaVA's stage-1 alignment in miniature). Hypothesis: the LM's text prior makes cells later in "
        "the sequence (bottom row) more accurate, with no skew in the image data. It can show that an LM prior "
        "learned on text may surface as a spatial bias; it does not show that pretrained LVLMs have one. "
        + _NOT_LVLM,
        cell_weights=UNIFORM, extra_words=build.ITEM_WORDS, text_stage=TextStage(), vision_from="uniform",
        train_parts=("projector",),
        expected={"bias": None, "hypothesis": "accuracy rises with cell index (recency)", "preregistered": True}),
    Recipe(
        "lora",
        "The planted-lm checkpoint of the same seed, LoRA-fine-tuned (r 8, alpha 16, on the LM's attention and MLP "
        "projections; vision and projector frozen) for 300 steps on UNIFORM target cells with ordinary position "
        "ids; the adapter is merged into an ordinary checkpoint. The control arm of the paper's lightweight "
        "fine-tuning. It shows what balanced data alone does to a planted position prior in this toy. " + _NOT_LVLM,
        base="planted-lm", lora=Lora(), cell_weights=UNIFORM, stop_acc=None, max_steps=300, warmup=30,
        lr=2e-3, expected={"bias": "reduced", "compare": "lora-bapa"}),
    Recipe(
        "lora-bapa",
        "As lora, but with BaPA position ids during the fine-tuning (the paper's BaPA fine-tuning, with LoRA): "
        "the LM adapts to image tokens sharing one position. Expected flatter than lora under BaPA at "
        "inference. It shows what BaPA fine-tuning does to a planted LM position prior in this toy. " + _NOT_LVLM,
        base="planted-lm", lora=Lora(), cell_weights=UNIFORM, stop_acc=None, max_steps=300, warmup=30,
        lr=2e-3, bapa_train=True, expected={"bias": "reduced", "compare": "lora", "flatter_under_bapa": True}),
    Recipe(
        "blind",
        "The planted-lm data (the same skewed target cells) on an architecture that cannot see position: CLIP "
        "with zero, frozen position embeddings and a one-layer Llama whose rotary angles are scaled to nothing, "
        "so the model is invariant to permuting the grid's cells by construction (tests check it on permuted "
        "images). The null that the uniform organism is not: whatever it learns, it cannot answer a cell worse "
        "than another, so the toolkit must report no significant bias and decompose nothing. It shows that "
        "the statistics do not invent a bias where none can exist. " + _NOT_LVLM,
        arch="llava-blind", expected={"bias": False, "invariant": True}),
    Recipe(
        "vision-only",
        "The planted-lm data (the same skewed target cells) on an architecture whose LM cannot see position: "
        "the blind organism's one-layer Llama with its rotary angles scaled to nothing (its answer position "
        "reads the tokens as a set, so neither position ids nor token order can tell cells apart), with CLIP's "
        "learned position embeddings kept and initialised with std 2.0 (as planted-vision) so the tower's "
        "features depend on position. Whatever depends on the cell is made before the LM, by construction: the "
        "positive control for 'vision side' under ordinary ids (round 3 of docs/diagnosis_preregistration.md). "
        "It shows that the diagnosis can find a bias that lives before the LM; it does not say where bias "
        "lives in pretrained LVLMs. " + _NOT_LVLM,
        arch="llava-lmblind", vision_pos_std=2.0,
        expected={"bias": True, "locus": "vision_or_projector", "bapa_removes": False}),
]}
