"""Gemma3n's decisions (interp/adapters/gemma3n.py), each pinned on the tiny Gemma3n (HF's own
model with a stand-in for timm's vision tower: interp/tiny/gemma3n.py). The parity suite
(every ``tiny.BUILDERS`` test) runs it too; these are the checks particular to its structure:

* the block state is HF's (4, B, T, D), seen as (B, T, 4·D), and read out as the text model does;
* its parameters, memory terms and dry run; AGCI as the authors' code; a TransformerBridge cross-check.

Per-layer inputs and shared keys and values, which Gemma4's small checkpoints share with it, are
checked on both in tests/test_per_layer.py.
"""
import pytest
import torch

import interp
from interp import tiny
from interp.dispatch import forward
from interp.resume import capture_lm

N_LAYERS = 5


@pytest.fixture(scope="module")
def g3n():
    m = interp.load(*tiny.BUILDERS["gemma3n"]())
    imgs = [tiny.image(48, 48, seed=s) for s in range(3)]
    qs = [m.prompt("what is this ?"), m.prompt("what is this a picture of ?"), m.prompt("is it ?")]
    clean = m.inputs(imgs, qs)
    corrupt = m.inputs([im.transpose(0).transpose(1) for im in imgs], qs)
    cands = [m.tokenizer.convert_tokens_to_ids(w) for w in ("cat", "dog", "red")]
    return m, clean, corrupt, torch.tensor(cands), cands


def test_block_state_is_hfs_four_streams_side_by_side(g3n):
    """``lm.blocks.{i}`` is HF's (4, B, T, D) block output with stream s at [..., s·D:(s+1)·D], and
    the adapter's readout of the last one gives HF's logits through the final norm and head."""
    m, clean, *_ = g3n
    seen = []
    h = m.adapter.module(m.model, "lm.blocks.1").register_forward_hook(lambda mod, a, out: seen.append(out))
    t = forward(m, clean, cache=["lm.blocks.1", f"lm.blocks.{N_LAYERS - 1}"])
    h.remove()
    native, got = seen[0], t.cache["lm.blocks.1"]
    S, B, L, D = native.shape
    assert S == 4 and got.shape == (B, L, S * D)
    for s in range(S):
        assert torch.equal(got[..., s * D:(s + 1) * D], native[s])
    a = m.adapter
    last = a.readout(m.model, t.cache[f"lm.blocks.{N_LAYERS - 1}"])
    logits = a.module(m.model, "unembed")(a.module(m.model, "lm.final_norm")(last))
    cap = m.model.config.text_config.final_logit_softcapping
    logits = cap * torch.tanh(logits / cap) if cap else logits
    assert torch.allclose(logits, t.logits, atol=1e-5)


def test_projector_names_the_soft_token_call(g3n):
    """``model.embed_vision`` also embeds the vision vocabulary's hard tokens; ``projector`` is its
    soft-token call (n, h·w, D), ``projector@tokens`` the other (B, L, D)."""
    m, clean, *_ = g3n
    t = forward(m, clean, cache=["projector", "projector@tokens", "vision.out"])
    n, side = clean["pixel_values"].shape[0], 6
    D = m.model.config.text_config.hidden_size
    assert t.cache["projector"].shape == (n, side * side, D)
    assert t.cache["projector@tokens"].shape == (*clean["input_ids"].shape, D)
    assert t.cache["vision.out"].shape == (n, side * side, m.model.config.vision_config.hidden_size)


def test_memory_model_counts_e4b_parameters_as_hf_builds_them():
    """The memory model reads a Gemma3n config.json through its adapter (E4B's published shape:
    benchmarks/configs/gemma3n-e4b, HF's defaults): 256 soft tokens per image, and a parameter count
    within 1 % of HF's own modules built on the meta device — text model (its per-layer table alone
    2.35 B), audio encoder, both embedders — plus the timm tower's 300 M, which needs timm to build."""
    import json
    from pathlib import Path

    from transformers import Gemma3nConfig
    from transformers.models.gemma3n import modeling_gemma3n as hf

    from analyses.memory_model import Shapes
    from interp import adapters
    cfg = json.loads((Path(__file__).parents[1] / "benchmarks/configs/gemma3n-e4b/config.json").read_text())
    facts = adapters.memory_profile(cfg)
    assert facts.image_tokens == (256, 256) and adapters.for_config(cfg).name == "gemma3n"
    c = Gemma3nConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "transformers_version")})
    with torch.device("meta"):
        parts = [hf.Gemma3nTextModel(c.text_config), hf.Gemma3nAudioEncoder(c.audio_config),
                 hf.Gemma3nMultimodalEmbedder(c.vision_config, c.text_config),
                 hf.Gemma3nMultimodalEmbedder(c.audio_config, c.text_config)]
    real = sum(p.numel() for m in parts for p in m.parameters()) + 300 * 10 ** 6
    assert Shapes.from_config(cfg).param_count(cfg) == pytest.approx(real, rel=0.01)


def test_patching_term_counts_the_streams_and_no_shared_keys(g3n):
    """What resumed patching's capture keeps per token and row (``lm.input``, 5 block states of
    4·D, keys and values of the 3 layers that make their own) is the memory model's term exactly;
    without the streams (or counting the reusing layers' keys) the term would be off."""
    from analyses.memory_model import Shapes, lm_states_bytes
    m, clean, *_ = g3n
    _, st = capture_lm(m, clean)
    seen, kept = set(), 0
    for t in [*st.residual, *[u for kv in st.kv if kv for u in kv]]:
        if id(t) not in seen:
            seen.add(id(t))
            kept += t.numel() * t.element_size()
    cfg = m.model.config.to_dict()
    cfg["architectures"] = ["Gemma3nForConditionalGeneration"]
    B, L = clean["input_ids"].shape
    assert kept == B * L * lm_states_bytes(Shapes.from_config(cfg))


