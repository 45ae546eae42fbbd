"""Rebuilding an image-only processor from a checkpoint folder, for architectures whose HF
processor needs what this install leaves out (a torchvision video processor, an audio feature
extractor): the folder's tokenizer, its PIL image processor, the saved ``image_seq_length`` and
chat template, handed to the adapter's own image-only processor class."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from spatialbias.errors import SpatialBiasError


def rebuild_processor(src: Any, what: str, image_processor_cls, build: Callable, trust_remote_code: bool = False,
                      files: tuple[str, ...] = ("processor_config.json",)):
    """``build(image_processor, tokenizer, chat_template=…, [image_seq_length=…])`` from the folder
    ``src``: the first of ``files`` that records ``image_seq_length`` gives it; the chat template is
    the tokenizer's or ``chat_template.jinja``. ``what`` names the architecture in the one error
    line of a folder without image processor settings."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(src, local_files_only=True, trust_remote_code=trust_remote_code)
    try:
        ip = image_processor_cls.from_pretrained(src, local_files_only=True)
    except (OSError, ValueError) as e:
        raise SpatialBiasError(f"{what}: no image processor settings in {src} ({type(e).__name__}); the "
                               "checkpoint needs its preprocessor_config.json") from None
    folder, kw = Path(str(src)), {}
    for name in files:
        f = folder / name
        if f.is_file():
            saved = json.loads(f.read_text())
            saved = saved.get("processor", saved) if isinstance(saved.get("processor"), dict) else saved
            if "image_seq_length" in saved:
                kw["image_seq_length"] = int(saved["image_seq_length"])
                break
    template = getattr(tok, "chat_template", None)
    jinja = folder / "chat_template.jinja"
    if not template and jinja.is_file():
        template = jinja.read_text()
    return build(ip, tok, chat_template=template, **kw)
