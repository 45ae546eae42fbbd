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

import functools
import string

import numpy as np
import torch
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


def _clip_llama(tok, max_positions: int):
    """The tiny CLIP vision config (32 px, 8 px patches) and Llama text config of both LLaVA builders."""
    from transformers import CLIPVisionConfig, LlamaConfig
    vcfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=32, patch_size=8, projection_dim=32)
    tcfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=max_positions, **_text_kw(tok))
    return vcfg, tcfg


def build_llava(seed: int = 0, tokenizer_kind: str = "word"):
    """LlavaForConditionalGeneration: CLIP (32 px, 8 px patches → 16 image tokens) + Llama (2 layers, 64 wide);
    ``tokenizer_kind`` picks :func:`tokenizer` (the chat template is LLaVA-style for all, ending in ``ASSISTANT:``)."""
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    torch.manual_seed(seed)
    tok = tokenizer(tokenizer_kind)
    vcfg, tcfg = _clip_llama(tok, max_positions=256)
    cfg = LlavaConfig(vision_config=vcfg, text_config=tcfg, image_token_index=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_select_strategy="default", vision_feature_layer=-2, image_seq_length=16)
    cfg.architectures = ["LlavaForConditionalGeneration"]
    model = LlavaForConditionalGeneration(cfg).eval()
    ip = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, image_token="<image>", chat_template=LLAVA_CHAT)
    return model, proc


def build_llava_next(seed: int = 0):
    """LlavaNextForConditionalGeneration: anyres (base view + tiles + image_newline tokens)."""
    from transformers import (LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextImageProcessorPil,
                              LlavaNextProcessor)
    torch.manual_seed(seed)
    tok = tokenizer()
    vcfg, tcfg = _clip_llama(tok, max_positions=512)
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    cfg = LlavaNextConfig(vision_config=vcfg, text_config=tcfg, image_token_index=tok.convert_tokens_to_ids("<image>"),
                          vision_feature_select_strategy="default", vision_feature_layer=-2,
                          image_grid_pinpoints=pinpoints, image_seq_length=16)
    cfg.architectures = ["LlavaNextForConditionalGeneration"]
    model = LlavaNextForConditionalGeneration(cfg).eval()
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                    image_grid_pinpoints=pinpoints)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                              num_additional_image_tokens=1, image_token="<image>", chat_template=LLAVA_CHAT)
    return model, proc


QWEN_CHAT = ("{%- for m in messages -%}<|im_start|> {{ m['role'] }} {% for c in m['content'] -%}"
             "{%- if c['type'] == 'image' -%}<|vision_start|> <|image_pad|> <|vision_end|> "
             "{%- elif c['type'] == 'text' -%}{{ c['text'] }} {% endif -%}{%- endfor -%}<|im_end|> {% endfor -%}"
             "{%- if add_generation_prompt -%}<|im_start|> assistant{%- endif -%}")


QWEN_CHATML = ("{%- for m in messages -%}{{ '<|im_start|>' + m['role'] + '\\n' }}{%- for c in m['content'] -%}"
               "{%- if c['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
               "{%- elif c['type'] == 'text' -%}{{ c['text'] }}{%- endif -%}{%- endfor -%}{{ '<|im_end|>\\n' }}"
               "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}")
"""Qwen2-VL's ChatML (no default system turn), for the BPE tokenizers: the generation prompt ends
in ``<|im_start|>assistant\\n`` and the answer follows with no space."""


def _qwen_processor(tok, chat_template=QWEN_CHAT):
    from transformers import Qwen2VLImageProcessorPil

    from interp.adapters.qwen import image_only_processor
    ip = Qwen2VLImageProcessorPil(patch_size=8, temporal_patch_size=2, merge_size=2,
                                  size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64})
    return image_only_processor(ip, tok, chat_template=chat_template)


def _qwen_text(tok) -> dict:
    return dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                **_text_kw(tok))


