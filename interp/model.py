"""The wrapper every analysis runs through: an HF LVLM + its processor + its adapter."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from PIL import Image

from interp import imagemap, prompts
from interp.adapters import Adapter
from interp.batch import Batch, select_rows, validate
from interp.dispatch import Edit, forward, then
from spatialbias.errors import SpatialBiasError
from interp.interventions import Intervention
from interp.sites import resolve


def execution_device(module: torch.nn.Module) -> torch.device:
    """The device ``module`` computes on: accelerate's execution device when it is dispatched,
    else the device of its first parameter or buffer that is not on meta, else the CPU."""
    hook = getattr(module, "_hf_hook", None)
    for h in [*getattr(hook, "hooks", ()), hook]:
        dev = getattr(h, "execution_device", None)
        if dev is not None:
            return torch.device(dev) if not isinstance(dev, int) else torch.device("cuda", dev)
    for t in [*module.parameters(), *module.buffers()]:
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


class LVLM:
    """An HF vision-language model ready for probing and interventions.

    Attributes: ``model`` (the HF model, eval mode), ``processor`` (its HF processor),
    ``adapter`` (canonical site names → HF paths), ``name`` (what the user asked for),
    ``source`` (the resolved folder or hub id, None for an in-memory model).
    """

    def __init__(self, model: torch.nn.Module, processor: Any, adapter: Adapter, name: str = "",
                 source: str | None = None):
        adapter.check(model)
        self.model, self.processor, self.adapter, self.name = model.eval(), processor, adapter, name
        self.source = source  # the folder or hub id the weights came from; None for in-memory models
        self.image_token_id = adapter.image_token_id(model)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the execution device of the input embeddings. On a model dispatched
        by accelerate (``device_map``) parameters may sit on other devices, the CPU or disk (meta);
        accelerate moves every module's inputs to its own device."""
        return execution_device(self.model.get_input_embeddings())

    @property
    def dispatched(self) -> bool:
        """True when accelerate placed the model across devices or disk (``device_map``)."""
        return getattr(self.model, "hf_device_map", None) is not None

    def weight_bytes(self) -> dict[str, int]:
        """Bytes of parameters and buffers per place they are stored: ``"cuda:0"``, ``"cpu"``,
        ``"disk"`` (meta tensors of a disk-offloaded model). Shared (tied) tensors count once."""
        out: dict[str, int] = {}
        seen = set()
        for t in [*self.model.parameters(), *self.model.buffers()]:
            if id(t) in seen:
                continue
            seen.add(id(t))
            where = "disk" if t.device.type == "meta" else str(t.device)
            out[where] = out.get(where, 0) + t.numel() * t.element_size()
        return out

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
        return prompts.prompt(self.processor, self.adapter, self.image_marker, text, n_images)

    def inputs(self, images: Sequence[Image.Image] | Sequence[Sequence[Image.Image]],
               prompts: Sequence[str]) -> Batch:
        """Processor inputs, left padded (the answer is at position −1), validated (:class:`Batch`).

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
        return validate(self, {k: v.to(self.device) for k, v in enc.items()})

    def image_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) bool, True at image-token positions."""
        return input_ids == self.image_token_id

    def batch(self, inputs: dict[str, torch.Tensor]) -> Batch:
        """``inputs`` validated for this model (:mod:`interp.batch`): left padded, image map built once."""
        return validate(self, inputs)

    def rows(self, inputs: dict[str, torch.Tensor], rows: Sequence[int]) -> Batch:
        """The given rows of ``inputs`` (repeats allowed), each with its own images."""
        return select_rows(self, validate(self, inputs), rows)

    def image_map(self, inputs: dict[str, torch.Tensor]) -> imagemap.ImageTokenMap:
        """Per LM position (B, L): image index, patch row/col and grid (see :mod:`interp.imagemap`)."""
        return validate(self, inputs).imap

    def image_map_of(self, tensors: dict[str, torch.Tensor]) -> imagemap.ImageTokenMap:
        """The LM image map of raw tensors (what :func:`interp.batch.validate` builds once)."""
        mask = self.image_mask(tensors["input_ids"])
        views = self.adapter.image_views(self.model, tensors) if bool(mask.any()) else []
        return imagemap.build(mask, views)

    def token_map(self, inputs: dict[str, torch.Tensor], site: str) -> imagemap.ImageTokenMap:
        """The token-order contract of ``site``: for every token of the site's tensor flattened to
        (T, …) — (B·L) for LM sites, the adapter's layout for vision sites and the projector —
        its batch row, image, view, patch row/col and grid; (T,) tensors."""
        batch = validate(self, inputs)
        s = resolve(self.adapter, self.model, site)
        if s.tokens == "lm":
            return batch.imap.flat()
        if s.tokens != "vision":
            raise SpatialBiasError(f"site {site!r} has no token axis to map (only LM and vision sites do)")
        per_image, order = self.adapter.vision_fields(self.model, batch, s.canonical.split("#")[0])
        rows = batch.image_row.tolist()
        in_row = [rows[:i].count(r) for i, r in enumerate(rows)]
        return imagemap.from_fields(per_image, rows, in_row, order).to(batch["input_ids"].device)

    def default_position_ids(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The ids HF's forward uses when none are given: (B, L), or (3, B, L) for M-RoPE."""
        return self.adapter.default_position_ids(self.model, inputs)

    # ---------------------------------------------------------------- running
    def prepare(self, inputs: dict[str, torch.Tensor],
                interventions: Sequence[Intervention] = ()) -> tuple[Batch, dict[str, Edit]]:
        """Validate the inputs, apply the interventions' input rewrites and collect their site
        edits (composed in order). Returns (the prepared :class:`Batch`, {site: edit})."""
        batch = validate(self, inputs)
        edits: dict[str, Edit] = {}
        for iv in interventions:
            batch = iv.prepare(self, batch)
            edits = then(edits, iv.edits(self, batch))
        return batch, edits

    def run(self, inputs: dict[str, torch.Tensor], interventions: Sequence[Intervention] = (),
            last_only: bool = False) -> torch.Tensor:
        """Forward with interventions; returns logits (B, L, V), or (B, 1, V) with ``last_only``.

        With no intervention this is exactly ``model(**inputs).logits`` (for left-padded inputs;
        right-padded ones are converted first). Gradients flow when enabled by the caller.
        """
        return forward(self, inputs, interventions, last_only=last_only, grad=torch.is_grad_enabled()).logits

    @torch.no_grad()
    def generate(self, inputs: dict[str, torch.Tensor], interventions: Sequence[Intervention] = (),
                 max_new_tokens: int = 8) -> torch.Tensor:
        """Greedy decoding with a KV cache; returns the new token ids (B, max_new_tokens).

        Position ids are explicit at every step: the prompt's (BaPA's when it is given, else the
        padding-aware ids of HF's ``generate``), then for decode step k the last prompt token's
        id + k on every row — derived from the prompt, no counter. Under BaPA a row of length L
        with n image tokens in one image decodes from L − n + 1. Every intervention acts on every
        decode step as it declares (:meth:`Intervention.decode_edits`: AGCI has nothing to do
        there, Knockout blocks each new token too) or refuses. For step logits and caches use
        :func:`interp.tracing.trace` with ``max_new_tokens``.
        """
        if max_new_tokens < 1:
            raise SpatialBiasError(f"max_new_tokens={max_new_tokens}: generate at least one token")
        return forward(self, inputs, interventions, max_new_tokens=max_new_tokens).tokens

    def __repr__(self) -> str:
        return f"LVLM({self.name or type(self.model).__name__}, adapter={self.adapter.name})"
