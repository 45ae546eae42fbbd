"""Tiny Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE and Qwen3.5."""
from __future__ import annotations

import torch

from interp.tiny.text import _text_kw, tokenizer


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


def build_qwen3vl_moe(seed: int = 0):
    """Qwen3VLMoeForConditionalGeneration: :func:`build_qwen3vl`'s vision side and processor (DeepStack
    from vision block 1 added after LM block 0), a 2-block Qwen3-MoE LM 64 wide: each block's MLP
    routes every token to the top 2 of 4 SwiGLU experts 32 wide (router at ``mlp.gate``)."""
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration
    dense, proc = build_qwen3vl(seed)  # the same tokenizer, processor and configs, then the MoE ones
    torch.manual_seed(seed)
    text = {**dense.config.text_config.to_diff_dict(), "num_hidden_layers": 2, "moe_intermediate_size": 32,
            "num_experts": 4, "num_experts_per_tok": 2, "model_type": "qwen3_vl_moe_text"}
    vision = {**dense.config.vision_config.to_diff_dict(), "deepstack_visual_indexes": [1],
              "model_type": "qwen3_vl_moe_vision"}
    cfg = Qwen3VLMoeConfig(text_config=text, vision_config=vision, **_qwen_ids(proc.tokenizer))
    cfg.architectures = ["Qwen3VLMoeForConditionalGeneration"]
    return Qwen3VLMoeForConditionalGeneration(cfg).eval(), proc