def _qwen_ids(tok) -> dict:
    c = tok.convert_tokens_to_ids
    return dict(image_token_id=c("<|image_pad|>"), video_token_id=c("<|video_pad|>"),
                vision_start_token_id=c("<|vision_start|>"), vision_end_token_id=c("<|vision_end|>"))


def build_qwen2vl(seed: int = 0, tokenizer_kind: str = "word"):
    """Qwen2VLForConditionalGeneration: M-RoPE (3 position rows), 2×2 patch merger. ``tokenizer_kind``
    picks :func:`tokenizer`; the BPE kinds get the ChatML template :data:`QWEN_CHATML`, the word
    level one :data:`QWEN_CHAT`."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    torch.manual_seed(seed)
    tok = tokenizer(tokenizer_kind)
    cfg = Qwen2VLConfig(text_config=_qwen_text(tok),
                        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2,
                                           patch_size=8, spatial_merge_size=2, temporal_patch_size=2),
                        **_qwen_ids(tok))
    cfg.architectures = ["Qwen2VLForConditionalGeneration"]
    return (Qwen2VLForConditionalGeneration(cfg).eval(),
            _qwen_processor(tok, QWEN_CHAT if tokenizer_kind == "word" else QWEN_CHATML))


def build_qwen25vl(seed: int = 0):
    """Qwen2_5_VLForConditionalGeneration: windowed vision attention, M-RoPE, 2×2 merger."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    tok = tokenizer()
    cfg = Qwen2_5_VLConfig(text_config=_qwen_text(tok),
                           vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4,
                                              out_hidden_size=64, patch_size=8, spatial_merge_size=2,
                                              temporal_patch_size=2, window_size=32, fullatt_block_indexes=[1]),
                           **_qwen_ids(tok))
    cfg.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    return Qwen2_5_VLForConditionalGeneration(cfg).eval(), _qwen_processor(tok)


GEMMA_CHAT = ("{%- for m in messages -%}{{ m['role'] }} {% for c in m['content'] -%}"
              "{%- if c['type'] == 'image' -%}<start_of_image> {% elif c['type'] == 'text' -%}{{ c['text'] }} "
              "{%- endif -%}{%- endfor -%}{%- endfor -%}{%- if add_generation_prompt -%} assistant{%- endif -%}")


def build_gemma3(seed: int = 0):
    """Gemma3ForConditionalGeneration: SigLIP + pooled soft tokens (2×2 here, 16×16 in Gemma3),
    sliding + global attention layers, bidirectional attention among image tokens."""
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil,
                              Gemma3Processor, Gemma3TextConfig, SiglipVisionConfig)
    torch.manual_seed(seed)
    tok = tokenizer(image_token="<image_soft_token>", boi_token="<start_of_image>", eoi_token="<end_of_image>")
    c = tok.convert_tokens_to_ids
    vcfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, vision_use_head=False)
    tcfg = Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                            layer_types=["sliding_attention", "full_attention"], max_position_embeddings=512,
                            **_text_kw(tok))
    cfg = Gemma3Config(vision_config=vcfg, text_config=tcfg, mm_tokens_per_image=4,
                       boi_token_index=c("<start_of_image>"), eoi_token_index=c("<end_of_image>"),
                       image_token_index=c("<image_soft_token>"))
    cfg.architectures = ["Gemma3ForConditionalGeneration"]
    model = Gemma3ForConditionalGeneration(cfg).eval()
    # Gemma3's init zeroes mm_input_projection_weight: the image would have no effect at all.
    with torch.no_grad():
        torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.1)
    ip = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    proc = Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=4, chat_template=GEMMA_CHAT)
    return model, proc


ONEVISION_CHAT = ("{%- for m in messages -%}<|im_start|> {{ m['role'] }} {% for c in m['content'] -%}"
                  "{%- if c['type'] == 'image' -%}<image> {% elif c['type'] == 'text' -%}{{ c['text'] }} {% endif -%}"
                  "{%- endfor -%}<|im_end|> {% endfor -%}{%- if add_generation_prompt -%}<|im_start|> assistant{%- endif -%}")
