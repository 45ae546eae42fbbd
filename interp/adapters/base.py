"""Architecture adapters: canonical site names → HF module paths.

Only this package knows HF module paths. A site name is canonical
(``vision.blocks.3``, ``projector``, ``lm.blocks.7.attn``, ``lm.rotary``); an adapter maps each
to a dotted attribute path on the HF model, with ``{i}`` standing for a layer index.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from interp.errors import SpatialBiasError


@dataclass(frozen=True)
class Adapter:
    """Declarative description of one HF LVLM architecture.

    ``sites`` maps a canonical site (with ``{i}`` for a layer index) to an HF path template;
    ``shapes`` documents each site's output tensor shape. ``n_layers`` maps ``vision`` / ``lm``
    to the config attribute path that holds the layer count.
    """
    name: str
    model_classes: tuple[str, ...]
    sites: dict[str, str]
    shapes: dict[str, str]
    n_layers: dict[str, str] = field(default_factory=dict)

    def path(self, site: str) -> str:
        """HF module path of a concrete site name, e.g. ``lm.blocks.3`` → ``model.language_model.layers.3``."""
        for pattern, template in self.sites.items():
            regex = "^" + re.escape(pattern).replace(r"\{i\}", r"(?P<i>-?\d+)") + "$"
            m = re.match(regex, site)
            if m:
                return template.format(**m.groupdict())
        raise SpatialBiasError(f"unknown site {site!r} for {self.name}; known sites: {', '.join(self.sites)}")

    def module(self, model: torch.nn.Module, site: str) -> torch.nn.Module:
        """The module a site names; negative layer indices count from the end."""
        path = self.path(site)
        parts = path.split(".")
        mod = model
        for p in parts:
            mod = mod[int(p)] if p.lstrip("-").isdigit() else getattr(mod, p)
        return mod

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
