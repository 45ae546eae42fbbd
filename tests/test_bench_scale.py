"""The scale benchmark's arithmetic and the memory model's claims that the README quotes.

* ``linear``: per-layer growth between the fewest and most LM layers and its carry to full depth;
* the memory model's per-block autograd term equals what autograd really keeps (saved-tensor
  hooks, fp32 and bf16, frozen parameters, within 2 %) on one block of each LM block class:
  ``LlamaDecoderLayer``, ``Qwen2DecoderLayer``, ``Gemma3DecoderLayer``, ``Qwen3DecoderLayer``
  (InternVL3.5's LM), ``Qwen3VLTextDecoderLayer``, ``Qwen3VLMoeTextDecoderLayer``,
  ``Gemma4TextDecoderLayer`` (a sliding and a full-attention layer, dense and MoE) and ``Qwen3_5DecoderLayer``
  (a Gated DeltaNet and a gated full-attention layer), Qwen2 blocks also under InternVL's and
  LLaVA-OneVision's model_type (their adapters route the facts): the bugs this catches are the
  ones found (the norms' fp32 inputs counted at the model dtype; Gemma3's four norms and per-head
  q/k norms, and its q width ≠ D; Gemma4's v norm and full layers' own head size; Qwen3.5's
  output gate and DeltaNet layers; InternVL3.5's Qwen3 q/k norms; Gemma4's MoE block,
  ``enable_moe_block``, whose router and experts beside the dense MLP had no term);
* resumed patching's kept term equals what :func:`interp.resume.capture_lm` keeps (residual
  streams, keys/values at each layer kind's width, none for Gated DeltaNet) on the tiny Qwen3.5
  and a tiny Gemma4 whose full layers' keys/values are wider than its sliding ones';
* gemma-4-26B-A4B's config goes through the memory model and ``report --dry-run``;
* ``spatialbias report`` at LLaVA-1.5-7B shapes fits 40 GiB (the README's claim);
* the sharding section on the tiny models (accelerate CPU/disk split, logits equal).
"""
from dataclasses import replace

import pytest
import torch

from analyses import estimate
from analyses.bench import scale as bs
from helpers import bf16_sdpa_forced_off, dry_run_peaks
from interp import tiny


def test_linear_slope_and_full_depth():
    runs = [{"model": "llava15", "analysis": "patching", "layers": n, "measured_bytes": 100 + 10 * n,
             "predicted_bytes": 90 + 12 * n} for n in (2, 8)]
    runs.append({"model": "llava15", "analysis": "eval", "layers": 2, "measured_bytes": 5, "predicted_bytes": 5})
    got = bs.linear(runs)
    assert set(got) == {"llava15/patching"}  # one layer count: no slope
    r = got["llava15/patching"]
    assert r["measured_per_layer"] == 10 and r["predicted_per_layer"] == 12 and r["layers"] == 32
    assert r["measured_at_full"] == 100 + 10 * 32 and r["predicted_at_full"] == 90 + 12 * 32


def _saved_bytes_per_token(layer, x, **kw) -> float:
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, **kw)
    skip = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    skip |= {t.untyped_storage().data_ptr() for t in kw["position_embeddings"]}
    return sum(v for k, v in seen.items() if k not in skip) / x.shape[1]


ARCHS = {  # case: (top-level model_type, config class, decoder layer, rotary, D, F, heads, kv heads, head dim)
    "llava": ("llava", "LlamaConfig", "llama.modeling_llama.LlamaDecoderLayer",
              "llama.modeling_llama.LlamaRotaryEmbedding", 256, 688, 4, 4, 64),
    "qwen2_vl": ("qwen2_vl", "Qwen2Config", "qwen2.modeling_qwen2.Qwen2DecoderLayer",
                 "qwen2.modeling_qwen2.Qwen2RotaryEmbedding",
                 448, 1216, 7, 1, 64),  # grouped-query: k and v at the key/value width
    "gemma3": ("gemma3", "Gemma3TextConfig", "gemma3.modeling_gemma3.Gemma3DecoderLayer",
               "gemma3.modeling_gemma3.Gemma3RotaryEmbedding", 256, 1024, 4, 2, 96),  # 4 norms, q/k norms, Dq ≠ D
    # the LMs of InternVL (Qwen2 in InternVL3, Qwen3 in InternVL3.5) and LLaVA-OneVision (Qwen2):
    # the same blocks, routed through their own adapters' facts
    "internvl": ("internvl", "Qwen2Config", "qwen2.modeling_qwen2.Qwen2DecoderLayer",
                 "qwen2.modeling_qwen2.Qwen2RotaryEmbedding", 256, 688, 4, 2, 64),
    "internvl/qwen3": ("internvl", "Qwen3Config", "qwen3.modeling_qwen3.Qwen3DecoderLayer",
                       "qwen3.modeling_qwen3.Qwen3RotaryEmbedding", 256, 688, 4, 2, 64),  # q/k norms
    "llava_onevision": ("llava_onevision", "Qwen2Config", "qwen2.modeling_qwen2.Qwen2DecoderLayer",
                        "qwen2.modeling_qwen2.Qwen2RotaryEmbedding", 256, 688, 4, 2, 64),
}