"""LLaVA-OneVision's ChatML shape for the word-level tokenizer (``<image>`` marks each image)."""


def build_llava_onevision(seed: int = 0):
    """LlavaOnevisionForConditionalGeneration: SigLIP (32 px, 8 px patches, no CLS; features of the
    last block, ``vision_feature_select_strategy="full"`` as in the released checkpoints) + MLP
    projector + Qwen2 LM (2 layers, 64 wide); AnyRes-Max: base view 4×4, then the tiles of a
    pinpoint grid (up to 2×2 tiles of 32 px) unpadded to the image's aspect, a newline after
    each row; several images in one row are not tiled (base view + one newline each)."""
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionImageProcessorPil, Qwen2Config, SiglipVisionConfig)

    from interp.adapters.llava_onevision import image_only_processor
    torch.manual_seed(seed)
    tok = tokenizer()
    c = tok.convert_tokens_to_ids
    vcfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, vision_use_head=False)
    tcfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=512, **_text_kw(tok))
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    cfg = LlavaOnevisionConfig(vision_config=vcfg, text_config=tcfg, image_token_index=c("<image>"),
                               video_token_index=c("<|video_pad|>"), vision_feature_select_strategy="full",
                               vision_feature_layer=-1, image_grid_pinpoints=pinpoints,
                               vision_aspect_ratio="anyres_max_9")
    cfg.architectures = ["LlavaOnevisionForConditionalGeneration"]
    model = LlavaOnevisionForConditionalGeneration(cfg).eval()
    ip = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints)
    proc = image_only_processor(ip, tok, chat_template=ONEVISION_CHAT, num_image_tokens=16,
                                vision_feature_select_strategy="full", image_token="<image>",
                                video_token="<|video_pad|>", vision_aspect_ratio="anyres_max_9")
    return model, proc


def build_qwen3vl(seed: int = 0):
    """Qwen3VLForConditionalGeneration: learned vision position embeddings (a 4×4 grid, resampled),
    2×2 merger, DeepStack (the features of vision blocks 0 and 1, each through its own merger, added
    at the image positions after LM blocks 0 and 1 of 3), Qwen3 LM (q/k norms) with interleaved
    M-RoPE; ``mm_token_type_ids`` from the processor."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen2VLImageProcessorPil

    from interp.adapters.qwen3_vl import image_only_processor
    torch.manual_seed(seed)
    tok = tokenizer()
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                 "mrope_interleaved": True}, **_text_kw(tok))
    cfg = Qwen3VLConfig(text_config=text,
                        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4,
                                           out_hidden_size=64, patch_size=8, spatial_merge_size=2,
                                           temporal_patch_size=2, num_position_embeddings=16,
                                           deepstack_visual_indexes=[0, 1]),
                        **_qwen_ids(tok))
    cfg.architectures = ["Qwen3VLForConditionalGeneration"]
    ip = Qwen2VLImageProcessorPil(patch_size=8, temporal_patch_size=2, merge_size=2,
                                  size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64})
    return Qwen3VLForConditionalGeneration(cfg).eval(), image_only_processor(ip, tok, chat_template=QWEN_CHAT)


def build_qwen35(seed: int = 0):
    """Qwen3_5ForConditionalGeneration: Qwen3-VL's tiny vision side without DeepStack and a hybrid LM —
    Gated DeltaNet, full attention (partial interleaved M-RoPE: 8 of 32 head dims rotate), Gated DeltaNet —
    on HF's torch kernels; byte-level BPE (a saved qwen3_5 folder is read back with one) and ChatML."""
    from transformers import Qwen2VLImageProcessorPil, Qwen3_5Config, Qwen3_5ForConditionalGeneration

    from interp.adapters.qwen3_vl import image_only_processor
    torch.manual_seed(seed)
    tok = tokenizer("bytelevel")
    rope = {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25, "mrope_section": [2, 1, 1],
            "mrope_interleaved": True}
    text = dict(_qwen_text(tok), num_hidden_layers=3, head_dim=32, rope_parameters=rope, linear_key_head_dim=8,
                layer_types=["linear_attention", "full_attention", "linear_attention"], linear_value_head_dim=8,
                linear_num_key_heads=2, linear_num_value_heads=4)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, patch_size=8,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16)
    cfg = Qwen3_5Config(text_config=text, vision_config=vision, architectures=["Qwen3_5ForConditionalGeneration"],
                        **_qwen_ids(tok))
    ip = Qwen2VLImageProcessorPil(patch_size=8, temporal_patch_size=2, merge_size=2,
                                  size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64})
    return Qwen3_5ForConditionalGeneration(cfg).eval(), image_only_processor(ip, tok, chat_template=QWEN_CHATML)


