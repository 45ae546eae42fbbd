"""Real-scale shapes with random weights, for benchmarks (no download): LLaVA-1.5-7B,
Qwen2.5-VL-7B and Qwen3-VL-8B configs, optionally with fewer layers, and real processors (PIL
image processors at the real resolution; the tiny word-level tokenizer)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from interp import tiny


def _build(cls, cfg, dtype: torch.dtype, device: str):
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return cls(cfg).eval()
    finally:
        torch.set_default_dtype(prev)


def llava_15_7b(lm_layers: int = 32, vision_layers: int = 24, image_size: int = 336,
                dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """LLaVA-1.5-7B: CLIP ViT-L/14 (``image_size`` px → (image_size/14)² image tokens; 576 at 336)
    + Llama-2-7B (4096 wide, 32 layers). Returns (model, processor)."""
    from transformers import CLIPImageProcessorPil, LlavaForConditionalGeneration, LlavaProcessor
    tok = tiny.tokenizer()
    cfg = llava_15_7b_config(lm_layers, vision_layers, image_size)
    model = _build(LlavaForConditionalGeneration, cfg, dtype, device)
    ip = CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                               image_mean=[0.48145466, 0.4578275, 0.40821073],
                               image_std=[0.26862954, 0.26130258, 0.27577711])
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, image_token="<image>", chat_template=tiny.LLAVA_CHAT)
    return model, proc


def qwen25_vl_7b(lm_layers: int = 28, vision_layers: int = 32, dtype: torch.dtype = torch.float32,
                 device: str = "cpu"):
    """Qwen2.5-VL-7B: a 32-block windowed ViT (1280 wide) + merger + Qwen2 LM (3584 wide, 28
    layers, M-RoPE); an 840 px canvas gives 60×60 patches → 900 merged image tokens."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    from interp.adapters.qwen import image_only_processor
    tok = tiny.tokenizer()
    cfg = qwen25_vl_7b_config(lm_layers, vision_layers)
    model = _build(Qwen2_5_VLForConditionalGeneration, cfg, dtype, device)
    ip = Qwen2VLImageProcessorPil(patch_size=14, temporal_patch_size=2, merge_size=2,
                                  size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280})
    return model, image_only_processor(ip, tok, chat_template=tiny.QWEN_CHAT)


def llava_15_7b_config(lm_layers: int = 32, vision_layers: int = 24, image_size: int = 336):
    """The LlavaConfig of :func:`llava_15_7b` (no weights; the memory model reads it)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig
    tok = tiny.tokenizer()
    vc = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=vision_layers,
                          num_attention_heads=16, image_size=image_size, patch_size=14, projection_dim=768,
                          hidden_act="quick_gelu")
    tc = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=lm_layers, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
                     pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    n_img = (image_size // 14) ** 2
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-2 if vision_layers > 1 else -1, vision_feature_select_strategy="default",
                      image_seq_length=n_img, projector_hidden_act="gelu")
    cfg.architectures = ["LlavaForConditionalGeneration"]
    return cfg


def qwen25_vl_7b_config(lm_layers: int = 28, vision_layers: int = 32):
    """The Qwen2_5_VLConfig of :func:`qwen25_vl_7b` (no weights; the memory model reads it)."""
    from transformers import Qwen2_5_VLConfig
    tok = tiny.tokenizer()
    full = [i for i in (7, 15, 23, 31) if i < vision_layers] or [vision_layers - 1]
    cfg = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=lm_layers,
                         num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
                         vocab_size=152064, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id),
        vision_config=dict(depth=vision_layers, hidden_size=1280, intermediate_size=3420, num_heads=16,
                           out_hidden_size=3584, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                           window_size=112, fullatt_block_indexes=full),
        **tiny._qwen_ids(tok))
    cfg.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    return cfg


def qwen3_vl_8b(lm_layers: int = 36, vision_layers: int = 27, dtype: torch.dtype = torch.float32,
                device: str = "cpu"):
    """Qwen3-VL-8B: a 27-block ViT (1152 wide, 16 px patches, learned position embeddings,
    DeepStack) + 2×2 merger + Qwen3 LM (4096 wide, 36 layers, 8 KV heads, interleaved M-RoPE);
    a 288 px canvas (its probe canvas) gives 18×18 patches → 81 merged image tokens. Returns
    (model, processor)."""
    from transformers import Qwen2VLImageProcessorPil, Qwen3VLForConditionalGeneration

    from interp.adapters.qwen3_vl import image_only_processor
    tok = tiny.tokenizer()
    model = _build(Qwen3VLForConditionalGeneration, qwen3_vl_8b_config(lm_layers, vision_layers), dtype, device)
    ip = Qwen2VLImageProcessorPil(patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=[0.5] * 3,
                                  image_std=[0.5] * 3, size={"shortest_edge": 65536, "longest_edge": 16777216})
    return model, image_only_processor(ip, tok, chat_template=tiny.QWEN_CHAT)


def qwen3_vl_8b_config(lm_layers: int = 36, vision_layers: int = 27):
    """The Qwen3VLConfig of :func:`qwen3_vl_8b` (no weights), the values of
    ``benchmarks/configs/qwen3-vl-8b/config.json`` (tests/test_realshape.py compares them) but the
    depths and the token ids (the tiny tokenizer's). DeepStack taps the real blocks 8/16/24 that
    are kept; with fewer than 9 vision blocks, the first ``min(3, vision_layers)`` blocks instead
    (so a few-layer model still adds DeepStack features after its first LM blocks)."""
    from transformers import Qwen3VLConfig
    tok = tiny.tokenizer()
    deepstack = [i for i in (8, 16, 24) if i < vision_layers] or list(range(min(3, vision_layers)))
    cfg = Qwen3VLConfig(
        text_config=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=lm_layers,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=262144,
                         rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                                             "mrope_section": [24, 20, 20], "mrope_interleaved": True},
                         vocab_size=151936, tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        vision_config=dict(depth=vision_layers, hidden_size=1152, intermediate_size=4304, num_heads=16,
                           out_hidden_size=4096, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                           num_position_embeddings=2304, hidden_act="gelu_pytorch_tanh",
                           deepstack_visual_indexes=deepstack),
        tie_word_embeddings=False, **tiny._qwen_ids(tok))
    cfg.architectures = ["Qwen3VLForConditionalGeneration"]
    return cfg


@dataclass(frozen=True)
class RealModel:
    """A real-shape benchmark model: ``build(lm_layers, vision_layers, dtype=, device=)`` →
    (model, processor); its full depth (``lm_layers``, ``vision_layers``); the canvas it is
    benchmarked at (``image_px``) and the smaller one a CPU memory measurement affords (``cpu_px``)."""
    build: Callable
    lm_layers: int
    vision_layers: int
    image_px: tuple[int, int]
    cpu_px: tuple[int, int]


REAL: dict[str, RealModel] = {
    "llava15": RealModel(llava_15_7b, 32, 24, (336, 336), (336, 336)),
    "qwen25vl": RealModel(qwen25_vl_7b, 28, 32, (840, 840), (448, 448)),  # 840 px: 900 merged image tokens
    "qwen3vl8b": RealModel(qwen3_vl_8b, 36, 27, (288, 288), (288, 288)),  # its probe canvas: 81 merged tokens
}
"""The benchmarks' real-shape models by name (this module builds named architectures, so the
table lives here and the benchmarks read it instead of branching on a name)."""
