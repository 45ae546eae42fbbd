"""LoRA fine-tuning of an organism with peft, and turning base + adapter back into a plain HF
checkpoint that ``interp.load(folder)`` reads.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from analyses.organisms.arch import Arch
from analyses.organisms.recipes import Lora


def wrap(model: torch.nn.Module, arch: Arch, spec: Lora, seed: int):
    """A peft model with LoRA (rank ``spec.r``, alpha ``spec.alpha``, no dropout) on the LM's
    attention and MLP projections; only the LoRA weights train. The LoRA A matrices are
    initialised after ``torch.manual_seed(seed)`` (B starts at zero, so the output is unchanged)."""
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    cfg = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=0.0, target_modules=arch.lora_targets(),
                     bias="none", init_lora_weights=True)
    return get_peft_model(model, cfg)


def load_merged(base: str | Path, adapter: str | Path) -> torch.nn.Module:
    """Base checkpoint folder + peft adapter folder → a plain HF model (LoRA merged into the
    weights, ``merge_and_unload``), in eval mode. ``model.save_pretrained(dir)`` plus the base's
    processor then make an ordinary checkpoint."""
    import transformers
    from peft import PeftModel
    base = Path(base)
    arch = json.loads((base / "config.json").read_text())["architectures"][0]
    model = getattr(transformers, arch).from_pretrained(base, local_files_only=True)
    return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().eval()


def save_merged(base: str | Path, adapter: str | Path, out: str | Path) -> Path:
    """Write base + adapter as one ordinary checkpoint folder (weights, config, the base's
    processor) to ``out``."""
    from interp.adapters import for_class
    base, out = Path(base), Path(out)
    model = load_merged(base, adapter)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for_class(type(model).__name__).load_processor(base).save_pretrained(out)
    return out
