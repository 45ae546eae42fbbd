"""Interventions as small serialisable configs (a sweep is a table of these): the base class,
its registry, and the helpers the concrete ones share.

An intervention has three hooks into a run, each given the validated :class:`interp.batch.Batch`
(its image map built once): ``prepare(lvlm, batch)`` may rewrite the model inputs (BaPA:
``position_ids``) and returns a Batch; ``edits(lvlm, batch)`` returns ``{site: fn}`` edits for the
prompt's forward (AGCI: ``lm.input``, the embeddings with the image features scattered in);
``decode_edits(lvlm, batch, step)`` returns the edits of generation's decode step ``step`` — an
intervention with prompt edits must say what it does there, or generation refuses it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, ClassVar

import torch

from spatialbias.errors import SpatialBiasError

Edit = Callable[[torch.Tensor], torch.Tensor]


def _image_groups(imap, pooled: bool = False):
    """Yields (row, (L,) bool mask): the patch tokens of each image of each row; ``pooled``: one
    mask per row holding every image token (LLaVA-NeXT's newline tokens included)."""
    for b in range(imap.is_image.shape[0]):
        if pooled:
            yield b, imap.is_image[b]
        else:
            for i in range(int(imap.image[b].max()) + 1):
                yield b, (imap.image[b] == i) & imap.is_patch[b]


def lm_input_edit(lvlm, fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]) -> dict[str, Edit]:
    """Edits running ``fn(x, pos)`` on ``lm.input`` x (B, L, D). ``pos``: None on a rotary LM;
    on an LM with learned absolute positions (GPT-2), whose ``lm.input`` is the scattered
    embeddings plus the position embeddings, the (B or 1, L, D) position embeddings of the same
    forward (recorded at ``lm.positions``, which runs before), so ``x − pos`` is the embeddings
    as the projector and token embedding produced them."""
    if lvlm.adapter.rope_kind(lvlm.model) != "none":
        return {"lm.input": lambda x: fn(x, None)}
    seen: dict[str, torch.Tensor] = {}

    def record(p: torch.Tensor) -> torch.Tensor:
        seen["p"] = p
        return p
    return {"lm.positions": record, "lm.input": lambda x: fn(x, seen["p"].expand(x.shape).to(x.device))}


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


KINDS: dict[str, type[Intervention]] = {}


def register(cls: type[Intervention]) -> type[Intervention]:
    """Make an intervention class known to :func:`from_dict` by its ``kind``."""
    KINDS[cls.kind] = cls
    return cls


def from_dict(d: dict[str, Any]) -> Intervention:
    """Inverse of :meth:`Intervention.to_dict`."""
    d = dict(d)
    kind = d.pop("kind", None)
    if kind not in KINDS:
        raise SpatialBiasError(f"unknown intervention kind {kind!r}; known: {', '.join(KINDS)}")
    try:
        return KINDS[kind](**d)
    except TypeError as e:
        raise SpatialBiasError(f"bad arguments for intervention {kind}: {e}") from None