def _load(path: str):
    import importlib
    mod, name = path.rsplit(".", 1)
    return getattr(importlib.import_module(f"transformers.models.{mod}"), name)


@pytest.mark.parametrize("case", list(ARCHS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attribution_term_is_what_autograd_keeps(case, dtype):
    """Per token of one LM block: the memory model's autograd term (without the 2 D the
    attribution sites keep outside the block) equals the bytes of the tensors autograd saves with
    frozen parameters, to 2 % (the rest: per-token norm scalars)."""
    import transformers
    model_type, cfg_name, layer_path, rot_path, D, F, H, KV, hd = ARCHS[case]
    cfg = getattr(transformers, cfg_name)(hidden_size=D, intermediate_size=F, num_attention_heads=H,
                                          num_key_value_heads=KV, head_dim=hd, num_hidden_layers=1)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layer = _load(layer_path)(cfg, 0).to(dtype)
    for p in layer.parameters():
        p.requires_grad_(False)
    L = 40
    x = torch.randn(1, L, D, dtype=dtype, requires_grad=True)
    pos = torch.arange(L)[None]
    rot = _load(rot_path)(cfg)
    pe = rot(x, pos, layer_type="sliding_attention") if model_type == "gemma3" else rot(x, pos)
    got = _saved_bytes_per_token(layer, x, attention_mask=None, position_ids=pos, position_embeddings=pe)
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    shapes = estimate.Shapes.from_config({"model_type": model_type, "text_config": cfg.to_dict()}, name)
    assert estimate.lm_block_saved(shapes, sites=False) == pytest.approx(got, rel=0.02), got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_attribution_term_is_what_autograd_keeps(dtype):
    """The same on one Qwen3-VL-MoE text block (HF's default grouped_mm experts, top 2 of 8
    experts): the adapter's MoE facts (3 k·Fe + k·D + 2E per token) stand for the MLP's 3 F."""
    import transformers
    from transformers.models.qwen3_vl_moe import modeling_qwen3_vl_moe as hf
    D, L = 256, 40
    cfg = transformers.Qwen3VLMoeTextConfig(
        hidden_size=D, intermediate_size=512, moe_intermediate_size=96, num_experts=8, num_experts_per_tok=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_hidden_layers=1,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12],
                         "mrope_interleaved": True})
    cfg._attn_implementation, cfg._experts_implementation = "sdpa", "grouped_mm"
    torch.manual_seed(0)
    layer = hf.Qwen3VLMoeTextDecoderLayer(cfg, 0).to(dtype)
    for p in layer.parameters():
        p.requires_grad_(False)
    x = torch.randn(1, L, D, dtype=dtype, requires_grad=True)
    pos = torch.arange(L)[None]
    pe = hf.Qwen3VLMoeTextRotaryEmbedding(cfg)(x, pos[None].expand(3, 1, L))
    got = _saved_bytes_per_token(layer, x, attention_mask=None, position_ids=pos, position_embeddings=pe)
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    shapes = estimate.Shapes.from_config({"model_type": "qwen3_vl_moe", "text_config": cfg.to_dict()}, name)
    assert estimate.lm_block_saved(shapes, sites=False) == pytest.approx(got, rel=0.02), got


def _frozen(layer, dtype):
    layer = layer.to(dtype)
    for p in layer.parameters():
        p.requires_grad_(False)
    return layer


