"""Validated model inputs: the one object every runner takes.

:class:`Batch` is a read-only mapping over the processor's tensors (so ``model(**batch)`` works)
that was checked once and carries what every analysis needs about it:

* left padding: every row ends with a real token, so the answer is read at position −1.
  Right-padded inputs are converted (each row rolled so its padding comes first: an exact
  re-layout, tested against the processor's own left padding); padding holes inside a row are
  refused with one line;
* an attention mask (all ones when none was given: custom position ids need one);
* the LM image-token map, built once (:mod:`interp.imagemap`), and which images belong to which
  row, so rows can be selected or repeated with their own images whatever their number.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Iterator, Sequence

import torch

from spatialbias.errors import SpatialBiasError
from interp.imagemap import ImageTokenMap

SEQ_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")
"""Per-token (B, L) inputs; ``position_ids`` is (B, L) or (3, B, L)."""


class Batch(Mapping):
    """Processor inputs, validated (see module doc). ``imap``: the LM image map (B, L);
    ``image_row``: (n_images,) the row of every image in processor order; ``images_per_row``."""

    def __init__(self, tensors: dict[str, Any], imap: ImageTokenMap, image_row: torch.Tensor, owner: int):
        self._t = tensors
        self.imap = imap
        self.image_row = image_row
        self._owner = owner

    # Mapping interface: the tensors, as the processor made them
    def __getitem__(self, k: str) -> Any:
        return self._t[k]

    def __iter__(self) -> Iterator[str]:
        return iter(self._t)

    def __len__(self) -> int:
        return len(self._t)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}={tuple(v.shape)}" for k, v in self._t.items() if isinstance(v, torch.Tensor))
        return f"Batch({shapes})"

    @property
    def rows(self) -> int:
        return int(self._t["input_ids"].shape[0])

    @property
    def images_per_row(self) -> list[int]:
        return torch.bincount(self.image_row.cpu(), minlength=self.rows).tolist()

    def replace(self, **changes: Any) -> "Batch":
        """The same batch with some tensors replaced (e.g. ``position_ids``); the image map is kept,
        so only changes that leave the token layout alone belong here."""
        return Batch({**self._t, **changes}, self.imap, self.image_row, self._owner)

    def tensors(self) -> dict[str, Any]:
        return dict(self._t)

    def need_one_image_per_row(self, what: str) -> None:
        """Refuse (one line) an analysis that needs exactly one image in every row."""
        bad = [r for r, n in enumerate(self.images_per_row) if n != 1]
        if bad:
            raise SpatialBiasError(f"{what} needs exactly one image per row; row {bad[0]} has "
                                   f"{self.images_per_row[bad[0]]}: give one image per prompt")


def validate(lvlm, inputs: Mapping[str, Any]) -> Batch:
    """``inputs`` checked and laid out for ``lvlm`` (a Batch made for the same model is returned as is)."""
    if isinstance(inputs, Batch) and inputs._owner == id(lvlm):
        return inputs
    t = dict(inputs)
    ids = t.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise SpatialBiasError("inputs need 'input_ids' of shape (batch, length); build them with LVLM.inputs")
    mask = t.get("attention_mask")
    if mask is None:
        t["attention_mask"] = mask = torch.ones_like(ids)
    if mask.shape != ids.shape:
        raise SpatialBiasError(f"attention_mask {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}")
    t = _left_padded(t)
    img = lvlm.image_mask(t["input_ids"])
    has_pixels = any(k.startswith("pixel_values") for k in t)
    if has_pixels and not bool(img.any(-1).all()):
        raise SpatialBiasError(f"an input row has pixel values but no image token {lvlm.image_token!r}; "
                               "build prompts with LVLM.prompt(text)")
    if not has_pixels and bool(img.any()):
        raise SpatialBiasError("the prompts hold image tokens but the inputs have no pixel values; "
                               "build them with LVLM.inputs(images, prompts)")
    imap = lvlm.image_map_of(t)
    n_img = lvlm.adapter.image_counts(t)
    image_row = torch.cat([torch.full((int(imap.image[b].max()) + 1,), b) for b in range(ids.shape[0])]) \
        if bool(imap.is_image.any()) else torch.zeros(0, dtype=torch.long)
    if len(image_row) != n_img:
        raise SpatialBiasError(f"the prompts hold {len(image_row)} image(s) but the inputs carry {n_img}; "
                               "give one marker per image (LVLM.inputs checks this)")
    return Batch(t, imap, image_row, id(lvlm))


def _left_padded(t: dict[str, Any]) -> dict[str, Any]:
    """Convert right padding to left padding, row by row; refuse padding inside a row."""
    mask = t["attention_mask"].bool()
    n_real = mask.sum(-1)
    L = mask.shape[1]
    left_ok = mask == (torch.arange(L, device=mask.device)[None] >= (L - n_real)[:, None])
    if bool(left_ok.all()):
        return t
    right_ok = mask == (torch.arange(L, device=mask.device)[None] < n_real[:, None])
    bad = ~(left_ok.all(-1) | right_ok.all(-1))
    if bool(bad.any()):
        r = int(bad.nonzero()[0])
        raise SpatialBiasError(f"row {r} of the attention mask has padding between real tokens; give left- or "
                               "right-padded rows (LVLM.inputs pads on the left)")
    # right-padded rows roll their padding to the front; left-padded rows stay (a batch may mix both)
    shift = torch.where(left_ok.all(-1), 0, L - n_real).tolist()
    out = dict(t)
    for k, v in t.items():
        if k in SEQ_KEYS or k == "position_ids":
            rolled = v.clone()
            for b, s in enumerate(shift):
                if s:
                    rolled[..., b, :] = v[..., b, :].roll(s, -1)
            out[k] = rolled
    return out


def select_rows(lvlm, batch: Batch, rows: Sequence[int]) -> Batch:
    """The rows (repeats allowed) with their own images, whatever their number per row: per-row
    tensors are indexed by row, image inputs by the rows' images (the adapter knows which is which)."""
    rows = [int(r) for r in rows]
    B = batch.rows
    if any(not 0 <= r < B for r in rows):
        raise SpatialBiasError(f"row index out of range 0..{B - 1}: {rows}")
    per_row = {b: (batch.image_row == b).nonzero().flatten().tolist() for b in set(rows)}
    images = [i for r in rows for i in per_row[r]]
    image_keys = set(lvlm.adapter.image_inputs)
    idx = torch.as_tensor(rows, dtype=torch.long, device=batch["input_ids"].device)
    out = {}
    for k, v in batch.items():
        if k in image_keys:
            continue
        if k == "position_ids" and isinstance(v, torch.Tensor):
            out[k] = v[..., idx, :]
        elif isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == B:
            out[k] = v[idx]
        else:
            raise SpatialBiasError(f"input {k!r} of shape {tuple(getattr(v, 'shape', ()))} is neither per row nor "
                                   f"per image; row selection cannot split it")
    out.update(lvlm.adapter.select_images(batch, images))
    ridx = idx.to(batch.imap.image.device)
    imap = ImageTokenMap(**{f: getattr(batch.imap, f)[ridx] for f in
                            ("image", "view", "row", "col", "rows", "cols")},
                         batch_row=torch.arange(len(rows), device=ridx.device)[:, None].expand(-1, batch.imap.image.shape[1]).clone())
    image_row = torch.cat([torch.full((len(per_row[r]),), k) for k, r in enumerate(rows)]) if images \
        else torch.zeros(0, dtype=torch.long)
    return Batch(out, imap, image_row, batch._owner)


def concat(lvlm, a: Batch, b: Batch) -> Batch:
    """Rows of ``a`` then rows of ``b`` (equal sequence lengths), each with its images."""
    if a["input_ids"].shape[1] != b["input_ids"].shape[1]:
        raise SpatialBiasError("batches to join must have equal sequence lengths (same prompts)")
    if set(a) != set(b):
        raise SpatialBiasError(f"batches to join have different inputs: {sorted(set(a) ^ set(b))}")
    t = {}
    for k in a:
        x, y = a[k], b[k]
        if not isinstance(x, torch.Tensor):
            t[k] = x
        elif k == "position_ids":
            t[k] = torch.cat([x, y], -2)
        else:
            t[k] = torch.cat([x, y], 0)
    return validate(lvlm, t)
