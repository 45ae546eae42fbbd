"""The wrapper every analysis runs through: an HF LVLM + its processor + its adapter."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from PIL import Image

from interp.adapters import Adapter
from interp.errors import SpatialBiasError
from interp.hooks import edit_sites
from interp.interventions import Intervention


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
        return self.processor.tokenizer

    @property
    def image_token(self) -> str:
        return self.tokenizer.convert_ids_to_tokens(self.image_token_id)

    def prompt(self, text: str) -> str:
        """One user turn with one image and ``text``, through the processor's chat template
        (with the generation prompt); ``"<image> text"`` style when there is no template."""
        if getattr(self.processor, "chat_template", None):
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
            return self.processor.apply_chat_template(msgs, add_generation_prompt=True)
        return f"{self.image_token}\n{text}"

    def inputs(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Processor inputs for one image per prompt, left padded (the answer is at position −1)."""
        for p in prompts:
            if self.image_token not in p:
                raise SpatialBiasError(f"prompt {p[:60]!r} has no image token {self.image_token!r}; "
                                       "build prompts with LVLM.prompt(text) or put the token where the image goes")
        self.tokenizer.padding_side = "left"
        enc = self.processor(images=list(images), text=list(prompts), return_tensors="pt", padding=True)
        return {k: v.to(self.device) for k, v in enc.items()}

    def image_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) bool, True at image-token positions."""
        return input_ids == self.image_token_id

    def run(self, inputs: dict[str, torch.Tensor], interventions: Sequence[Intervention] = (),
            last_only: bool = False) -> torch.Tensor:
        """Forward with interventions; returns logits (B, L, V), or (B, 1, V) with ``last_only``.

        With no intervention this is exactly ``model(**inputs)``.
        """
        inputs = dict(inputs)
        if "pixel_values" in inputs and not bool(self.image_mask(inputs["input_ids"]).any(-1).all()):
            raise SpatialBiasError(f"an input row has pixel values but no image token {self.image_token!r}; "
                                   "build prompts with LVLM.prompt(text)")
        edits: dict = {}
        for iv in interventions:
            inputs = iv.prepare(self, inputs)
            for site, fn in iv.edits(self).items():
                prev = edits.get(site)
                edits[site] = fn if prev is None else (lambda x, f=fn, g=prev: f(g(x)))
        kw = {"logits_to_keep": 1} if last_only else {}
        with edit_sites(self.model, self.adapter, edits):
            return self.model(**inputs, use_cache=False, **kw).logits

    def __repr__(self) -> str:
        return f"LVLM({self.name or type(self.model).__name__}, adapter={self.adapter.name})"