def _predicted_block(model_type: str, t: dict, i: int, dtype: str) -> float:
    """The memory model's autograd term of LM block i alone (attribution sites aside): all blocks
    up to i minus those before it, so the adapter's per-layer kinds say which kind block i is."""
    def upto(n):
        shapes = estimate.Shapes.from_config({"model_type": model_type, "text_config": {**t, "num_hidden_layers": n}},
                                             dtype)
        return estimate.lm_blocks_saved(shapes, sites=False)
    return upto(i + 1) - upto(i)


def _qwen3_vl(L, dtype):
    import transformers
    from transformers.models.qwen3_vl import modeling_qwen3_vl as hf
    cfg = transformers.Qwen3VLTextConfig(
        hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        num_hidden_layers=1, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                              "mrope_section": [8, 12, 12], "mrope_interleaved": True})
    cfg._attn_implementation = "sdpa"
    layer = _frozen(hf.Qwen3VLTextDecoderLayer(cfg, 0), dtype)
    return cfg, [(0, layer, lambda x, pos: {"position_embeddings": hf.Qwen3VLTextRotaryEmbedding(cfg)(
        x, pos[None].expand(3, *pos.shape))})]


def _gemma4(L, dtype, **moe):
    import transformers
    from transformers.models.gemma4 import modeling_gemma4 as hf
    cfg = transformers.Gemma4TextConfig(
        hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=64, global_head_dim=128, num_global_key_value_heads=1, attention_k_eq_v=True,
        layer_types=["sliding_attention", "full_attention"], hidden_size_per_layer_input=0, num_kv_shared_layers=0,
        **moe)
    cfg._attn_implementation, cfg._experts_implementation = "sdpa", "grouped_mm"
    rot = hf.Gemma4TextRotaryEmbedding(cfg)
    return cfg, [(i, _frozen(hf.Gemma4TextDecoderLayer(cfg, i), dtype),
                  lambda x, pos, k=k: {"position_embeddings": rot(x, pos, k), "shared_kv_states": {}})
                 for i, k in enumerate(cfg.layer_types)]


def _gemma4_moe(L, dtype):
    """Gemma4's MoE block (26B-A4B's ``enable_moe_block``): the dense MLP, then a router and the top
    4 of 16 experts 128 wide (HF's default grouped_mm) on the same input, beside both layer kinds."""
    return _gemma4(L, dtype, enable_moe_block=True, num_experts=16, top_k_experts=4, moe_intermediate_size=128)


