"""Tiny random LVLMs with real processors, built from configs (tests and examples; no downloads).

Each builder returns ``(model, processor)``; the processor has a chat template so
``LVLM.prompt`` works as with a real checkpoint. ``save(model, processor, dir)`` writes a
folder that ``interp.load(dir)`` reads back like a real checkpoint.

Tokenizers (:func:`tokenizer`): the default is word-level (one id per word, as every tiny model
had); ``kind="metaspace"`` (SentencePiece-style BPE, like Llama/Mistral: ``▁`` marks a preceding
space) and ``kind="bytelevel"`` (GPT-2-style byte-level BPE, like Qwen: ``Ġ`` marks it) are
trained here on :data:`CORPUS`, so a space before a word makes a different token, as in real
checkpoints. ``build_llava`` and ``build_qwen2vl`` take ``tokenizer_kind``.
"""
from __future__ import annotations

from pathlib import Path

from interp.tiny.gemma import GEMMA_CHAT, build_gemma3, build_gemma3n, build_gemma4, build_gemma4_small
from interp.tiny.internvl import INTERNVL_CHAT, build_internvl
from interp.tiny.llava import ONEVISION_CHAT, build_llava, build_llava_next, build_llava_onevision
from interp.tiny.qwen import (QWEN_CHAT, QWEN_CHATML, _qwen_ids, _qwen_processor, _qwen_text, build_qwen2vl,
                              build_qwen3vl, build_qwen3vl_moe, build_qwen25vl, build_qwen35)
from interp.tiny.text import (CORPUS, LLAVA_CHAT, SPECIALS, TOKENIZER_KINDS, WORDS, image, tokenizer,
                              word_tokenizer)

BUILDERS = {"llava": build_llava, "llava_next": build_llava_next, "qwen2vl": build_qwen2vl,
            "qwen25vl": build_qwen25vl, "gemma3": build_gemma3, "llava_onevision": build_llava_onevision,
            "qwen3vl": build_qwen3vl, "internvl": build_internvl, "qwen3vl_moe": build_qwen3vl_moe,
            "gemma4": build_gemma4, "qwen35": build_qwen35, "gemma3n": build_gemma3n,
            "gemma4_small": build_gemma4_small}
"""Architecture name → builder of its tiny ``(model, processor)``: every parametrised parity test runs each."""

__all__ = ["BUILDERS", "CORPUS", "GEMMA_CHAT", "INTERNVL_CHAT", "LLAVA_CHAT", "ONEVISION_CHAT", "QWEN_CHAT",
           "QWEN_CHATML", "SPECIALS", "TOKENIZER_KINDS", "WORDS", "_qwen_ids", "_qwen_processor", "_qwen_text",
           "build_gemma3", "build_gemma3n", "build_gemma4", "build_gemma4_small", "build_internvl", "build_llava", "build_llava_next", "build_llava_onevision",
           "build_qwen25vl", "build_qwen2vl", "build_qwen35", "build_qwen3vl", "build_qwen3vl_moe", "image", "save",
           "tokenizer", "word_tokenizer"]


def save(model, processor, path: str | Path) -> Path:
    path = Path(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