INTERNVL_CHAT = ("{%- for m in messages -%}<|im_start|> {{ m['role'] }} {% for c in m['content'] -%}"
                 "{%- if c['type'] == 'image' -%}<IMG_CONTEXT> {% elif c['type'] == 'text' -%}{{ c['text'] }} {% endif -%}"
                 "{%- endfor -%}<|im_end|> {% endfor -%}{%- if add_generation_prompt -%}<|im_start|> assistant{%- endif -%}")
"""InternVL's ChatML shape for the word-level tokenizer (``<IMG_CONTEXT>`` marks each image)."""


def build_internvl(seed: int = 0):
    """InternVLForConditionalGeneration: InternViT (48 px tiles, 8 px patches → 6×6 patches and a CLS
    token per crop, 2 blocks), pixel shuffle 0.5 (3×3 = 9 tokens per crop), MLP projector, Qwen2 LM
    (2 layers, 64 wide); dynamic tiling on (``max_patches`` 12, HF's default): a square 144 px
    probe is 3×3 tiles + a thumbnail (90 image tokens), a 40×48 image 3 rows × 4 columns of tiles
    + a thumbnail (117 tokens), a 48×48 one a single crop (9 tokens)."""
    from transformers import (GotOcr2ImageProcessorPil, InternVLConfig, InternVLForConditionalGeneration,
                              InternVLVisionConfig, Qwen2Config)

    from interp.adapters.internvl import image_only_processor
    torch.manual_seed(seed)
    tok = tokenizer(start_image_token="<img>", end_image_token="</img>", context_image_token="<IMG_CONTEXT>",
                    video_token="<video>")
    vcfg = InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=48, patch_size=8)
    tcfg = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=512, **_text_kw(tok))
    cfg = InternVLConfig(vision_config=vcfg, text_config=tcfg, image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
                         image_seq_length=9, downsample_ratio=0.5, vision_feature_layer=-1,
                         vision_feature_select_strategy="default")
    cfg.architectures = ["InternVLForConditionalGeneration"]
    model = InternVLForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # HF initialises them to zero; random ones give every crop position its own code
        model.model.vision_tower.embeddings.position_embeddings.normal_(std=0.02)
        model.model.vision_tower.embeddings.cls_token.normal_(std=0.02)
    ip = GotOcr2ImageProcessorPil(size={"height": 48, "width": 48}, crop_to_patches=True, min_patches=1,
                                  max_patches=12)
    return model, image_only_processor(ip, tok, chat_template=INTERNVL_CHAT, image_seq_length=9)


BUILDERS = {"llava": build_llava, "llava_next": build_llava_next, "qwen2vl": build_qwen2vl,
            "qwen25vl": build_qwen25vl, "gemma3": build_gemma3, "llava_onevision": build_llava_onevision,
            "qwen3vl": build_qwen3vl, "internvl": build_internvl,
            "qwen35": build_qwen35}


def save(model, processor, path: str | Path) -> Path:
    path = Path(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
