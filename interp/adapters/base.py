"""Architecture adapters: canonical site names → HF module paths, and each architecture's
image-token layout and position-id scheme.

Only this package knows HF module paths and HF input conventions. A site name is canonical
(``vision.blocks.3``, ``projector``, ``lm.blocks.7.attn``, ``lm.rotary``); an adapter maps each
to a dotted attribute path on the HF model, with ``{i}`` standing for a layer index.
``lm.input`` is special: the input of the first LM block, i.e. the token embeddings after the
image features were scattered into them (what AGCI edits).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from interp.errors import SpatialBiasError

LM_INPUT = "lm.input"
INPUT_SITES = {LM_INPUT: "lm.blocks.0", "vision.out": "projector"}
"""Sites that name the *input* of another site's module (edited with a forward pre-hook):
``lm.input`` is what the first LM block reads (embeddings with the image features scattered
in); ``vision.out`` is what the projector reads (the selected vision features)."""


@dataclass(frozen=True)
class View:
    """One block of an image's tokens in sequence order: a ``rows``×``cols`` patch grid in
    raster order, optionally followed by one non-patch token per row (LLaVA-NeXT's newline)
    or by ``trailing`` non-patch tokens."""
    name: str
    rows: int
    cols: int
    newline_per_row: bool = False
    trailing: int = 0

    @property
    def n_tokens(self) -> int:
        return self.rows * (self.cols + int(self.newline_per_row)) + self.trailing


@dataclass(frozen=True)
class Adapter:
    """Declarative description of one HF LVLM architecture.

    ``sites`` maps a canonical site (with ``{i}`` for a layer index) to an HF path template;
    ``shapes`` documents each site's output tensor shape; ``n_layers`` maps ``vision`` / ``lm``
    to the config attribute that holds the layer count; ``rope`` is ``"1d"`` or ``"mrope"``
    (Qwen's 3-row ids); ``prompt_marker`` names the processor attribute holding the string a
    prompt must contain where the image goes.
    """
    name: str
    model_classes: tuple[str, ...]
    sites: dict[str, str]
    shapes: dict[str, str]
    n_layers: dict[str, str] = field(default_factory=dict)
    rope: str = "1d"
    prompt_marker: str = "image_token"

    # ---------------------------------------------------------------- sites
    def path(self, site: str) -> str:
        """HF module path of a concrete site name, e.g. ``lm.blocks.3`` → ``model.language_model.layers.3``."""
        if site in INPUT_SITES:
            return self.path(INPUT_SITES[site])
        for pattern, template in self.sites.items():
            regex = "^" + re.escape(pattern).replace(r"\{i\}", r"(?P<i>-?\d+)") + "$"
            m = re.match(regex, site)
            if m:
                return template.format(**m.groupdict())
        raise SpatialBiasError(f"unknown site {site!r} for {self.name}; known sites: {', '.join(self.site_names())}")

    def site_names(self) -> list[str]:
        return [*INPUT_SITES, *self.sites]

    def module(self, model: torch.nn.Module, site: str) -> torch.nn.Module:
        """The module a site names; negative layer indices count from the end."""
        mod = model
        for p in self.path(site).split("."):
            mod = mod[int(p)] if p.lstrip("-").isdigit() else getattr(mod, p)
        return mod

    def concrete_sites(self, model: torch.nn.Module) -> list[str]:
        """Every site with its layer indices filled in, e.g. ``lm.blocks.0`` … ``lm.blocks.N-1``."""
        out = list(INPUT_SITES)
        for pattern in self.sites:
            if "{i}" in pattern:
                stack = "vision" if pattern.startswith("vision") else "lm"
                out += [pattern.format(i=i) for i in range(self.layer_count(model, stack))]
            else:
                out.append(pattern)
        return out

    def layer_count(self, model: torch.nn.Module, stack: str) -> int:
        obj = model.config
        for p in self.n_layers[stack].split("."):
            obj = getattr(obj, p)
        return int(obj)

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
    def image_views(self, model: torch.nn.Module, inputs: dict[str, Any]) -> list[list[View]]:
        """For every image of the batch, in processor order: its token views in sequence order."""
        raise NotImplementedError

    # ---------------------------------------------------------------- positions
    def rotary(self, model: torch.nn.Module, like: torch.Tensor, position_ids: torch.Tensor, layer: int):
        """(cos, sin) that LM block ``layer`` receives for ``position_ids`` (computed by the
        model's own rotary module; ``like`` gives dtype and device)."""
        return self.module(model, "lm.rotary")(like, position_ids)

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

    def select_rows(self, inputs: dict[str, Any], rows: list[int]) -> dict[str, Any]:
        """The inputs of the given rows (repeats allowed), one image per row: every tensor whose
        first dimension is the batch (pixel values, image sizes, … included) is indexed."""
        B = inputs["input_ids"].shape[0]
        idx = torch.as_tensor(rows, device=inputs["input_ids"].device)
        return {k: (v[idx] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == B else v)
                for k, v in inputs.items()}

    def prefill_only_keys(self) -> tuple[str, ...]:
        """Inputs that only the prefill forward takes (dropped on cached decode steps)."""
        return ("pixel_values", "image_sizes", "image_grid_thw", "token_type_ids", "mm_token_type_ids")
