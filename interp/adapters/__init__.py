"""Registry of architecture adapters, keyed by HF model class name."""
from __future__ import annotations

import torch

from interp.adapters.base import INPUT_SITES, LM_INPUT, Adapter, View
from interp.adapters.gemma3 import GEMMA3
from interp.adapters.llava import LLAVA, LLAVA_NEXT
from interp.adapters.qwen import QWEN2_5_VL, QWEN2_VL
from spatialbias.errors import SpatialBiasError

ADAPTERS: tuple[Adapter, ...] = (LLAVA, LLAVA_NEXT, QWEN2_VL, QWEN2_5_VL, GEMMA3)
_BY_CLASS = {cls: a for a in ADAPTERS for cls in a.model_classes}


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


__all__ = ["ADAPTERS", "INPUT_SITES", "LM_INPUT", "Adapter", "View", "for_class", "for_model", "supported_classes"]
