"""Architecture adapters: canonical site names → HF module paths, each site's token order, and
each architecture's image-token layout, input conventions and position-id scheme.

Only this package knows HF module paths and HF input conventions. A canonical site
(``vision.blocks.3``, ``projector``, ``lm.blocks.7.attn``, ``lm.rotary``) maps to a dotted
attribute path on the HF model, with ``{i}`` standing for a layer index; :mod:`interp.sites`
parses the full site grammar (``#key``, ``@call``, ``module:PATH``) on top of :meth:`Adapter.path`.
``lm.input`` and ``vision.out`` name the *input* of another site's module (:data:`INPUT_SITES`).

Token-order contract: every site whose tensor holds image tokens declares, through
:meth:`Adapter.vision_fields` (vision-side sites) or the LM image map (LM sites), which patch of
which image each of its tokens is, in the order the site holds them; analyses map cells through
that and never branch on an architecture's name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from interp.adapters.layers import LayerKinds
from interp.adapters.lm_structure import LMStructure
from interp.adapters.memory_facts import (TEXT_KEY_SPELLINGS, MemoryFacts, crop_pixel_bytes,  # noqa: F401
                                         default_memory_profile, projector_params, text_keys)
from interp.adapters.moe import Dense
from spatialbias.errors import SpatialBiasError

LM_INPUT = "lm.input"
INPUT_SITES = {LM_INPUT: "lm.blocks.0", "vision.out": "projector"}
"""Sites that name the *input* of another site's module: ``lm.input`` is what the first LM
block reads (embeddings with the image features scattered in); ``vision.out`` is what the
projector reads (the selected vision features)."""

VISION_SITES = ("vision.embed", "vision.blocks.{i}", "vision.out", "projector")
"""Canonical sites whose tokens are vision-side (laid out by :meth:`Adapter.vision_fields`)."""


@dataclass(frozen=True)
class View:
    """One block of an image's tokens in sequence order: a ``rows``×``cols`` patch grid in
    raster order, optionally followed by one non-patch token per row (LLaVA-NeXT's newline)
    or by ``trailing`` non-patch tokens.

    ``tile=(th, tw)``: the grid is held tile by tile instead — (rows/th)×(cols/tw) tiles of
    th×tw patches, tiles in row-major order, each tile's patches in raster order (InternVL's
    dynamic tiling, whose tiles reach the LM one after another); the token count is unchanged."""
    name: str
    rows: int
    cols: int
    newline_per_row: bool = False
    trailing: int = 0
    tile: tuple[int, int] | None = None

    def __post_init__(self):
        if self.tile is not None:
            th, tw = self.tile
            if th < 1 or tw < 1 or self.rows % th or self.cols % tw or self.newline_per_row:
                raise SpatialBiasError(f"view {self.name!r}: a {self.rows}x{self.cols} grid cannot be held in "
                                       f"{th}x{tw} tiles (tiles must divide it; no newline tokens)")

    @property
    def n_tokens(self) -> int:
        return self.rows * (self.cols + int(self.newline_per_row)) + self.trailing


def raster_fields(rows: int, cols: int, view: int = 0, cls: bool = False) -> torch.Tensor:
    """(n, 5) view, row, col, rows, cols of a raster grid, with a leading CLS token (row −1) when ``cls``."""
    r = torch.arange(rows).repeat_interleave(cols)
    c = torch.arange(cols).repeat(rows)
    f = torch.stack([torch.full_like(r, view), r, c, torch.full_like(r, rows), torch.full_like(r, cols)], 1)
    if cls:
        f = torch.cat([torch.tensor([[view, -1, -1, rows, cols]]), f], 0)
    return f


@dataclass(frozen=True)
class ChatFormat:
    """An architecture's published single-turn chat format. ``image``: what one image becomes
    (``{marker}`` is the processor's image marker); ``prompt``: the user turn up to the
    assistant's first token, with ``{images}`` (the images, in order) and ``{text}``;
    ``answer_sep``: what the format puts between the prompt and the assistant's answer."""
    image: str
    prompt: str
    answer_sep: str

    def render(self, marker: str, text: str, n_images: int = 1) -> str:
        return self.prompt.format(images=self.image.format(marker=marker) * n_images, text=text)


PLAIN = ChatFormat("{marker}\n", "{images}{text}", " ")
"""For an architecture without a published format: the images then the text; an answer is
taken to follow after a space, as the next word of plain text does."""


@dataclass(frozen=True)
class Adapter(Dense, LayerKinds, LMStructure):
    """Declarative description of one HF LVLM architecture.

    ``sites`` maps a canonical site (with ``{i}`` for a layer index) to an HF path template;
    ``lm_variants`` replaces the LM part of that table for text models of another family (keyed
    by ``text_config.model_type``, e.g. GPT-2's ``h.{i}``); ``shapes`` documents each site's
    tensor shape; ``n_layers`` maps ``vision`` / ``lm`` to the config attribute holding the layer
    count; ``rope`` is ``"1d"``, ``"mrope"`` (Qwen's 3-row ids) or ``"none"`` (learned absolute
    positions); ``prompt_marker`` names the processor attribute holding the string a prompt must
    contain where the image goes; ``image_inputs`` says how each image input is laid out:
    ``"image"`` (first dim = images in processor order) or ``"patches"`` (Qwen: patches of all
    images concatenated, split by ``image_grid_thw``); ``model_types`` the config ``model_type``
    values this adapter claims (a config.json without ``architectures``); ``chat`` the
    architecture's published chat format, used when a checkpoint's processor has none.

    Also declared here, so that no module outside ``interp/adapters`` branches on an
    architecture: modules called more than once per forward (:meth:`calls`), the memory model's
    facts (:meth:`memory_profile`), tokens through the vision tower (:meth:`vision_tokens`), a
    mixture-of-experts LM's routers (:meth:`routing`, :meth:`complete_output`, from :class:`Dense`).
    """
    name: str
    model_classes: tuple[str, ...]
    sites: dict[str, str]
    shapes: dict[str, str]
    n_layers: dict[str, str] = field(default_factory=dict)
    rope: str = "1d"
    prompt_marker: str = "image_token"
    image_inputs: dict[str, str] = field(default_factory=lambda: {"pixel_values": "image"})
    lm_variants: dict[str, dict[str, str]] = field(default_factory=dict)
    model_types: tuple[str, ...] = ()
    chat: ChatFormat = PLAIN

    # ---------------------------------------------------------------- sites
    def site_table(self, model: torch.nn.Module | None = None) -> dict[str, str]:
        """Canonical pattern → HF path template, for this model's text-model family."""
        if model is None:
            return self.sites
        kind = getattr(getattr(model.config, "text_config", None), "model_type", None)
        variant = self.lm_variants.get(kind)
        if variant is None:
            return self.sites
        return {**{k: v for k, v in self.sites.items() if not k.startswith("lm.") and k != "unembed"}, **variant}

    def path(self, site: str, model: torch.nn.Module | None = None) -> str:
        """HF module path of a concrete canonical site, e.g. ``lm.blocks.3`` → ``model.language_model.layers.3``."""
        if site == LM_INPUT and self.lm_input_at() is not None:
            return self.lm_input_at()[0]
        if site in INPUT_SITES:
            return self.path(INPUT_SITES[site], model)
        for pattern, template in self.site_table(model).items():
            regex = "^" + re.escape(pattern).replace(r"\{i\}", r"(?P<i>-?\d+)") + "$"
            m = re.match(regex, site)
            if m:
                return self._check_layer(model, pattern, m.groupdict().get("i"), site) or template.format(**m.groupdict())
        names = ", ".join([*INPUT_SITES, *self.site_table(model)])
        raise SpatialBiasError(f"unknown site {site!r} for {self.name}; known sites: {names}")

    def site_names(self, model: torch.nn.Module | None = None) -> list[str]:
        return [*INPUT_SITES, *self.site_table(model)]

    def module(self, model: torch.nn.Module, site: str) -> torch.nn.Module:
        """The module a canonical site names; negative layer indices count from the end."""
        return get_module(model, self.path(site, model))

    def concrete_sites(self, model: torch.nn.Module) -> list[str]:
        """Every canonical site with its layer indices filled in, e.g. ``lm.blocks.0`` … ``lm.blocks.N-1``."""
        out = list(INPUT_SITES)
        for pattern in self.site_table(model):
            if "{i}" in pattern:
                out += [pattern.format(i=i) for i in self.layers_of(model, pattern)]
            else:
                out.append(pattern)
        return out

    def pattern_count(self, model: torch.nn.Module, pattern: str) -> int:
        """How many modules an indexed site pattern names: the vision or LM layer count (an
        adapter with other indexed sites, e.g. Qwen3-VL's ``vision.deepstack.{i}``, says so)."""
        return self.layer_count(model, "vision" if pattern.startswith("vision") else "lm")

    def injections(self, model: torch.nn.Module) -> dict[int, str]:
        """What the text model adds to the residual stream *between* LM blocks, outside every block
        module: LM block index j → the site whose output (the batch's image tokens, flattened in
        sequence order, width D) is added at the image positions after block j (Qwen3-VL's
        DeepStack). ``lm.blocks.{j}`` is block j's output before the addition; resuming the LM
        (:func:`interp.resume.resume`) re-applies it. None on most architectures."""
        return {}

    def default_call(self, site: str) -> str | None:
        """The call a site names when it names none, for a module the forward calls for other
        things too (Gemma3n's soft-token embedder also embeds the vision vocabulary's hard tokens):
        None on most architectures (an edit acts on every call)."""
        return None

    def load_requirements(self) -> str | None:
        """Why a checkpoint of this architecture cannot be loaded in this install, naming the fix
        (None: it can); checked by :func:`interp.load` before the weights are read."""
        return None

    def check(self, model: torch.nn.Module) -> None:
        """Refuse (one line) a configuration the adapter cannot run faithfully; called by ``LVLM()``."""

    def block_kwargs(self, model: torch.nn.Module) -> dict[str, Any]:
        """Keyword arguments an LM block called on its own (:func:`interp.resume.resume`) needs beside
        the recorded mask, rotary and ids, made fresh per resumed run; none on most architectures."""
        return {}

    def layer_count(self, model: torch.nn.Module, stack: str) -> int:
        obj = model.config
        for p in self.n_layers[stack].split("."):
            obj = getattr(obj, p)
        return int(obj)

    def head_count(self, model: torch.nn.Module) -> int:
        """Attention heads of an LM layer (the split of ``lm.blocks.{i}.attn.heads``)."""
        tc = model.config.text_config
        return int(getattr(tc, "num_attention_heads", None) or tc.n_head)

    def out_proj(self, model: torch.nn.Module) -> str:
        """Name of the attention module's output projection, whose input is the per-head output."""
        kind = getattr(getattr(model.config, "text_config", None), "model_type", None)
        return "c_proj" if kind == "gpt2" else "o_proj"

    def calls(self, model: torch.nn.Module, site: str) -> list[str]:
        """The names that address each call of a site's module in one forward: ``[site]`` for a
        module called once; the adapter's named calls otherwise (Gemma3's rotary)."""
        return [site]

    def call_label(self, site: str, args: tuple, kwargs: dict) -> str | None:
        """A name for one call of a site's module among several per forward (``lm.rotary@…``);
        None where the architecture names none (calls are then addressed by index)."""
        return None

    def image_token_id(self, model: torch.nn.Module) -> int:
        cfg = model.config
        for attr in ("image_token_id", "image_token_index"):
            if getattr(cfg, attr, None) is not None:
                return int(getattr(cfg, attr))
        raise SpatialBiasError(f"{self.name}: the model config names no image token id")

    def load_processor(self, src: Any, trust_remote_code: bool = False):
        """The checkpoint's processor (``AutoProcessor``, offline)."""
        from transformers import AutoProcessor
        return AutoProcessor.from_pretrained(src, local_files_only=True, trust_remote_code=trust_remote_code)

    # ---------------------------------------------------------------- images
    def probe_canvas(self, config: Any, image_processor: Any) -> int:
        """Side in pixels of the square canvas a built probe is drawn at so that this model's
        processor takes it as drawn: the vision tower's native ``image_size`` (a processor that
        does not resize, like the organism's, needs exactly that). Architectures with dynamic
        resolution override it."""
        return int(config.vision_config.image_size)

    def image_views(self, model: torch.nn.Module, inputs: dict[str, Any]) -> list[list[View]]:
        """For every image of the batch, in processor order: its token views in LM sequence order."""
        raise NotImplementedError

    def vision_fields(self, model: torch.nn.Module, inputs: dict[str, Any], site: str
                      ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The token-order contract of a vision-side site (``vision.embed``, ``vision.blocks.{i}``,
        ``vision.out``, ``projector``): per image (processor order) the (n_i, 5) fields view, row,
        col, rows, cols of its tokens in processor order, and an optional (T,) permutation giving
        the order the site holds them in (None: concatenated processor order). Flattening the
        site's tensor to (T, D) lines it up with these fields."""
        raise NotImplementedError

    def vision_position_table(self, model: torch.nn.Module) -> torch.Tensor | None:
        """(P, Dv) the learned absolute position embeddings the vision tower adds to the tokens of
        each image (or crop) at ``vision.embed``, row j to its j-th token; None for a tower whose
        positions are rotary (then the vision-side position patch is refused)."""
        pe = getattr(self.module(model, "vision.embed"), "position_embedding", None)
        return pe.weight.detach() if isinstance(pe, torch.nn.Embedding) else None

    def image_counts(self, inputs: dict[str, Any]) -> int:
        """The number of images in the batch, from the image inputs."""
        key = next((k for k, how in self.image_inputs.items() if how == "image" and k in inputs), None)
        return 0 if key is None else int(inputs[key].shape[0])

    def select_images(self, inputs: dict[str, Any], images: list[int]) -> dict[str, Any]:
        """The image inputs (only those) of the given images, in the given order."""
        out = {}
        for k, how in self.image_inputs.items():
            if k not in inputs:
                continue
            v = inputs[k]
            idx = torch.as_tensor(images, dtype=torch.long, device=v.device)
            out[k] = v[idx] if how == "image" else self._patches(inputs, v, images)
        return out

    def _patches(self, inputs, v, images):
        raise NotImplementedError

    # ---------------------------------------------------------------- memory
    def memory_profile(self, cfg: dict, image_px: tuple[int, int] = (336, 336)) -> MemoryFacts:
        """The memory model's facts of this architecture for a config.json mapping and one image
        of ``image_px`` (h, w) pixels (see :class:`MemoryFacts`)."""
        return default_memory_profile(cfg, image_px)

    def vision_tokens(self, model: torch.nn.Module, inputs: dict[str, Any]) -> int:
        """Tokens through the vision tower for the whole batch, from the inputs: (side / patch)²
        per image and crop, plus one CLS token per crop for a CLIP tower."""
        px = inputs["pixel_values"]
        vc = model.config.vision_config
        side = int(px.shape[-1]) // int(vc.patch_size)
        cls = 1 if getattr(vc, "model_type", "") == "clip_vision_model" else 0
        return (side * side + cls) * int(px.shape[0]) * (int(px.shape[1]) if px.dim() == 5 else 1)

    # ---------------------------------------------------------------- positions
    def rotary(self, model: torch.nn.Module, like: torch.Tensor, position_ids: torch.Tensor, layer: int):
        """(cos, sin) that LM block ``layer`` receives for ``position_ids`` (computed by the
        model's own rotary module; ``like`` gives dtype and device)."""
        if self.rope == "none":
            raise SpatialBiasError(f"{self.name} with a {model.config.text_config.model_type} LM has no rotary "
                                   "embedding; per-layer position edits need RoPE (use all layers: layers=None)")
        return self.module(model, "lm.rotary")(like, position_ids)

    def rope_kind(self, model: torch.nn.Module) -> str:
        """``"1d"``, ``"mrope"`` or ``"none"`` for this model (a GPT-2 LM has learned positions)."""
        kind = getattr(getattr(model.config, "text_config", None), "model_type", None)
        return "none" if kind in self.lm_variants and "lm.rotary" not in self.lm_variants[kind] else self.rope

    def default_position_ids(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """The ids HF's forward uses when none are passed: (B, L), or (3, B, L) for M-RoPE."""
        ids = inputs["input_ids"]
        return torch.arange(ids.shape[1], device=ids.device).expand_as(ids)

    def generation_position_ids(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        """Prompt ids as HF's ``generate`` builds them (padding-aware): (B, L) or (3, B, L)."""
        mask = inputs.get("attention_mask")
        if mask is None:
            return self.default_position_ids(model, inputs)
        return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)

    def extend_inputs_for_decode(self, inputs: dict[str, Any], n_new: int) -> dict[str, Any]:
        """Extra per-token inputs for ``n_new`` appended text tokens (no cache): zeros for token-type ids."""
        out = {}
        for k in ("token_type_ids", "mm_token_type_ids"):
            if k in inputs:
                v = inputs[k]
                out[k] = torch.cat([v, v.new_zeros(v.shape[0], n_new)], 1)
        return out

    def prefill_only_keys(self) -> tuple[str, ...]:
        """Inputs that only the prefill forward takes (dropped on cached decode steps)."""
        return ("pixel_values", "image_sizes", "image_grid_thw", "token_type_ids", "mm_token_type_ids")


def get_module(model: torch.nn.Module, path: str) -> torch.nn.Module:
    """The submodule at a dotted HF path (integers index module lists, negatives from the end)."""
    mod = model
    for p in path.split("."):
        try:
            mod = mod[int(p)] if p.lstrip("-").isdigit() else getattr(mod, p)
        except (AttributeError, IndexError, TypeError):
            raise SpatialBiasError(f"{type(model).__name__} has no module {path!r} (no {p!r} in "
                                   f"{type(mod).__name__}); see model.named_modules() for the paths") from None
    if not isinstance(mod, torch.nn.Module):
        raise SpatialBiasError(f"{path!r} is a {type(mod).__name__}, not a module; name a module path")
    return mod
