"""Per-layer inputs and KV-sharing layers (interp/adapters/per_layer.py), on both architectures
that have them: Gemma3n and Gemma4's small checkpoints (E2B/E4B; the tiny ``gemma4_small``). Each
tiny model has 5 LM layers, the last 2 reusing the keys and values of layers 1 and 2.

* ``lm.input`` is the text model's ``inputs_embeds``: an edit there reaches every per-layer input,
  while an edit of block 0's input reaches none;
* a patch of the stream carries the per-layer inputs of the blocks still to come and the reused
  keys and values made before it (a full patch gives the source run; without either carry it
  does not), in both patching schemes;
* a resumed run hands a reusing layer the keys and values of its source layer: this run's for
  rows that ran it, the recorded run's for rows that joined later;
* Gemma4's KV-sharing layers see the whole sequence when only the last logits are asked for (HF
  would run them on the last position).
"""
import pytest
import torch

import interp
from interp import patching, tiny
from interp.dispatch import forward
from interp.resume import capture_lm, resume

N_LAYERS = 5
SIDE = {"gemma3n": 48, "gemma4_small": 64}


@pytest.fixture(scope="module", params=list(SIDE))
def arch(request):
    m = interp.load(*tiny.BUILDERS[request.param]())
    assert m.adapter.kv_sources(m.model) == {3: 1, 4: 2} and m.adapter.layer_count(m.model, "lm") == N_LAYERS
    imgs = [tiny.image(SIDE[request.param], SIDE[request.param], seed=s) for s in range(3)]
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


def test_lm_input_edit_reaches_every_per_layer_input(arch):
    """Adding to the image tokens at ``lm.input`` changes every block's per-layer input there (the
    text model projects them from it); the same addition to every stream of block 0's input changes
    the logits but no per-layer input — which is why ``lm.input`` is the text model's input here."""
    m, clean, *_ = arch
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


def test_a_block_patch_carries_per_layer_inputs_and_reused_keys(arch, monkeypatch):
    """Patching every position of the stream from the source gives the source run exactly: what
    later blocks read of those tokens moves with them — the per-layer inputs of the blocks after the
    patch, and the keys and values made before it that later layers reuse. With either carry
    switched off the patch misses the source (each case is informative: at ``lm.blocks.0`` block
    1's per-layer input reaches layer 2's keys; at ``lm.blocks.1`` layer 3 reuses layer 1's keys)."""
    m, clean, corrupt, correct, cands = arch
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


def test_resumed_patches_carry_what_the_full_scheme_carries(arch, monkeypatch):
    """Partial patches (the image tokens) at block outputs, resumed, equal one full forward each;
    the equality is informative: without the resumed scheme's own carry of per-layer inputs, or of
    reused keys and values, it breaks."""
    m, clean, corrupt, correct, cands = arch
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


def test_resume_hands_reusing_layers_their_source_keys_and_values(arch):
    """Layers 3 and 4 reuse layers 1 and 2's keys and values. Resuming from every block (rows that
    ran the source layer and rows that joined after it, in one batch) reproduces the run; a resume
    from block 3 reads layer 1's recorded keys (changing them changes its logits)."""
    m, clean, *_ = arch
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


def test_gemma4_shared_layers_see_the_whole_sequence_under_last_only():
    """HF's Gemma4 runs its KV-sharing layers on the last ``logits_to_keep`` positions when that is
    an integer, so a hook there would see one position; the engine asks for the last logits with a
    tensor index (``Adapter.last_logits``) and every layer sees all L, with the same last logits."""
    m = interp.load(*tiny.BUILDERS["gemma4_small"]())
    x = m.inputs([tiny.image(64, 64)], [m.prompt("what is this ?")])
    L = x["input_ids"].shape[1]
    seen = []
    h = m.adapter.module(m.model, "lm.blocks.4").register_forward_hook(lambda mod, a, o: seen.append(o.shape[1]))
    try:
        with torch.no_grad():
            hf = m.model(**x, logits_to_keep=1).logits
        t = forward(m, x, cache=["lm.blocks.4"], last_only=True)
    finally:
        h.remove()
    assert seen == [1, L] and t.cache["lm.blocks.4"].shape[1] == L
    torch.testing.assert_close(t.logits, hf, atol=1e-5, rtol=0)
