"""Tokenizers, chat templates and test images the tiny builders share."""
from __future__ import annotations

import functools
import string

import numpy as np
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", "<image>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
            "<|vision_end|>", "<start_of_image>", "<end_of_image>", "<image_soft_token>", "<|im_start|>",
            "<|im_end|>")
WORDS = ("user", "assistant", "describe", "the", "image", "what", "is", "this", "a", "cat", "dog", "red",
         "blue", "picture", "of", "color", ":", "?", ".", ",", "USER", "ASSISTANT", "Yes", "No")
LLAVA_CHAT = ("{%- for m in messages -%}{{ m['role'].upper() }}: {% for c in m['content'] -%}"
              "{%- if c['type'] == 'image' -%}<image> {% elif c['type'] == 'text' -%}{{ c['text'] }} {% endif -%}"
              "{%- endfor -%}{%- endfor -%}{%- if add_generation_prompt -%}ASSISTANT:{%- endif -%}")


def word_tokenizer(vocab_words, *, pad: str, bos: str, eos: str, unk: str, special: tuple[str, ...] = ("<image>",),
                   named: dict[str, str] | None = None) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer over ``vocab_words`` (ids in order) that prepends ``bos``,
    pads on the left, and keeps ``special`` tokens (e.g. the image token) unsplit. ``named``
    exposes model-specific tokens as attributes (Gemma3's ``image_token``, ``boi_token``)."""
    vocab = {t: i for i, t in enumerate(vocab_words)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token=pad, bos_token=bos, eos_token=eos, unk_token=unk,
                                  padding_side="left", **({"extra_special_tokens": named} if named else {}))
    tok.add_tokens(list(special), special_tokens=True)
    return tok


TOKENIZER_KINDS = ("word", "metaspace", "bytelevel")

_CAPTIONS = ("a cat", "a dog", "a red car", "a blue cup", "the astronaut", "a camera man", "a horse", "coffee")
_TEXTS = tuple(f"Determine if there is a sub-image in the given image that matches the text following.\nText: {c}\n"
               "The answer should only contain 'Yes' or 'No', without reasoning process.\n" for c in _CAPTIONS) + (
    "describe the image ?", "what is this ?", "what is this a picture of ?", "what is this a picture of the dog ?",
    "what colour is the circle ?", "what colour is the square ?", "what colour is the triangle ?", "is it ?")
_ANSWERS = ("Yes", "No", "red", "green", "blue", "yellow", "cat", "dog")
CORPUS = tuple(
    [f"USER: {t} ASSISTANT: {a}" for t in _TEXTS for a in _ANSWERS]
    + [f"<|im_start|>user\n{t}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>" for t in _TEXTS for a in _ANSWERS]
    + ["<|im_start|>system\nYou are a helpful assistant.<|im_end|>", "[INST] [/INST]",
       "<start_of_turn>user\n<end_of_turn>\n<start_of_turn>model\n", " ".join(WORDS), *_ANSWERS])
"""What the trained tokenizers learn from: the prompts and answers the tiny models are given, in
the LLaVA (``ASSISTANT: Yes``, a space before the answer) and ChatML (``assistant\\nYes``, none)
formats, so both ``▁Yes``/``ĠYes`` and ``Yes`` are single tokens."""


@functools.cache
def _trained(kind: str) -> str:
    """The trained tokenizer ``kind`` as JSON (deterministic: same corpus, same merges)."""
    if kind == "metaspace":  # SentencePiece-style, as HF converts Llama/Mistral (prepend_scheme "first")
        tk = Tokenizer(models.BPE(unk_token="<unk>"))
        tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
        tk.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
        alphabet, size = [*string.printable, "\u2581"], 400
    elif kind == "bytelevel":  # GPT-2 / Qwen2 style: every byte is a token, Ġ marks a space
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tk.decoder = decoders.ByteLevel()
        alphabet, size = pre_tokenizers.ByteLevel.alphabet(), 600
    else:
        raise ValueError(f"tokenizer kind {kind!r}: use one of {', '.join(TOKENIZER_KINDS)}")
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=size, special_tokens=list(SPECIALS),
                                                       initial_alphabet=alphabet, show_progress=False))
    if kind == "metaspace":  # Llama prepends BOS; Qwen adds none
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tk.token_to_id("<s>"))])
    return tk.to_str()


def tokenizer(kind: str = "word", **extra_special) -> PreTrainedTokenizerFast:
    """The tiny models' tokenizer: ``kind`` is ``"word"`` (word level over :data:`WORDS`, the
    default), ``"metaspace"`` (SentencePiece-style BPE, BOS prepended, like Llama/Mistral) or
    ``"bytelevel"`` (byte-level BPE, no BOS, like Qwen2); the BPE ones are trained on
    :data:`CORPUS` with :data:`SPECIALS` as special tokens. ``extra_special`` names
    model-specific tokens (Gemma3's ``image_token``, ``boi_token``, ``eoi_token``) so the
    processor finds them."""
    if kind == "word":
        return word_tokenizer(SPECIALS + WORDS, pad="<pad>", bos="<s>", eos="</s>", unk="<unk>", special=SPECIALS[4:],
                              named=extra_special or None)
    tk = Tokenizer.from_str(_trained(kind))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", padding_side="left",
                                  **({"extra_special_tokens": extra_special} if extra_special else {}))
    tok.add_tokens(list(SPECIALS[4:]), special_tokens=True)
    return tok


def image(h: int = 40, w: int = 48, seed: int = 0) -> Image.Image:
    """A random RGB test image."""
    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype("uint8"))


def _text_kw(tok) -> dict:
    return dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id)
