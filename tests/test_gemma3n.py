"""Gemma3n's decisions (interp/adapters/gemma3n.py), each pinned on the tiny Gemma3n (HF's own
model with a stand-in for timm's vision tower: interp/tiny/gemma3n.py). The parity suite
(every ``tiny.BUILDERS`` test) runs it too; these are the checks particular to its structure:

* the block state is HF's (4, B, T, D), seen as (B, T, 4·D), and read out as the text model does;
* ``lm.input`` is the text model's ``inputs_embeds``: an edit there reaches every per-layer input,
  while an edit of block 0's input (where ``lm.input`` is on other architectures) reaches none;
* a residual patch carries the per-layer inputs of the blocks still to come (a full patch gives
  the source run; without the carry it would not);
* a resumed run hands a reusing layer the keys and values of its source layer: this run's for
  rows that ran it, the recorded run's for rows that joined later.
"""
import pytest
import torch

import interp
from interp import patching, tiny
from interp.dispatch import forward
from interp.resume import capture_lm, resume

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


def per_layer_inputs(m, x, edits=None):
    """Every block's per-layer input (B, L, P) in a run with ``edits``, and its logits."""
    sites = [f"lm.blocks.{j}#per_layer_input" for j in range(N_LAYERS)]
    t = forward(m, x, edits=edits or {}, cache=sites)
    return [t.cache[s] for s in sites], t.logits


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


def test_lm_input_edit_reaches_every_per_layer_input(g3n):
    """Adding to the image tokens at ``lm.input`` changes every block's per-layer input there (the
    text model projects them from it); the same addition to every stream of block 0's input changes
    the logits but no per-layer input — which is why ``lm.input`` is the text model's input here."""
    m, clean, *_ = g3n
    img = m.image_mask(clean["input_ids"])
    base, logits = per_layer_inputs(m, clean)

    def add(x):
        return x + img[..., None].to(x.dtype)
    at_input, l1 = per_layer_inputs(m, clean, {"lm.input": add})
    at_block0, l2 = per_layer_inputs(m, clean, {"lm.blocks.0#input": add})
    for b, x, y in zip(base, at_input, at_block0):
        assert not torch.allclose(b[img], x[img]) and torch.equal(b[~img], x[~img])
        assert torch.equal(b, y)
    assert not torch.allclose(l1, logits) and not torch.allclose(l2, logits)


def test_a_block_patch_carries_per_layer_inputs_and_reused_keys(g3n, monkeypatch):
    """Patching every position of the stream from the source gives the source run exactly: what
    later blocks read of those tokens moves with them — the per-layer inputs of the blocks after the
    patch, and the keys and values made before it that later layers reuse. With either carry
    switched off the patch misses the source (each case is informative: at ``lm.blocks.0`` block
    1's per-layer input reaches layer 2's keys; at ``lm.blocks.1`` layer 3 reuses layer 1's keys)."""
    m, clean, corrupt, correct, cands = g3n
    assert m.adapter.kv_sources(m.model) == {3: 1, 4: 2}
    ps = [patching.Patch("lm.blocks.0", "all"), patching.Patch("lm.blocks.1", "all"),
          patching.Patch("lm.blocks.0#input", "all")]
    run = lambda: patching.run_patches(m, corrupt, clean, ps, correct, cands, [(0, 8)] * 3, resume=False)
    df = run()
    assert (df.metric - df.source_metric).abs().max() < 1e-5, df
    assert (df.base_metric - df.source_metric).abs().min() > 1e-3  # the patch had a gap to close
    import interp.patching.core as core
    gap = lambda d, site: (d[d.site == site].metric - d[d.site == site].source_metric).abs().max()
    with monkeypatch.context() as mp:  # no per-layer inputs carried
        mp.setattr(core, "carried_sites", lambda lvlm, site: [])
        off = run()
    assert gap(off, "lm.blocks.0") > 1e-4 and gap(off, "lm.blocks.0#input") > 1e-4
    with monkeypatch.context() as mp:  # no reused keys and values carried
        mp.setattr(core, "carried_kv", lambda lvlm, site: [])
        off = run()
    assert gap(off, "lm.blocks.1") > 1e-4


def test_resumed_patches_carry_what_the_full_scheme_carries(g3n, monkeypatch):
    """Partial patches (the image tokens) at block outputs, resumed, equal one full forward each;
    the equality is informative: without the resumed scheme's own carry of per-layer inputs, or of
    reused keys and values, it breaks."""
    m, clean, corrupt, correct, cands = g3n
    ps = [patching.Patch(f"lm.blocks.{j}", g) for j in (0, 1, 2) for g in ("image", "target")]
    run = lambda resume: patching.run_patches(m, corrupt, clean, ps, correct, cands, [(0, 8)] * 3, resume=resume)
    full, res = run(False), run(True)
    assert res.attrs["engine"] == "resumed" and (res.metric - full.metric).abs().max() < 1e-5
    import interp.patching.resumed as resumed
    with monkeypatch.context() as mp:
        mp.setattr(resumed, "_carried", lambda st, c, job, k, name, p: st.kwargs[k][name][c + job[2]][p:])
        assert (run(True).metric - full.metric).abs().max() > 1e-4
    with monkeypatch.context() as mp:
        mp.setattr(resumed, "_carried_kv", lambda st, c, job, s: (st.kv[s][0][c + job[2]], st.kv[s][1][c + job[2]]))
        assert (run(True).metric - full.metric).abs().max() > 1e-4


def test_resume_hands_reusing_layers_their_source_keys_and_values(g3n):
    """Layers 3 and 4 reuse layers 1 and 2's keys and values. Resuming from every block (rows that
    ran the source layer and rows that joined after it, in one batch) reproduces the run; a resume
    from block 3 reads layer 1's recorded keys (changing them changes its logits)."""
    m, clean, *_ = g3n
    _, st = capture_lm(m, clean)
    p = 5
    for starts in ([0, 0, 0], [1, 2, 3], [0, 2, 4], [3, 3, 5], [1, 4, 5]):
        h = [st.residual[s][r, p:] for r, s in enumerate(starts)]
        got = resume(m, st, torch.arange(3), torch.tensor(starts), h, p)
        assert torch.allclose(got, st.logits, atol=1e-5), starts
    K, V = st.kv[1]
    st.kv[1] = (K * 2, V.flip(2))  # (a constant added to every key would not change a softmax)
    st.kv[3] = st.kv[1]
    late = resume(m, st, torch.arange(3), torch.tensor([3] * 3), [st.residual[3][r, p:] for r in range(3)], p)
    st.kv[1], st.kv[3] = (K, V), (K, V)
    assert not torch.allclose(late, st.logits, atol=1e-4)


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


def test_memory_estimate_of_an_e4b_config():
    """The memory model reads a Gemma3n config.json (E4B's published shape: HF's defaults) through
    its adapter: 256 soft tokens per image."""
    from transformers import Gemma3nConfig

    from interp import adapters
    cfg = Gemma3nConfig().to_dict()
    cfg["architectures"] = ["Gemma3nForConditionalGeneration"]
    facts = adapters.memory_profile(cfg)
    assert facts.image_tokens == (256, 256) and adapters.for_config(cfg).name == "gemma3n"


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
