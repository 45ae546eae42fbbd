"""Boot transformer-lens' TransformerBridge around an in-memory HF model (e.g. ``interp.tiny``),
offline and without letting transformer-lens install anything.

>>> from interp import bridge, tiny
>>> model, proc = tiny.build_llava()
>>> tb = bridge.boot(model, proc)
>>> logits, cache = tb.run_with_cache(inputs["input_ids"], pixel_values=inputs["pixel_values"])
"""
from __future__ import annotations

import tempfile
from typing import Any
from unittest import mock

import torch

WAIVED = ("torchvision", "timm")
"""Libraries transformer-lens' adapters list that a bridge around a model already built in memory
does not use: torchvision (Qwen's processors; the processor is given) and timm (Gemma3n's tower,
which builds it; the model is given, with whatever tower it has)."""


def boot(model: torch.nn.Module, processor: Any):
    """A ``TransformerBridge`` wrapping ``model`` itself (not a copy) with ``processor`` attached.

    The bridge switches ``model`` to eager attention in place. ``boot_transformers`` re-reads the
    tokenizer from its ``name_or_path``, so the tokenizer goes through a temporary folder. Two
    transformer-lens load-time steps are replaced, since the processor is given: loading the
    processor from ``model_name`` (which ``pip install``s torchvision when that fails; here that
    raises instead) and the adapters' requirements in :data:`WAIVED` (Qwen2.5-VL, Qwen3-VL and
    Qwen3.5 list torchvision for their processors, Gemma3n timm for building its tower; the
    bridge's forward imports neither). Other missing libraries still raise.
    """
    from transformers import AutoTokenizer
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.model_bridge.architecture_adapter import ArchitectureAdapter
    from transformer_lens.model_bridge.sources.transformers import helpers, source

    check = ArchitectureAdapter._check_required_libraries

    def check_all_but_torchvision(adapter):
        adapter.required_libraries = [lib for lib in type(adapter).required_libraries if lib not in WAIVED]
        check(adapter)

    def attach_processor(bridge, *_args, **_kw):
        bridge.processor = processor

    def refuse_install():
        raise RuntimeError("transformer-lens tried to pip install torchvision; refused (see constraints.txt)")

    with tempfile.TemporaryDirectory() as tok_dir, \
            mock.patch.object(ArchitectureAdapter, "_check_required_libraries", check_all_but_torchvision), \
            mock.patch.object(source, "load_modality_processor", attach_processor), \
            mock.patch.object(helpers, "_ensure_torchvision", refuse_install):
        processor.tokenizer.save_pretrained(tok_dir)
        tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        return TransformerBridge.boot_transformers(tok_dir, hf_model=model, tokenizer=tokenizer,
                                                   device=next(model.parameters()).device)
