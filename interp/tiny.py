"""Tiny random LVLMs with real processors, built from configs (tests and examples; no downloads).

Each builder returns ``(model, processor)``; the processor has a chat template so
``LVLM.prompt`` works as with a real checkpoint. ``save(model, processor, dir)`` writes a
folder that ``interp.load(dir)`` reads back like a real checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
WORDS = ("user", "assistant", "describe", "the", "image", "what", "is", "this", "a", "cat", "dog", "red",
         "blue", "picture", "of", "color", ":", "?", ".", ",", "USER", "ASSISTANT", "Yes", "No")
LLAVA_CHAT = ("{%- for m in messages -%}{{ m['role'].upper() }}: {% for c in m['content'] -%}"
              "{%- if c['type'] == 'image' -%}<image> {% elif c['type'] == 'text' -%}{{ c['text'] }} {% endif -%}"
              "{%- endfor -%}{%- endfor -%}{%- if add_generation_prompt -%}ASSISTANT:{%- endif -%}")


def word_tokenizer(vocab_words, *, pad: str, bos: str, eos: str, unk: str,
                   special: tuple[str, ...] = ("<image>",)) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer over ``vocab_words`` (ids in order) that prepends ``bos``,
    pads on the left, and keeps ``special`` tokens (e.g. the image token) unsplit."""
    vocab = {t: i for i, t in enumerate(vocab_words)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token=pad, bos_token=bos, eos_token=eos, unk_token=unk,
                                  padding_side="left")
    tok.add_tokens(list(special), special_tokens=True)
    return tok


def tokenizer() -> PreTrainedTokenizerFast:
    return word_tokenizer(SPECIALS + WORDS, pad="<pad>", bos="<s>", eos="</s>", unk="<unk>")


def image(h: int = 40, w: int = 48, seed: int = 0) -> Image.Image:
    """A random RGB test image."""
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype("uint8"))


def build_llava(seed: int = 0):
    """LlavaForConditionalGeneration: CLIP (32 px, 8 px patches → 16 image tokens) + Llama (2 layers, 64 wide)."""
    from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)
    torch.manual_seed(seed)
    tok = tokenizer()
    vcfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=32, patch_size=8, projection_dim=32)
    tcfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=256, vocab_size=len(tok),
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    cfg = LlavaConfig(vision_config=vcfg, text_config=tcfg, image_token_index=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_select_strategy="default", vision_feature_layer=-2, image_seq_length=16)
    cfg.architectures = ["LlavaForConditionalGeneration"]
    model = LlavaForConditionalGeneration(cfg).eval()
    ip = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, image_token="<image>", chat_template=LLAVA_CHAT)
    return model, proc


BUILDERS = {"llava": build_llava}


def save(model, processor, path: str | Path) -> Path:
    path = Path(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
