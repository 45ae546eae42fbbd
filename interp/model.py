"""The wrapper every analysis runs through: an HF LVLM + its processor + its adapter."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from PIL import Image

from interp import imagemap, prompts
from interp.adapters import Adapter
from interp.errors import SpatialBiasError
from interp.hooks import edit_sites, then
from interp.interventions import Edit, Intervention


class LVLM:
    """An HF vision-language model ready for probing and interventions.

    Attributes: ``model`` (the HF model, eval mode), ``processor`` (its HF processor),
    ``adapter`` (canonical site names → HF paths), ``name`` (what the user asked for),
    ``source`` (the resolved folder or hub id, None for an in-memory model).
    """

    def __init__(self, model: torch.nn.Module, processor: Any, adapter: Adapter, name: str = "",
                 source: str | None = None):
        self.model, self.processor, self.adapter, self.name = model.eval(), processor, adapter, name
        self.source = source  # the folder or hub id the weights came from; None for in-memory models
        self.image_token_id = adapter.image_token_id(model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def tokenizer(self):
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def image_token(self) -> str:
        return self.tokenizer.convert_ids_to_tokens(self.image_token_id)

    @property
    def image_marker(self) -> str:
        """The string a prompt holds where an image goes (``<image>``, ``<|image_pad|>``, ``<start_of_image>``)."""
        return getattr(self.processor, self.adapter.prompt_marker, None) or self.image_token

    # ---------------------------------------------------------------- inputs
    def prompt(self, text: str, n_images: int = 1) -> str:
        """One user turn with ``n_images`` images then ``text``, as the model sees it: the
        processor's chat template, else the architecture's published format, else
        ``"<marker>\\ntext"`` (:func:`interp.prompts.prompt`, the one prompt builder)."""
        return prompts.prompt(self.processor, self.adapter.name, self.image_marker, text, n_images)

    def inputs(self, images: Sequence[Image.Image] | Sequence[Sequence[Image.Image]],
               prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Processor inputs, left padded (the answer is at position −1).

        ``images``: one image per prompt, or a list of images per prompt (one marker each).
        """
        nested = [list(im) if isinstance(im, (list, tuple)) else [im] for im in images]
        if len(nested) != len(prompts):
            raise SpatialBiasError(f"{len(nested)} image entries for {len(prompts)} prompts; give one per prompt")
        for p, ims in zip(prompts, nested):
            if p.count(self.image_marker) != len(ims):
                raise SpatialBiasError(f"prompt {p[:60]!r} has {p.count(self.image_marker)} image token(s) "
                                       f"{self.image_marker!r} for {len(ims)} image(s); build prompts with "
                                       "LVLM.prompt(text) or put one marker where each image goes")
        self.tokenizer.padding_side = "left"
        enc = self.processor(images=nested, text=list(prompts), return_tensors="pt", padding=True)
        return {k: v.to(self.device) for k, v in enc.items()}

    def image_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) bool, True at image-token positions."""
        return input_ids == self.image_token_id

    def image_map(self, inputs: dict[str, torch.Tensor]) -> imagemap.ImageTokenMap:
        """Per position: image index, patch row/col and grid (see :mod:`interp.imagemap`)."""
        mask = self.image_mask(inputs["input_ids"])
        views = self.adapter.image_views(self.model, inputs) if bool(mask.any()) else []
        return imagemap.build(mask, views)

    def default_position_ids(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The ids HF's forward uses when none are given: (B, L), or (3, B, L) for M-RoPE."""
        return self.adapter.default_position_ids(self.model, inputs)

    # ---------------------------------------------------------------- running
    def prepare(self, inputs: dict[str, torch.Tensor],
                interventions: Sequence[Intervention] = ()) -> tuple[dict[str, torch.Tensor], dict[str, Edit]]:
        """Apply the interventions' input rewrites; collect their site edits (composed in order)."""
        inputs = dict(inputs)
        has_pixels = any(k.startswith("pixel_values") for k in inputs)
        if has_pixels and not bool(self.image_mask(inputs["input_ids"]).any(-1).all()):
            raise SpatialBiasError(f"an input row has pixel values but no image token {self.image_token!r}; "
                                   "build prompts with LVLM.prompt(text)")
        edits: dict[str, Edit] = {}
        for iv in interventions:
            inputs = iv.prepare(self, inputs)
            edits = then(edits, iv.edits(self, inputs))
        return inputs, edits

    def run(self, inputs: dict[str, torch.Tensor], interventions: Sequence[Intervention] = (),
            last_only: bool = False) -> torch.Tensor:
        """Forward with interventions; returns logits (B, L, V), or (B, 1, V) with ``last_only``.

        With no intervention this is exactly ``model(**inputs)``.
        """
        inputs, edits = self.prepare(inputs, interventions)
        kw = {"logits_to_keep": 1} if last_only else {}
        with edit_sites(self.model, self.adapter, edits):
            return self.model(**inputs, use_cache=False, **kw).logits

    @torch.no_grad()
    def generate(self, inputs: dict[str, torch.Tensor], interventions: Sequence[Intervention] = (),
                 max_new_tokens: int = 8) -> torch.Tensor:
        """Greedy decoding with a KV cache; returns the new token ids (B, max_new_tokens).

        Position ids are explicit at every step: the prompt's (BaPA's when it is given, else the
        padding-aware ids of HF's ``generate``), then for decode step k the last prompt token's
        id + 1 + k on every row — derived from the prompt, no counter. Under BaPA a row of
        length L with n image tokens in one image decodes from L − n + 1. Site edits (AGCI)
        act on the prefill only. Rows must be left padded (as :meth:`inputs` makes them).
        """
        inputs, edits = self.prepare(inputs, interventions)
        mask = inputs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(inputs["input_ids"])
        if not bool(mask[:, -1].all()):
            raise SpatialBiasError("generate needs left-padded inputs (every row ends with a real token); "
                                   "build them with LVLM.inputs")
        pos = inputs.get("position_ids")
        if pos is None:
            pos = self.adapter.generation_position_ids(self.model, inputs)
        inputs = {**inputs, "attention_mask": mask, "position_ids": pos}
        with edit_sites(self.model, self.adapter, edits):
            out = self.model(**inputs, use_cache=True, logits_to_keep=1)
        cache, tok = out.cache, out.logits[:, -1].argmax(-1)
        new, last = [tok], pos[..., -1]
        for k in range(1, max_new_tokens):
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            step_pos = (last + k).unsqueeze(-1)
            out = self.model(input_ids=tok[:, None], attention_mask=mask, position_ids=step_pos, cache=cache,
                             use_cache=True)
            cache, tok = out.cache, out.logits[:, -1].argmax(-1)
            new.append(tok)
        return torch.stack(new, 1)

    def __repr__(self) -> str:
        return f"LVLM({self.name or type(self.model).__name__}, adapter={self.adapter.name})"