def _qwen3_5(L, dtype):
    import transformers
    from transformers.models.qwen3_5 import modeling_qwen3_5 as hf
    cfg = transformers.Qwen3_5TextConfig(
        hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=64, linear_key_head_dim=32, linear_value_head_dim=32, linear_num_key_heads=4,
        linear_num_value_heads=8, layer_types=["linear_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                         "mrope_section": [2, 3, 3], "mrope_interleaved": True})
    cfg._attn_implementation = "sdpa"
    rot = hf.Qwen3_5TextRotaryEmbedding(cfg)
    return cfg, [(i, _frozen(hf.Qwen3_5DecoderLayer(cfg, i), dtype),
                  lambda x, pos: {"position_embeddings": rot(x, pos[None].expand(3, *pos.shape))})
                 for i in range(2)]


KINDS = {  # case: (top-level model_type, builder, tokens); each builder's blocks are checked one by one
    "qwen3_vl": ("qwen3_vl", _qwen3_vl, 40),  # q/k norms, interleaved M-RoPE
    "gemma4": ("gemma4", _gemma4, 40),  # sliding (head_dim 64, 2 KV heads) and full (128, 1 K=V head) layers
    "gemma4_moe": ("gemma4", _gemma4_moe, 40),  # the same with router and experts beside the dense MLP
    # Gated DeltaNet (block 0) at whole 64-token chunks of its scan; gated full attention (block 1)
    "qwen3_5": ("qwen3_5", _qwen3_5, 128),
}


@pytest.mark.parametrize("case", list(KINDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attribution_term_per_layer_kind(case, dtype):
    """The same per block of the architectures whose blocks differ by layer kind (or whose block
    differs from Llama's in other ways), each block against its own kind's term."""
    model_type, build, L = KINDS[case]
    torch.manual_seed(0)
    cfg, layers = build(L, dtype)
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    for i, layer, extra in layers:
        x = torch.randn(1, L, cfg.hidden_size, dtype=dtype, requires_grad=True)
        pos = torch.arange(L)[None]
        if dtype == torch.bfloat16 and bf16_sdpa_forced_off():
            pytest.skip("torch's bf16 SDPA kernel cannot run at ATEN_CPU_CAPABILITY=default on an AVX-512 CPU; "
                        "this check measures what that kernel saves")
        got = _saved_bytes_per_token(layer, x, attention_mask=None, position_ids=pos, **extra(x, pos))
        want = _predicted_block(model_type, cfg.to_dict(), i, name)
        assert want == pytest.approx(got, rel=0.02), (i, got, want)


def _gemma4_wide_full_layers():
    """The tiny Gemma4 with its full-attention layer's keys and values twice the sliding layers'
    (head_dim 64, one K=V head: 64 per token against 2 × 16), as 26B-A4B's differ (1024 against
    2048); the tiny model's own widths are equal (32 and 2 × 16), which the old term got right."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration
    model, proc = tiny.build_gemma4()
    d = model.config.to_dict()
    d["text_config"].pop("per_layer_config")
    d["text_config"].update(global_head_dim=64, num_global_key_value_heads=1)
    torch.manual_seed(0)
    return Gemma4ForConditionalGeneration(Gemma4Config.from_dict(d)).eval(), proc


@pytest.mark.parametrize("case", ["qwen35", "gemma4_wide"])
def test_patching_term_is_what_the_capture_keeps(case):
    """Resumed patching's kept term per token and row (:func:`analyses.memory_model.lm_states_bytes`)
    equals the bytes of the residual streams and keys/values :func:`interp.resume.capture_lm` keeps:
    every attention block's at its own kind's width, none for Qwen3.5's Gated DeltaNet blocks (the
    old term, (N + 1)·D + 2N·Dkv, priced every block at the config's Dkv: 2560 bytes per token and
    row against the 1536 the tiny Qwen3.5 keeps, 1792 against 2048 on this Gemma4)."""
    import interp
    from interp.resume import capture_lm
    model, proc = _gemma4_wide_full_layers() if case == "gemma4_wide" else tiny.BUILDERS[case]()
    m = interp.load(model, proc)
    x = m.inputs([tiny.image(64, 64), tiny.image(40, 48)], [m.prompt("what is this ?")] * 2)
    _, st = capture_lm(m, x)
    B, L = st.residual[0].shape[:2]
    kept = sum(r.numel() * r.element_size() for r in st.residual)
    kept += sum(t.numel() * t.element_size() for kv in st.kv if kv is not None for t in kv)
    s = estimate.Shapes.from_config(model.config.to_dict())
    assert estimate.lm_states_bytes(s) == kept / (B * L)
    old = ((s.lm_layers + 1) * s.width + 2 * s.lm_layers * s.kv_heads * s.head_dim) * s.bytes
    assert old != kept / (B * L)
    # the patching profile's peak carries it: 2 rows (one item) keep 2·L tokens' worth more or less
    # than with every block priced at the config's width (the rest of the peak is the same here)
    flat = replace(s, layer_kinds=())
    assert estimate.lm_states_bytes(flat) == old
    assert (estimate.activation_peak(s, "patching", 2) - estimate.activation_peak(flat, "patching", 2)
            == 2 * s.seq_len * (kept / (B * L) - old))


def _gemma4_26b_a4b_config():
    """gemma-4-26B-A4B's shapes (its published config.json: 30 LM layers 2816 wide, a full-attention
    layer every 6th with head_dim 512 and 2 K=V heads, sliding ones 256 × 8 heads; 128 experts 704
    wide, top 8, beside a 2112-wide dense MLP; a 27-block 1152-wide vision tower)."""
    from transformers import Gemma4Config, Gemma4TextConfig, Gemma4VisionConfig
    tc = Gemma4TextConfig(hidden_size=2816, intermediate_size=2112, num_hidden_layers=30, num_attention_heads=16,
                          num_key_value_heads=8, head_dim=256, global_head_dim=512, num_global_key_value_heads=2,
                          attention_k_eq_v=True, enable_moe_block=True, num_experts=128, top_k_experts=8,
                          moe_intermediate_size=704, sliding_window=1024, vocab_size=262144,
                          layer_types=(["sliding_attention"] * 5 + ["full_attention"]) * 5,
                          hidden_size_per_layer_input=0, num_kv_shared_layers=0, final_logit_softcapping=30.0)
    vc = Gemma4VisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                            num_key_value_heads=16, head_dim=72, patch_size=16, pooling_kernel_size=3)
    cfg = Gemma4Config(text_config=tc, vision_config=vc, audio_config=None)
    cfg.architectures = ["Gemma4ForConditionalGeneration"]
    return cfg


def test_gemma4_26b_a4b_through_the_memory_model(tmp_path):
    """26B-A4B's config goes through the adapter's facts and ``report --dry-run``: every expert's
    parameters are counted (≈ 25.6 B, 47.6 GiB in bf16; 5.1 GiB when the experts had no term), the
    MoE term is in each block's autograd count, and the patching term keeps 25 sliding layers'
    keys/values at 2 × 8 × 256 and 5 full ones' at 2 × 2 × 512 (not all 30 at the sliding width)."""
    cfg = _gemma4_26b_a4b_config()
    s = estimate.Shapes.from_config(cfg.to_dict(), "bfloat16")
    assert 47 * 2 ** 30 < s.weights < 48.5 * 2 ** 30
    D, k, Fe, F, E = 2816, 8, 704, 2112, 128
    assert (s.mlp_saved, s.mlp_fp32, s.mlp_fp32_upcast) == (3 * F + 3 * k * Fe + k * D + k, 2 * D + E + 10 * k + 1,
                                                           2 * D)
    assert estimate.lm_states_bytes(s) == (31 * D + 2 * (25 * 8 * 256 + 5 * 2 * 512)) * 2
    cfg.save_pretrained(tmp_path / "a4b")
    values = dry_run_peaks(tmp_path / "a4b", tmp_path / "o")
    assert all(47 < v <= 80 for v in values), values


def test_gemma4_moe_facts_count_hf_parameters_and_refuse_a_partial_config():
    """The MoE block's parameters (dense MLP, router, experts) equal HF's module's; a config with
    ``enable_moe_block`` but no expert count is one error line."""
    import transformers
    from transformers.models.gemma4 import modeling_gemma4 as hf

    from interp.adapters.gemma4 import moe_facts
    from spatialbias.errors import SpatialBiasError
    cfg = transformers.Gemma4TextConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=32, global_head_dim=64, layer_types=["sliding_attention", "full_attention"],
        hidden_size_per_layer_input=0, enable_moe_block=True, num_experts=6, top_k_experts=2, moe_intermediate_size=24)
    layer = hf.Gemma4TextDecoderLayer(cfg, 0)
    mlp = sum(p.numel() for mod in (layer.mlp, layer.router, layer.experts) for p in mod.parameters())
    assert moe_facts(cfg.to_dict())["lm_mlp_params"] == 2 * mlp
    assert moe_facts({**cfg.to_dict(), "enable_moe_block": False}) == {}
    with pytest.raises(SpatialBiasError, match="needs num_experts") as e:
        moe_facts({**cfg.to_dict(), "num_experts": None})
    assert "\n" not in str(e.value)


def test_report_at_llava_7b_shapes_fits_40_gib():
    r = bs.report_prediction(40.0)
    assert 13 * 2 ** 30 < r["weights_bytes"] < 14 * 2 ** 30  # 7B parameters in bf16
    for a, v in r["analyses"].items():
        assert all(st["rows"] >= estimate.MIN_ROWS.get(k, 1) for k, st in v["steps"].items()), a
        assert v["peak_under_budget"] <= 40 * 2 ** 30, (a, v)
    assert r["analyses"]["attribution"]["peak_at_64_rows"] > 40 * 2 ** 30  # the budget is what makes it fit


def test_sharding_section_on_the_tiny_models(tmp_path):
    got = bs.sharding(tmp_path)
    assert set(got) == set(tiny.BUILDERS)  # every tiny architecture
    for name, v in got.items():
        assert v["equal"] and set(v["weights"]) == {"cpu", "disk"}, (name, v)
    md = bs.markdown({"sharding": got})
    assert md.count("| True |") == len(tiny.BUILDERS)


@pytest.mark.parametrize("only", ["foo", "memory,foo", ","])
def test_bench_only_refuses_unknown_sections_with_one_line(only, tmp_path):
    from typer.testing import CliRunner

    from analyses.cli import app
    r = CliRunner().invoke(app, ["bench", "--only", only, "--out", str(tmp_path / "b")])
    assert r.exit_code == 2 and r.output.strip().startswith("error: --only"), r.output
    assert len(r.output.strip().splitlines()) == 1 and "memory, speed, sharding, screen" in r.output
    assert not (tmp_path / "b").exists()  # nothing written


def _block_saved(layer, cfg, i: int, x, per_layer_input, dtype, L: int) -> float:
    """Bytes per token autograd keeps for decoder layer ``layer`` (index ``i``, frozen parameters) on
    ``x`` and its ``per_layer_input``, with its rotary pair and a shared-KV store holding random keys
    and values of its layer type (its attention's heads and head size); neither the rotary pair nor,
    for a layer that reuses keys and values, the store's (another layer's) count as the block's."""
    from transformers.cache_utils import KVSharingDict
    t, a = cfg.layer_types[i], layer.self_attn
    if cfg.model_type == "gemma3n_text":
        from transformers.models.gemma3n import modeling_gemma3n as hf
        rot = hf.Gemma3nRotaryEmbedding(cfg)
    else:
        from transformers.models.gemma4 import modeling_gemma4 as hf
        rot = hf.Gemma4TextRotaryEmbedding(cfg)
    pos = torch.arange(L)[None]
    pe = rot(x, pos, t)
    kv = (1, cfg.num_attention_heads // a.num_key_value_groups, L, a.head_dim)
    store = KVSharingDict({t: (torch.randn(kv, dtype=dtype), torch.randn(kv, dtype=dtype))})
    seen = {}

    def pack(u):
        seen[u.untyped_storage().data_ptr()] = u.untyped_storage().nbytes()
        return u
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda u: u):
        layer(x, per_layer_input=per_layer_input, shared_kv_states=store, position_embeddings=pe, attention_mask=None,
              position_ids=pos)
    skip = {p.untyped_storage().data_ptr() for p in layer.parameters()} | {u.untyped_storage().data_ptr() for u in pe}
    skip |= {u.untyped_storage().data_ptr() for u in store[t]} if cfg.kv_sharing_modes[i] == "reuse" else set()
    return sum(v for k, v in seen.items() if k not in skip) / L


def _gemma3n_block_saved(dtype, i: int, S: int, D: int, P: int, L: int = 40) -> float:
    """Bytes per token autograd keeps for Gemma3n decoder layer ``i`` on a (S, 1, L, D) input and its
    per-layer input (:func:`_block_saved`)."""
    import transformers
    from transformers.models.gemma3n import modeling_gemma3n as hf
    c = transformers.Gemma3nTextConfig(
        hidden_size=D, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=64, hidden_size_per_layer_input=P, laurel_rank=16, altup_num_inputs=S, num_kv_shared_layers=2,
        layer_types=["sliding_attention", "full_attention"] * 2, activation_sparsity_pattern=[0.0] * 4,
        vocab_size=300, vocab_size_per_layer_input=256, sliding_window=512)
    c._attn_implementation = "sdpa"
    layer = _frozen(hf.Gemma3nTextDecoderLayer(c, i), dtype)
    x = torch.randn(S, 1, L, D, dtype=dtype, requires_grad=True)
    return _block_saved(layer, c, i, x, torch.randn(1, L, P, dtype=dtype), dtype, L), c.to_dict()


@pytest.mark.parametrize("shape", [(4, 256, 64), (2, 128, 32)], ids=["S4", "S2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attribution_term_of_gemma3n_blocks(shape, dtype):
    """Gemma3n's blocks (AltUp streams, LAuReL, per-layer gate; a layer with its own keys and values
    and one reusing another's) against the term its adapter declares, within 2 % (fp32: 0.995–1.016,
    bf16: 0.983–0.985 measured at these shapes when written)."""
    if dtype == torch.bfloat16 and bf16_sdpa_forced_off():
        pytest.skip("torch's bf16 SDPA kernel cannot run at ATEN_CPU_CAPABILITY=default on an AVX-512 CPU")
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    for i in (0, 2):  # layer 0 stores its keys and values, layer 2 reuses layer 0's
        got, t = _gemma3n_block_saved(dtype, i, *shape)

        def upto(n, t=t):
            cfg = {"architectures": ["Gemma3nForConditionalGeneration"], "model_type": "gemma3n",
                   "text_config": {**t, "num_hidden_layers": n, "num_kv_shared_layers": max(0, n - 2)}}
            return estimate.lm_blocks_saved(estimate.Shapes.from_config(cfg, name), sites=False)
        assert upto(i + 1) - upto(i) == pytest.approx(got, rel=0.02), (i, got)


def _gemma4_small_config():
    """A Gemma4 text config as the small checkpoints: per-layer embeddings (P = 64), the last 2 of 4
    layers reusing keys and values, double-wide MLPs on them; full layers at their own head size."""
    import transformers
    c = transformers.Gemma4TextConfig(
        hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=64, global_head_dim=128, num_global_key_value_heads=1, attention_k_eq_v=True,
        layer_types=["sliding_attention", "full_attention"] * 2, hidden_size_per_layer_input=64, num_kv_shared_layers=2,
        use_double_wide_mlp=True, vocab_size=300, vocab_size_per_layer_input=256)
    c._attn_implementation = "sdpa"
    return c


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attribution_term_of_gemma4_small_blocks(dtype):
    """Gemma4's small-checkpoint blocks (per-layer gate; sliding and full layers with their own keys
    and values, then the same reusing them with double-wide MLPs) against the term the adapter
    declares, within 2 % (0.995–1.016 fp32, 0.983–0.990 bf16 when written)."""
    from transformers.models.gemma4 import modeling_gemma4 as hf
    if dtype == torch.bfloat16 and bf16_sdpa_forced_off():
        pytest.skip("torch's bf16 SDPA kernel cannot run at ATEN_CPU_CAPABILITY=default on an AVX-512 CPU")
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    c, L = _gemma4_small_config(), 40
    t = c.to_dict()
    for i in range(4):
        layer = _frozen(hf.Gemma4TextDecoderLayer(c, i), dtype)
        x = torch.randn(1, L, 256, dtype=dtype, requires_grad=True)
        got = _block_saved(layer, c, i, x, torch.randn(1, L, 64, dtype=dtype), dtype, L)

        def upto(n):
            cfg = {"architectures": ["Gemma4ForConditionalGeneration"], "model_type": "gemma4",
                   "text_config": {**t, "num_hidden_layers": n, "num_kv_shared_layers": max(0, n - 2)}}
            return estimate.lm_blocks_saved(estimate.Shapes.from_config(cfg, name), sites=False)
        assert upto(i + 1) - upto(i) == pytest.approx(got, rel=0.02), (i, got)


def test_gemma4_small_parameters_and_kept_states():
    """At E2B-like shapes (35 layers 1536 wide, per-layer inputs 256 over a 262144-row table, 20
    KV-sharing layers with double-wide MLPs: assumed values, not the hub's file) the parameter count
    is within 1 % of HF's text model built on the meta device; on the tiny ``gemma4_small`` the
    patching term equals the bytes ``capture_lm`` keeps (a reusing layer's keys and values are its
    source's tensors: counted once)."""
    import transformers
    from transformers.models.gemma4 import modeling_gemma4 as hf

    import interp
    from interp.resume import capture_lm
    tc = transformers.Gemma4TextConfig(
        hidden_size=1536, intermediate_size=6144, num_hidden_layers=35, num_attention_heads=8, num_key_value_heads=1,
        head_dim=256, global_head_dim=512, num_global_key_value_heads=1, attention_k_eq_v=False,
        layer_types=(["sliding_attention"] * 4 + ["full_attention"]) * 7, hidden_size_per_layer_input=256,
        vocab_size_per_layer_input=262144, vocab_size=262144, num_kv_shared_layers=20, use_double_wide_mlp=True,
        tie_word_embeddings=True)
    with torch.device("meta"):
        real = sum(p.numel() for p in hf.Gemma4TextModel(tc).parameters())
    cfg = {"architectures": ["Gemma4ForConditionalGeneration"], "model_type": "gemma4", "text_config": tc.to_dict(),
           "vision_config": {"hidden_size": 768}, "tie_word_embeddings": True}
    assert estimate.Shapes.from_config(cfg).param_count(cfg) == pytest.approx(real, rel=0.01)
    model, proc = tiny.BUILDERS["gemma4_small"]()
    m = interp.load(model, proc)
    x = m.inputs([tiny.image(64, 64), tiny.image(40, 48)], [m.prompt("what is this ?")] * 2)
    _, st = capture_lm(m, x)
    B, L = st.residual[0].shape[:2]
    seen, kept = set(), 0
    for t in [*st.residual, *[u for kv in st.kv if kv for u in kv]]:
        if id(t) not in seen:
            seen.add(id(t))
            kept += t.numel() * t.element_size()
    assert estimate.lm_states_bytes(estimate.Shapes.from_config(model.config.to_dict())) == kept / (B * L)