def test_dry_run_of_e4b_prices_it_and_names_what_a_device_map_needs(tmp_path):
    """``report --dry-run`` on the E4B config folder predicts every analysis' peak; under
    ``--device-map`` (which builds the class to place it, and so needs timm) it says so in one line
    naming the fix instead of timm's traceback."""
    import importlib.util
    from pathlib import Path

    from typer.testing import CliRunner

    from analyses.cli import app
    folder = str(Path(__file__).parents[1] / "benchmarks/configs/gemma3n-e4b")
    r = CliRunner().invoke(app, ["report", "--model", folder, "--out", str(tmp_path / "a"), "--dtype", "bfloat16",
                                 "--dry-run"])
    assert r.exit_code == 0 and "predicted peak" in r.output and "attribution" in r.output, r.output
    if importlib.util.find_spec("timm") is not None:
        return
    r = CliRunner().invoke(app, ["report", "--model", folder, "--out", str(tmp_path / "b"), "--dtype", "bfloat16",
                                 "--device-map", "auto", "--max-memory", "0=8GiB,cpu=40GiB", "--dry-run"])
    lines = [ln for ln in r.output.splitlines() if "timm" in ln]
    assert r.exit_code == 0 and len(lines) == 1 and "pip install timm torchvision" in lines[0], r.output
    assert "Traceback" not in r.output


def test_agci_is_the_authors_formula_on_the_soft_tokens(g3n):
    """AGCI at ``lm.input`` equals the authors' Gemma3n code path (AAAndy-Zhu/AGCI,
    ``Gemma3nModel.adaptive_global_context_broadcast``): per image, v + λ(1 − cos(v, g)) g on the
    embedder's soft tokens before they are scattered — so the per-layer inputs, projected from the
    scattered embeddings, see it too (an edit of block 0's input would miss them)."""
    m, clean, *_ = g3n
    got = m.run(clean, [interp.AGCI(lam=0.8)])

    def authors(mod, args, kwargs, out):
        if kwargs.get("inputs_embeds") is None:  # the embedder's hard-token call
            return None
        g = out.mean(1, keepdim=True)
        w = 1 - torch.nn.functional.cosine_similarity(out, g, dim=-1)
        return out + 0.8 * w[..., None] * g
    h = m.adapter.module(m.model, "projector").register_forward_hook(authors, with_kwargs=True)
    try:
        with torch.no_grad():
            ref = m.model(**clean).logits
    finally:
        h.remove()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert not torch.allclose(got, m.run(clean), atol=1e-4)


def test_transformer_bridge_agrees_on_the_streams_text_only():
    """transformer-lens 4.3's Gemma3n bridge is text-only (its config is not multimodal: it refuses
    ``pixel_values``), so the cross-check runs a text prompt: logits; ``lm.blocks.{i}`` = the
    bridge's ``blocks.{i}.hook_out`` (4, B, T, D) seen as (B, T, 4·D); ``lm.blocks.0#input`` =
    ``blocks.0.hook_in``; and an edit of block 0's output through the engine equals the same edit
    as a bridge hook on ``blocks.0.hook_out`` (each applied to the (B, T, 4·D) view)."""
    import os
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from interp import bridge
    from interp.tracing import trace
    ref, proc = tiny.BUILDERS["gemma3n"]()
    model, _ = tiny.BUILDERS["gemma3n"]()
    tb = bridge.boot(model, proc)
    assert not tb.cfg.is_multimodal
    ref.set_attn_implementation("eager")
    m = interp.load(ref, proc)
    ids = proc.tokenizer(["what is this a picture of ?"], return_tensors="pt")["input_ids"]
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    a = m.adapter
    v = torch.randn(4 * 32, generator=torch.Generator().manual_seed(0))

    def edit(h):
        return h * 0.5 + v
    with torch.no_grad():
        logits, cache = tb.run_with_cache(ids)
        edited = tb.run_with_hooks(ids, fwd_hooks=[("blocks.0.hook_out",
                                                    lambda h, hook: a.split_streams(edit(a.merge_streams(h)), 4))])
    t = trace(m, x, cache=[f"lm.blocks.{i}" for i in range(N_LAYERS)] + ["lm.blocks.0#input"])
    torch.testing.assert_close(t.logits, logits, atol=1e-5, rtol=0)
    for i in range(N_LAYERS):
        torch.testing.assert_close(t.cache[f"lm.blocks.{i}"], a.merge_streams(cache[f"blocks.{i}.hook_out"]),
                                   atol=1e-5, rtol=0)
    torch.testing.assert_close(t.cache["lm.blocks.0#input"], a.merge_streams(cache["blocks.0.hook_in"]), atol=1e-5, rtol=0)
    ours = trace(m, x, edits={"lm.blocks.0": edit}).logits
    torch.testing.assert_close(ours, edited, atol=1e-5, rtol=0)
    assert (ours - logits).abs().max() > 1e-2


def test_a_vision_block_site_is_refused_in_one_line(g3n):
    """The timm tower has no canonical ``vision.blocks.{i}``: asking for one says what to use instead."""
    from interp.tracing import trace
    from spatialbias.errors import SpatialBiasError
    m, clean, *_ = g3n
    with pytest.raises(SpatialBiasError) as e:
        trace(m, clean, cache=["vision.blocks.0"])
    assert str(e.value) == ("unknown site 'vision.blocks.0': gemma3n has no canonical vision blocks; use vision.out, "
                            "projector or a module: path (model.named_modules())")
