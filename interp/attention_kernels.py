"""The attention implementations the dispatcher switches between for one run: a kernel that
exposes (and lets a hook replace) the softmaxed attention pattern of every LM layer, the switch
itself, and the guard that keeps bf16 attention off a CPU kernel that cannot run it.

Shapes: B rows, H heads, Lq queries, Lk keys.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from spatialbias.errors import SpatialBiasError

PATTERN_IMPL = "spatialbias"
"""The name the pattern kernel is registered under in transformers' attention interface."""
_PATTERN_HOOKS: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {}
"""id(attention module) → the hook a run installed on its (B, H, Lq, Lk) pattern."""



def _pattern_attention(module, query, key, value, attention_mask, **kwargs):
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise SpatialBiasError(f"{type(module).__name__} has no eager attention function in its module; "
                               "attention-pattern sites are not available for it")
    out, weights = eager(module, query, key, value, attention_mask, **kwargs)
    hook = _PATTERN_HOOKS.get(id(module))
    if hook is not None:
        new = hook(weights)
        if new is not weights:
            v = value.repeat_interleave(query.shape[1] // value.shape[1], 1)  # grouped-query heads
            out = torch.matmul(new.to(v.dtype), v).transpose(1, 2).contiguous()
            weights = new
    return out, weights


def _register_pattern_kernel() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    AttentionInterface.register(PATTERN_IMPL, _pattern_attention)
    AttentionMaskInterface.register(PATTERN_IMPL, eager_mask)


_register_pattern_kernel()


@contextmanager
def attention_implementation(model: torch.nn.Module, impl: str | None) -> Iterator[None]:
    """Switch the LM's attention implementation for one block of code (None: leave it)."""
    if impl is None:
        yield
        return
    tc = model.config.text_config
    before = tc._attn_implementation
    tc._attn_implementation_internal = impl
    try:
        yield
    finally:
        tc._attn_implementation_internal = before


@contextmanager
def cpu_attention_guard(lvlm) -> Iterator[None]:
    """torch 2.13's CPU flash-attention kernel packs bfloat16 with AVX-512 instructions and fails
    ("pack_vnni2 is only supported when avx512 is supported") on a CPU without them (ATen
    capability AVX2 or DEFAULT: most AMD EPYC before Zen 4, desktop CPUs) once a sequence has 64
    tokens. There, a bf16 model's attention runs on SDPA's math kernel instead (same formula;
    every other case is left alone)."""
    dtype = getattr(lvlm.model, "dtype", None)
    if lvlm.device.type != "cpu" or dtype != torch.bfloat16 or torch.backends.cpu.get_cpu_capability() == "AVX512":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel([SDPBackend.MATH]):
        yield


