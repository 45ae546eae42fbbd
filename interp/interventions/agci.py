"""AGCI — Adaptive Global Context Injection (method.md §5) on the image tokens as the LM receives
them: ``v_i' = v_i + λ (1 − cos(v_i, g)) g`` with ``g`` the mean image token; and adaptive AGCI,
with λ set per image from its own tokens."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from spatialbias.errors import SpatialBiasError
from interp.interventions.base import Intervention, _image_groups, lm_input_edit, register


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


@dataclass(frozen=True)
class AGCI(Intervention):
    """Global image context injected into every image token as the LM receives it.

    Acts on ``lm.input`` at the image-token positions, which hold the projector (Qwen: merger)
    output unchanged, so this equals editing the projector output before the scatter. On an LM
    with learned absolute positions (GPT-2), whose ``lm.input`` also holds the position
    embeddings, ``v`` and ``g`` are read without them and ``λ w g`` is added to the features alone. Per image
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

        def inject(h: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
            """h: (B, L, D) lm.input; pos: its (B, L, D) position embeddings (learned-absolute LM) or None."""
            v = h if pos is None else h - pos  # the image features as the projector produced them
            out = h.clone()
            for b, sel in _image_groups(imap, self.pooled):
                if sel.any():
                    sel = sel.to(h.device)
                    x = v[b, sel]
                    out[b, sel] = agci_inject(x, self.strength(x)) + (0 if pos is None else pos[b, sel])
            return out
        return lm_input_edit(lvlm, inject)

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
        learned = lvlm.adapter.rope_kind(lvlm.model) == "none"
        t = forward(lvlm, inputs, cache=["lm.input"] + (["lm.positions"] if learned else []))
        h = t.cache["lm.input"]
        if learned:  # the image features without the position embeddings, as AGCI reads them
            h = h - t.cache["lm.positions"].expand(h.shape).to(h.device)
        return [self.strength(h[b, sel.to(h.device)]) for b, sel in _image_groups(t.batch.imap, self.pooled) if sel.any()]

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d.pop("lam")
        return d


KINDS: dict[str, type[Intervention]] = {}


register(AGCI)
register(AdaptiveAGCI)
