"""Interventions as small serialisable configs (a sweep is a table of these).

* :class:`BaPA` — Balanced Position Assignment: every image token gets the position id of
  the image's first token, text after the image continues at +1 (method.md §4). Only the
  ids fed to the rotary embedding change; mask, cache slots and token order do not.
* :class:`AGCI` — Adaptive Global Context Injection on the projector output:
  ``v_i' = v_i + λ (1 − cos(v_i, g)) g`` with ``g`` the mean image token (method.md §5).

An intervention has three hooks into a run, each given the validated :class:`interp.batch.Batch`
(its image map built once): ``prepare(lvlm, batch)`` may rewrite the model inputs (BaPA:
``position_ids``) and returns a Batch; ``edits(lvlm, batch)`` returns ``{site: fn}`` edits for the
prompt's forward (AGCI: ``lm.input``, the embeddings with the image features scattered in);
``decode_edits(lvlm, batch, step)`` returns the edits of generation's decode step ``step`` — an
intervention with prompt edits must say what it does there, or generation refuses it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F

from interp.errors import SpatialBiasError
from interp.sites import layer_range

Edit = Callable[[torch.Tensor], torch.Tensor]


def bapa_position_ids(input_ids: torch.Tensor, image_mask: torch.Tensor,
                      attention_mask: torch.Tensor | None = None) -> torch.LongTensor:
    """BaPA position ids, per row.

    Args:
        input_ids: (B, L) token ids (only the shape is used).
        image_mask: (B, L) bool, True at image tokens; or integer labels (0 = text,
            k ≥ 1 = image k) to separate images that touch.
        attention_mask: (B, L) 0/1; left padding is handled per row. None = all ones.

    Returns:
        (B, L) LongTensor. Real tokens count from 0 at the row's first real token; each image
        collapses to one slot (all its tokens share the id of its first token ``s``) and the
        next token gets ``s + 1``. Padding positions get 1 (HF's convention in ``generate``).
        A row without image tokens gets the ordinary ``0, 1, 2, …`` ids.
    """
    if input_ids.dim() != 2 or image_mask.shape != input_ids.shape:
        raise SpatialBiasError(f"bapa_position_ids: input_ids {tuple(input_ids.shape)} and image_mask "
                               f"{tuple(image_mask.shape)} must both be (B, L)")
    labels = image_mask.long() if image_mask.dtype == torch.bool else image_mask.long()
    real = torch.ones_like(labels, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    prev = F.pad(labels, (1, 0))[:, :-1]
    starts_image = (labels > 0) & (labels != prev)
    step = real & ((labels == 0) | starts_image)
    pos = step.long().cumsum(-1) - 1
    return pos.masked_fill(~real, 1)


def agci_inject(image_embeds: torch.Tensor, lam: float,
                tokens_per_image: int | list[int] | None = None, pooled: bool = False) -> torch.Tensor:
    """AGCI on image embeddings: ``v' = v + λ (1 − cos(v, g)) g`` with ``g`` the mean image token.

    Args:
        image_embeds: (n_images, N, D), one row per image; or (T, D) tokens of all images
            flattened (Qwen's merger output) with ``tokens_per_image`` giving the split.
        lam: λ ≥ 0; λ = 0 returns the input unchanged.
        tokens_per_image: for 2-D input, an int (equal split) or a list of counts summing to T;
            None treats all T tokens as one image.
        pooled: one ``g`` over every image in the call (the authors' Qwen/LLaVA-NeXT scope)
            instead of one per image (the default).

    Returns:
        A tensor of the same shape and dtype. Computed in the input dtype (the LM's dtype).
    """
    _check_lambda(lam)
    if lam == 0:
        return image_embeds
    if image_embeds.dim() == 3:
        groups = list(image_embeds.unbind(0))
    elif image_embeds.dim() == 2:
        T = image_embeds.shape[0]
        if tokens_per_image is None:
            sizes = [T]
        elif isinstance(tokens_per_image, int):
            if tokens_per_image <= 0 or T % tokens_per_image:
                raise SpatialBiasError(f"agci_inject: {T} tokens do not split into images of {tokens_per_image}")
            sizes = [tokens_per_image] * (T // tokens_per_image)
        else:
            sizes = [int(s) for s in tokens_per_image]
            if sum(sizes) != T:
                raise SpatialBiasError(f"agci_inject: tokens_per_image sums to {sum(sizes)}, expected {T}")
        groups = list(image_embeds.split(sizes, 0))
    else:
        raise SpatialBiasError(f"agci_inject: expected (n_images, N, D) or (T, D), got {tuple(image_embeds.shape)}")
    if pooled:
        g_all = torch.cat(groups, 0).mean(0)
    out = []
    for v in groups:
        g = g_all if pooled else v.mean(0)
        w = 1 - F.cosine_similarity(v, g.expand_as(v), dim=-1)
        out.append(v + lam * w.unsqueeze(-1) * g)
    return torch.stack(out, 0) if image_embeds.dim() == 3 else torch.cat(out, 0)


def _check_lambda(lam: Any) -> None:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
        raise SpatialBiasError(f"AGCI λ={lam!r} is out of range; use a finite number ≥ 0 (0 = off, the paper "
                               "explores 0–1)")


def _image_groups(imap, pooled: bool = False):
    """Yields (row, (L,) bool mask): the patch tokens of each image of each row; ``pooled``: one
    mask per row holding every image token (LLaVA-NeXT's newline tokens included)."""
    for b in range(imap.is_image.shape[0]):
        if pooled:
            yield b, imap.is_image[b]
        else:
            for i in range(int(imap.image[b].max()) + 1):
                yield b, (imap.image[b] == i) & imap.is_patch[b]


def _moved_image_ids(lvlm, batch, moves) -> torch.Tensor:
    """The run's position ids (given, else the model's defaults) with image tokens' ids moved among
    themselves: ``moves(imap)`` yields (row, dst, src) index tensors and token ``dst[k]`` gets the id
    (on M-RoPE the whole (t, h, w) triple) that token ``src[k]`` had. Returns (B, L) or (3, B, L)."""
    pos = batch.get("position_ids")
    pos = (pos if pos is not None else lvlm.default_position_ids(batch)).clone()
    flat = pos if pos.dim() == 2 else pos.permute(1, 2, 0)  # (B, L[, 3]) view
    src = flat.clone()
    for b, dst, frm in moves(batch.imap):
        flat[b, dst] = src[b, frm]
    return pos


@dataclass(frozen=True)
class Intervention:
    """Base class: a named, serialisable config. Subclasses set ``kind``."""
    kind: ClassVar[str] = "none"

    def prepare(self, lvlm, batch):
        """The batch with this intervention's input rewrites (a :class:`interp.batch.Batch`)."""
        return batch

    def edits(self, lvlm, batch) -> dict[str, Edit]:
        """{site: fn} edits of the prompt's forward (the whole forward without generation)."""
        return {}

    def decode_edits(self, lvlm, batch, step: int) -> dict[str, Edit]:
        """{site: fn} edits of generation's decode step ``step`` (1, 2, …; one new token each).
        An intervention whose prompt edits have no decode-step meaning declared refuses here."""
        if type(self).edits is not Intervention.edits:
            raise SpatialBiasError(f"{self.kind} does not say how it acts on decode steps, so generation with it "
                                   "would be silently wrong; use a forward (run / trace without max_new_tokens)")
        return {}

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}

    @property
    def label(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in asdict(self).items())
        return f"{self.kind}({args})" if args else self.kind


BAPA_VARIANTS = ("reference", "keep_hw")


@dataclass(frozen=True)
class BaPA(Intervention):
    """All image tokens share one position id; text continues from it + 1 (method.md §4).

    Each image collapses separately; rows are computed from the attention mask (left
    padding); the mask is always passed with the new ids. On M-RoPE models (Qwen2-VL,
    Qwen2.5-VL) ``variant="reference"`` (the authors') writes the 1-D scheme into all three
    rows, so image tokens lose their (row, col) rotary structure; ``variant="keep_hw"`` keeps
    it: an image token at patch (r, c) gets (t, h, w) = (s, s + r, s + c), text after the image
    still continues at s + 1 on every row. 1-D models have only the reference variant.
    """
    kind: ClassVar[str] = "bapa"
    variant: str = "reference"

    def __post_init__(self):
        if self.variant not in BAPA_VARIANTS:
            raise SpatialBiasError(f"BaPA variant {self.variant!r} is unknown; use one of {', '.join(BAPA_VARIANTS)}")

    def position_ids(self, lvlm, batch) -> torch.Tensor:
        """(B, L) ids, or (3, B, L) on M-RoPE models."""
        batch = lvlm.batch(batch)
        imap = batch.imap
        pos = bapa_position_ids(batch["input_ids"], imap.labels(), batch["attention_mask"])
        if lvlm.adapter.rope_kind(lvlm.model) != "mrope":
            if self.variant != "reference":
                raise SpatialBiasError(f"BaPA variant {self.variant!r} needs M-RoPE (Qwen2-VL, Qwen2.5-VL); "
                                       f"{lvlm.adapter.name} uses 1-D RoPE: use BaPA()")
            return pos
        pos = pos.unsqueeze(0).repeat(3, 1, 1)
        if self.variant == "keep_hw":
            pos[1] += imap.row.clamp(min=0)
            pos[2] += imap.col.clamp(min=0)
        return pos

    def prepare(self, lvlm, batch):
        batch = lvlm.batch(batch)
        return batch.replace(position_ids=self.position_ids(lvlm, batch))


@dataclass(frozen=True)
class AGCI(Intervention):
    """Global image context injected into every image token as the LM receives it.

    Acts on ``lm.input`` at the image-token positions, which hold the projector (Qwen: merger)
    output unchanged, so this equals editing the projector output before the scatter. Per image
    (default) ``g`` is the mean of that image's patch tokens and only they change; with
    ``pooled=True`` ``g`` is the mean over every image token of the sequence — LLaVA-NeXT's
    newline tokens included, as in the authors' code — and all of them change.
    """
    kind: ClassVar[str] = "agci"
    lam: float = 0.5
    pooled: bool = False

    def __post_init__(self):
        _check_lambda(self.lam)

    def strength(self, v: torch.Tensor) -> float:
        """λ for one image's tokens ``v`` (N, D); fixed here, computed from ``v`` by :class:`AdaptiveAGCI`."""
        return self.lam

    def edits(self, lvlm, batch):
        if self.lam == 0:
            return {}
        imap = lvlm.batch(batch).imap

        def inject(h: torch.Tensor) -> torch.Tensor:
            h = h.clone()
            for b, sel in _image_groups(imap, self.pooled):
                if sel.any():
                    h[b, sel] = agci_inject(h[b, sel], self.strength(h[b, sel]))
            return h
        return {"lm.input": inject}

    def decode_edits(self, lvlm, batch, step):
        """Nothing: AGCI acts on the image tokens, which only the prompt's forward holds."""
        return {}


ADAPTIVE_RULES = ("cos_spread", "norm_ratio")


def adaptive_lambda(v: torch.Tensor, rule: str, scale: float = 1.0, lam_max: float = 4.0) -> float:
    """λ for one image from its own tokens ``v`` (N, D), clipped to [0, lam_max].

    * ``cos_spread``: ``scale · std_i cos(v_i, g)`` — inject in proportion to how unequal the
      tokens' alignment with the global context is (0 when every token points along ``g``).
    * ``norm_ratio``: ``scale · mean_i ‖v_i‖ / ‖g‖`` — makes the injected term ``λ w_i g`` a fixed
      share (``scale · w_i``) of the typical token norm, so one ``scale`` means the same thing on
      models whose embeddings have different norms (the paper's fixed λ does not).
    """
    if rule not in ADAPTIVE_RULES:
        raise SpatialBiasError(f"adaptive AGCI rule {rule!r} is unknown; use one of {', '.join(ADAPTIVE_RULES)}")
    v = v.detach().float()  # λ is a per-input constant, not part of the graph
    g = v.mean(0)
    if rule == "cos_spread":
        lam = scale * float(F.cosine_similarity(v, g.expand_as(v), dim=-1).std(correction=0))
    else:
        lam = scale * float(v.norm(dim=-1).mean() / g.norm().clamp_min(1e-12))
    return min(max(lam, 0.0), lam_max)


@dataclass(frozen=True)
class AdaptiveAGCI(AGCI):
    """AGCI with λ set per image from its own tokens by :func:`adaptive_lambda` (the paper's open
    question 3). ``lam`` is unused (kept at its default); ``scale`` and ``lam_max`` shape the rule."""
    kind: ClassVar[str] = "agci_adaptive"
    rule: str = "cos_spread"
    scale: float = 1.0
    lam_max: float = 4.0

    def __post_init__(self):
        _check_lambda(self.scale)
        _check_lambda(self.lam_max)
        adaptive_lambda(torch.ones(1, 1), self.rule)  # validates the rule name

    def strength(self, v: torch.Tensor) -> float:
        return adaptive_lambda(v, self.rule, self.scale, self.lam_max)

    def lambdas(self, lvlm, inputs) -> list[float]:
        """The λ the rule picks for every image of ``inputs`` (row by row, image by image; pooled:
        one per row), read from the LM input of one forward with this intervention off."""
        from interp.dispatch import forward
        t = forward(lvlm, inputs, cache=["lm.input"])
        h = t.cache["lm.input"]
        return [self.strength(h[b, sel]) for b, sel in _image_groups(t.batch.imap, self.pooled) if sel.any()]

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d.pop("lam")
        return d


KINDS: dict[str, type[Intervention]] = {}


def register(cls: type[Intervention]) -> type[Intervention]:
    """Make an intervention class known to :func:`from_dict` by its ``kind``."""
    KINDS[cls.kind] = cls
    return cls


register(BaPA)
register(AGCI)
register(AdaptiveAGCI)


def from_dict(d: dict[str, Any]) -> Intervention:
    """Inverse of :meth:`Intervention.to_dict`."""
    import interp.attention  # noqa: F401  (registers Knockout)
    d = dict(d)
    kind = d.pop("kind", None)
    if kind not in KINDS:
        raise SpatialBiasError(f"unknown intervention kind {kind!r}; known: {', '.join(KINDS)}")
    try:
        return KINDS[kind](**d)
    except TypeError as e:
        raise SpatialBiasError(f"bad arguments for intervention {kind}: {e}") from None


@dataclass(frozen=True)
class PositionSwap(Intervention):
    """Position-id patching: the image tokens of cell ``a`` get the position ids of cell ``b``'s
    tokens and vice versa (per image, patch by patch in raster order; the cells must hold the
    same number of patches), in every LM layer or only in ``layers`` = (start, stop).

    Run on the corrupt placement with a = the target's cell there and b = its cell in the clean
    placement, the target's content is read at the clean target's positions: the direct causal
    test of the RoPE hypothesis. On M-RoPE models all three rows are swapped.
    """
    kind: ClassVar[str] = "position_swap"
    a: int = 0
    b: int = 8
    layers: tuple[int, int] | None = None
    grid: tuple[int, int] = (3, 3)

    def swapped_ids(self, lvlm, batch) -> torch.Tensor:
        """(B, L) or (3, B, L): the run's ids with cells a and b swapped."""
        batch = lvlm.batch(batch)
        def moves(imap):
            cells = imap.cells(*self.grid)
            for b, sel in _image_groups(imap):
                ia = (sel & (cells[b] == self.a)).nonzero().flatten()
                ib = (sel & (cells[b] == self.b)).nonzero().flatten()
                if len(ia) != len(ib):
                    raise SpatialBiasError(f"cells {self.a} and {self.b} hold {len(ia)} and {len(ib)} patches; "
                                           "position swap needs equal counts")
                yield b, torch.cat([ia, ib]), torch.cat([ib, ia])
        return _moved_image_ids(lvlm, batch, moves)

    def prepare(self, lvlm, batch):
        batch = lvlm.batch(batch)
        if self.layers is None:
            return batch.replace(position_ids=self.swapped_ids(lvlm, batch))
        return batch

    def edits(self, lvlm, batch):
        if self.layers is None:
            return {}
        pos = self.swapped_ids(lvlm, batch)
        like = next(lvlm.model.parameters())
        out = {}
        for i in layer_range(lvlm.adapter.layer_count(lvlm.model, "lm"), self.layers):
            rope = lvlm.adapter.rotary(lvlm.model, like, pos, i)
            out[f"lm.blocks.{i}#position_embeddings"] = lambda _old, r=rope: r
        return out

    def decode_edits(self, lvlm, batch, step):
        """Nothing: decode tokens are text, whose ids the swap leaves alone; the image tokens' keys
        were rotated with the swapped ids in the prompt's forward and are read from the cache."""
        return {}


register(PositionSwap)


POSITION_CONTROLS = ("shuffle", "reverse")


@dataclass(frozen=True)
class PositionPermute(Intervention):
    """Position-id control: each image's tokens keep their content and sequence slots but take
    each other's position ids — ``reverse`` (the last patch gets the first patch's id, …) or
    ``shuffle`` (a fixed random permutation from ``seed``). On M-RoPE models a token takes another
    token's whole (t, h, w) triple. If a model's bias follows the position ids, ``reverse`` mirrors
    its per-cell profile (cell k ↔ cell 8 − k on a 3×3 grid); a bias carried by the content does not move.
    """
    kind: ClassVar[str] = "positions"
    mode: str = "reverse"
    seed: int = 0

    def __post_init__(self):
        if self.mode not in POSITION_CONTROLS:
            raise SpatialBiasError(f"position control {self.mode!r} is unknown; use one of {', '.join(POSITION_CONTROLS)}")

    def position_ids(self, lvlm, batch) -> torch.Tensor:
        """(B, L) ids, or (3, B, L) on M-RoPE models."""
        batch = lvlm.batch(batch)

        def moves(imap):
            gen = torch.Generator().manual_seed(self.seed)
            for b, sel in _image_groups(imap):
                idx = sel.nonzero().flatten()
                perm = idx.flip(0) if self.mode == "reverse" else idx[torch.randperm(len(idx), generator=gen).to(idx.device)]
                yield b, idx, perm
        return _moved_image_ids(lvlm, batch, moves)

    def prepare(self, lvlm, batch):
        batch = lvlm.batch(batch)
        return batch.replace(position_ids=self.position_ids(lvlm, batch))


register(PositionPermute)
