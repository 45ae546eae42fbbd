"""Row chunks at run time: a run's activation budget (``--max-memory``, default what the device
has free) and, per analysis, the most rows per forward whose peak predicted by the memory model
(:func:`analyses.memory_model.activation_peak`) fits it.

Chunking changes how many rows share a forward, never a number: the chunked tables equal the
unchunked ones exactly (tests/test_memory.py). Role: runner and tasks. May import ``interp``,
``analyses.memory_model``.
"""
from __future__ import annotations

import psutil
import torch

from analyses import memory_model
from spatialbias.errors import SpatialBiasError

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def free_bytes(device: torch.device) -> int:
    """Bytes the device has free now: ``torch.cuda.mem_get_info`` on a GPU, the available RAM
    (``psutil``) on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return int(psutil.virtual_memory().available)


def budget(lvlm, max_memory: dict | None) -> int:
    """Activation bytes a step may use on the model's execution device: ``max_memory``'s entry
    for that device (or its one size for all, ``{"all": …}``) less the weights stored there, else
    what the device has free now (the weights are loaded already). On a dispatched model
    ``max_memory`` was accelerate's bound on *weights* per device (it fills devices up to it), so
    the budget is what the execution device has free after loading."""
    dev = lvlm.device
    if getattr(lvlm, "dispatched", False):
        return free_bytes(dev)
    key = dev.index if dev.type == "cuda" else dev.type
    limit = None
    if max_memory:
        limit = max_memory.get(key, max_memory.get(f"cuda:{key}" if dev.type == "cuda" else key, max_memory.get("all")))
    if limit is None:
        return free_bytes(dev)
    here = str(dev) if dev.type != "cuda" else f"cuda:{dev.index or 0}"
    return int(limit) - lvlm.weight_bytes().get(here, 0)


def vision_tokens_per_row(lvlm, inputs) -> int:
    """Tokens per row through the vision tower, from the inputs (the adapter counts them:
    :meth:`interp.adapters.Adapter.vision_tokens`)."""
    return lvlm.adapter.vision_tokens(lvlm.model, inputs) // int(inputs["input_ids"].shape[0])


def run_shapes(lvlm, inputs) -> memory_model.Shapes:
    """The memory model's shapes of a loaded model on ``inputs`` (their real token counts)."""
    dtype = DTYPE_NAMES.get(next(lvlm.model.parameters()).dtype, "float32")
    px = tuple(inputs["pixel_values"].shape[-2:]) if inputs["pixel_values"].dim() >= 4 else (336, 336)
    s = memory_model.Shapes.from_config(lvlm.model.config.to_dict(), dtype, image_px=px,
                                    weights=sum(lvlm.weight_bytes().values()))
    return s.with_run(int(inputs["input_ids"].shape[1]), vision_tokens_per_row(lvlm, inputs))


def rows(lvlm, budget_bytes: int | None, analysis: str, inputs, limit: int, what: str = "") -> int:
    """Rows per forward for ``analysis`` on rows like ``inputs`` (≤ ``limit``, the batch size):
    the most whose predicted peak fits ``budget_bytes`` (None: ``limit``); one error line naming
    --max-memory when a single step does not fit."""
    if budget_bytes is None:
        return limit
    if budget_bytes <= 0:
        raise SpatialBiasError(f"{what or analysis}: the weights alone fill --max-memory on {lvlm.device}; raise "
                               "--max-memory or offload weights (--device-map auto --offload-folder DIR)")
    return memory_model.choose_rows(run_shapes(lvlm, inputs), analysis, budget_bytes, limit, what)

