"""Registry of architecture adapters, keyed by HF model class name."""
from __future__ import annotations

import torch

from interp.adapters.base import (INPUT_SITES, LM_INPUT, PLAIN, Adapter, ChatFormat, MemoryFacts, View,
                                  default_memory_profile)
from interp.adapters.gemma3 import GEMMA3
from interp.adapters.gemma3n import GEMMA3N
from interp.adapters.gemma4 import GEMMA4
from interp.adapters.internvl import INTERNVL
from interp.adapters.llava import LLAVA, LLAVA_NEXT
from interp.adapters.llava_onevision import LLAVA_ONEVISION
from interp.adapters.moe import Routing
from interp.adapters.qwen import QWEN2_5_VL, QWEN2_VL
from interp.adapters.qwen3_vl import QWEN3_VL
from interp.adapters.qwen3_5 import QWEN3_5
from interp.adapters.qwen3_vl_moe import QWEN3_VL_MOE
from spatialbias.errors import SpatialBiasError

ADAPTERS: tuple[Adapter, ...] = (LLAVA, LLAVA_NEXT, QWEN2_VL, QWEN2_5_VL, GEMMA3, LLAVA_ONEVISION, QWEN3_VL,
                                 INTERNVL, QWEN3_VL_MOE, GEMMA4, QWEN3_5, GEMMA3N)
_BY_CLASS = {cls: a for a in ADAPTERS for cls in a.model_classes}
_BY_TYPE = {t: a for a in ADAPTERS for t in a.model_types}
_BY_NAME = {a.name: a for a in ADAPTERS}


def supported_classes() -> list[str]:
    return sorted(_BY_CLASS)


def for_class(class_name: str) -> Adapter:
    try:
        return _BY_CLASS[class_name]
    except KeyError:
        raise SpatialBiasError(f"unsupported model class {class_name}; supported: {', '.join(supported_classes())}"
                               " (open an issue to add an adapter)") from None


def for_model(model: torch.nn.Module) -> Adapter:
    return for_class(type(model).__name__)


def for_name(name: str) -> Adapter | None:
    """The adapter called ``name`` (``Adapter.name``), None if none is."""
    return _BY_NAME.get(name)


def for_config(cfg: dict) -> Adapter | None:
    """The adapter of a config.json mapping: by its ``architectures`` (the class HF saved), else by
    the ``model_type`` an adapter claims; None when no adapter claims it."""
    for cls in cfg.get("architectures") or ():
        if cls in _BY_CLASS:
            return _BY_CLASS[cls]
    return _BY_TYPE.get(cfg.get("model_type"))


def memory_profile(cfg: dict, image_px: tuple[int, int] = (336, 336)) -> MemoryFacts:
    """The memory model's facts of a config.json mapping (:meth:`Adapter.memory_profile`; the
    default one-crop layout where no adapter claims the config)."""
    a = for_config(cfg)
    return a.memory_profile(cfg, image_px) if a is not None else default_memory_profile(cfg, image_px)


__all__ = ["ADAPTERS", "INPUT_SITES", "LM_INPUT", "PLAIN", "Adapter", "ChatFormat", "MemoryFacts", "View", "for_class",
           "Routing", "for_config", "for_model", "for_name", "memory_profile", "supported_classes"]
