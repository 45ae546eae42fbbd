"""One engine, checked against implementations it does not share code with, on all five
architectures: nnsight for every site's cache and edit, HF's own forward without a cache for
every decode step, masked attention for pattern writes, fp32 for bf16/fp16 runs."""
import pytest
import torch
from nnsight import NNsight

import interp
from helpers import bf16_sdpa_forced_off
from interp import attention, patching, tiny
from spatialbias.errors import SpatialBiasError
from interp.interventions import Knockout, bapa_position_ids
from interp.interventions.knockout import query_rows
from interp.adapters.base import get_module
from interp.hook_io import _positional_index
from interp.sites import every_site, resolve
from interp.tracing import trace

NAMES = list(tiny.BUILDERS)


@pytest.fixture(scope="module", params=NAMES)
def arch(request):
    model, proc = tiny.BUILDERS[request.param]()
    m = interp.load(model, proc)
    # two rows of different lengths: the short one is left padded, so masks are real tensors
    inputs = m.inputs([tiny.image(64, 64, seed=1), tiny.image(64, 64, seed=2)],
                      [m.prompt("what is this ?"), m.prompt("what is this a picture of ?")])
    return request.param, m, inputs


def _envoy(net, path):
    e = net
    for p in path.split("."):
        e = e[int(p)] if p.lstrip("-").isdigit() else getattr(e, p)
    return e


def _sites(m):
    """Every canonical site (per-head and pattern included), plus the escape hatch and a keyword site."""
    path = m.adapter.path(f"lm.blocks.{m.adapter.attention_layers(m.model)[0]}.attn", m.model)
    return every_site(m.adapter, m.model) + [f"module:{path}.{m.adapter.out_proj(m.model)}",
                                             "lm.blocks.1#position_embeddings", "lm.blocks.-1"]


def _main_key(kw: dict) -> str:
    """A module's main input among its keyword arguments, as the dispatcher takes it: ``hidden_states``,
    else the first (Gemma4's projector is called with ``inputs_embeds=``)."""
    return "hidden_states" if "hidden_states" in kw else next(iter(kw))


def _nnsight_value(net, m, inputs, site):
    """The site's value read by nnsight (its own hooks), or None where nnsight cannot say (a repeated call)."""
    s = resolve(m.adapter, m.model, site)
    if _repeated(m, s):
        return None  # nnsight sees only a module's first call (Gemma3's rotary, Gemma3n's embedder)
    with torch.no_grad(), net.trace(**dict(inputs), use_cache=False):
        env = _envoy(net, s.path)
        if s.hook == "pattern":
            v = env.output[1].save()
        elif s.hook == "output":
            v = (env.output if s.whole or not isinstance(env.output, tuple) else env.output[0]).save()
        elif s.hook == "kwarg":
            args, kw = env.inputs
            v = (kw[s.key] if s.key in kw else args[_positional_index(get_module(m.model, s.path), s.key)]).save()
        else:
            args, kw = env.inputs
            v = (args[0] if args else kw[_main_key(kw)]).save()
    if s.heads:
        v = v.reshape(*v.shape[:-1], s.heads, -1)
    return m.adapter.merge_streams(v) if s.streams > 1 else v


def _repeated(m, s) -> bool:
    """The site names one of several calls of its module per forward (nnsight reads the first)."""
    base = s.canonical.split("@")[0]
    return m.adapter.calls(m.model, base) != [base] or s.call is not None


def _bump_native(m, s, x):
    """:func:`_bump` of the site's view (a multi-stream block state: of its (B, L, S·D) view)."""
    if s.streams > 1:
        return m.adapter.split_streams(_bump(m.adapter.merge_streams(x)), s.streams)
    return _bump(x)


def test_every_site_caches_what_nnsight_sees(arch):
    name, m, inputs = arch
    net = NNsight(m.model)
    checked = 0
    for site in _sites(m):
        s = resolve(m.adapter, m.model, site)
        with attention.eager_attention(m.model) if s.hook == "pattern" else torch.no_grad():
            ref = _nnsight_value(net, m, inputs, site)
        got = trace(m, inputs, cache=[site]).cache[site]
        if ref is None:
            continue
        if isinstance(ref, tuple):
            assert all(torch.equal(a, b) for a, b in zip(got, ref)), (name, site)
        else:
            assert torch.equal(got, ref), (name, site)
        checked += 1
    assert checked >= 15


def _bump(x):
    if isinstance(x, tuple):
        return tuple(t * 1.1 for t in x)
    return x + torch.linspace(0, 0.5, x.shape[-1]).to(x.dtype)


def test_every_site_edit_equals_the_same_edit_in_nnsight(arch):
    name, m, inputs = arch
    net = NNsight(m.model)
    with torch.no_grad():
        base = m.run(inputs)
    for site in _sites(m):
        s = resolve(m.adapter, m.model, site)
        if s.hook == "pattern" or _repeated(m, s):
            continue  # pattern writes and repeated calls: checked below against other references
        ours = trace(m, inputs, edits={site: _bump}).logits
        with torch.no_grad(), net.trace(**dict(inputs), use_cache=False):
            env = _envoy(net, s.path)
            if s.hook == "output":
                out = env.output
                if s.whole or not isinstance(out, tuple):
                    env.output = _bump(out) if s.whole else _bump_native(m, s, out)
                else:  # what follows from the first element is the adapter's (a MoE router's choice)
                    env.output = m.adapter.complete_output(m.model, s.path, (_bump(out[0]),) + tuple(out[1:]))
            elif s.hook == "kwarg":
                args, kw = env.inputs
                if s.key in kw:
                    env.inputs = (args, {**kw, s.key: _bump(kw[s.key])})
                else:  # passed by position (Gemma3n's blocks)
                    i = _positional_index(get_module(m.model, s.path), s.key)
                    env.inputs = (tuple(args[:i]) + (_bump(args[i]),) + tuple(args[i + 1:]), kw)
            else:
                args, kw = env.inputs
                x = args[0] if args else kw[_main_key(kw)]
                if s.heads:  # the same edit on the (…, H, head_dim) view
                    x = _bump(x.reshape(*x.shape[:-1], s.heads, -1)).reshape(x.shape)
                else:
                    x = _bump_native(m, s, x)
                env.inputs = ((x,) + tuple(args[1:]), kw) if args else (args, {**kw, _main_key(kw): x})
            ref = net.output.logits.save()
        assert torch.equal(ours, ref), (name, site)
        dead = site.startswith("vision.blocks.") and name in ("llava", "llava_next") and site.endswith(".1")
        if not dead:  # LLaVA reads block −2: the last CLIP block is dead
            assert (ours - base).abs().max() > 1e-6, (name, site)


def test_pattern_write_equals_a_masked_softmax(arch):
    """Zeroing the text rows' attention to image tokens and renormalising, written at the pattern
    sites, equals masking those keys before the softmax (Knockout) — two different mechanisms."""
    name, m, inputs = arch
    n = m.adapter.layer_count(m.model, "lm")
    q = query_rows(m, inputs, "text")
    keys = m.image_map(inputs).is_image

    def renorm(w):
        drop = (q[:, None, :, None] & keys[:, None, None, :])[..., -w.shape[-2]:, -w.shape[-1]:]
        w = w.masked_fill(drop, 0)
        return w / w.sum(-1, keepdim=True)

    att = m.adapter.attention_layers(m.model)  # range(n), or a hybrid LM's attention layers
    edits = {f"lm.blocks.{i}.attn.pattern": renorm for i in att}
    got = trace(m, inputs, edits=edits).logits[:, -1]
    with torch.no_grad(), attention.eager_attention(m.model):
        want = m.run(inputs, [Knockout(cells=None, query="text")])[:, -1]
        plain = m.run(inputs)[:, -1]
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert (want - plain).abs().max() > 1e-3
    same = trace(m, inputs, edits={f"lm.blocks.{i}.attn.pattern": lambda w: w.clone() for i in att})
    assert torch.allclose(same.logits[:, -1], plain, atol=1e-6)  # a rewrite that changes nothing


def test_projector_cells_equal_lm_input_cells_for_all_36_pairs(arch):
    """Patching a pair of cells at the projector equals patching them at the LM input: the cell
    masks follow each site's own token order."""
    name, m, inputs = arch
    img = tiny.image(64, 64, seed=4)
    one = m.inputs([img], [m.prompt("what is this ?")])
    other = m.inputs([img.transpose(0).transpose(1)], [m.prompt("what is this ?")])
    pairs = [(a, b) for a in range(9) for b in range(a + 1, 9)]
    base, src = m.rows(one, [0] * len(pairs)), m.rows(other, [0] * len(pairs))
    cands = [m.tokenizer.convert_tokens_to_ids(w) for w in ("cat", "dog", "red")]
    correct = torch.tensor([cands[0]] * len(pairs))
    ps = [patching.Patch("projector", "target"), patching.Patch("lm.input", "target")]
    df = patching.run_patches(m, base, src, ps, correct, cands, pairs, batch_size=48)
    a = df[df.site == "projector"].sort_values("item").metric.to_numpy()
    b = df[df.site == "lm.input"].sort_values("item").metric.to_numpy()
    assert abs(a - b).max() < 1e-5, (name, abs(a - b).max())
    assert abs(a - df.sort_values("item").base_metric.to_numpy()[::2]).max() > 1e-4  # the patches do something


# ------------------------------------------------------------------------------------------------
# generation: every decode step's logits against a no-cache forward of the whole sequence


def _extended(m, inputs, tokens, k):
    """The prompt with the first k generated tokens appended (no cache)."""
    full = {key: v for key, v in inputs.items()}
    full["input_ids"] = torch.cat([inputs["input_ids"], tokens[:, :k]], 1)
    full["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(tokens[:, :k])], 1)
    full.update(m.adapter.extend_inputs_for_decode(inputs, k))
    return full


def _reference_ids(m, inputs, full, bapa: bool, frozen: bool = False):
    """Position ids of the whole sequence, computed independently of the runner: HF's generation
    ids (padding-aware cumsum; Qwen's get_rope_index) or BaPA's from the extended mask."""
    if bapa:
        pos = bapa_position_ids(full["input_ids"], full["input_ids"] == m.image_token_id, full["attention_mask"])
        if m.adapter.rope == "mrope":
            pos = pos.unsqueeze(0).repeat(3, 1, 1)
    else:
        pos = m.adapter.generation_position_ids(m.model, full)
    if frozen:  # the mutation: every decoded token at the last prompt position + 1
        L = inputs["input_ids"].shape[1]
        pos = pos.clone()
        pos[..., L:] = pos[..., L:L + 1]
    return pos


@pytest.mark.parametrize("bapa", [False, True], ids=["baseline", "bapa"])
def test_generate_matches_a_full_forward_at_every_step(arch, bapa):
    name, m, inputs = arch
    n = 4
    ivs = [interp.BaPA()] if bapa else []
    t = trace(m, inputs, interventions=ivs, max_new_tokens=n)
    assert t.logits.shape[:2] == (2, n) and torch.equal(t.tokens, t.logits.argmax(-1))
    worst, mutated = 0.0, []
    for k in range(n):
        full = _extended(m, inputs, t.tokens, k)
        with torch.no_grad():
            want = m.model(**full, position_ids=_reference_ids(m, inputs, full, bapa)).logits[:, -1]
            if k >= 2:  # the mutations only show once a later step depends on the positions
                frozen = m.model(**full, position_ids=_reference_ids(m, inputs, full, bapa, frozen=True)).logits[:, -1]
                mutated.append(float((t.logits[:, k] - frozen).abs().max()))
                if bapa:  # "BaPA dropped after the prefill": decode ids continue the plain sequence
                    plain = _reference_ids(m, inputs, full, False)
                    ids = _reference_ids(m, inputs, full, True).clone()
                    L = inputs["input_ids"].shape[1]
                    ids[..., L:] = plain[..., L:]
                    dropped = m.model(**full, position_ids=ids).logits[:, -1]
                    mutated.append(float((t.logits[:, k] - dropped).abs().max()))
        worst = max(worst, float((t.logits[:, k] - want).abs().max()))
    assert worst < 1e-4, (name, worst)
    assert min(mutated) > 100 * max(worst, 1e-6), (name, mutated)  # this test would catch those mutations


def test_generate_refuses_an_intervention_without_decode_semantics():
    model, proc = tiny.build_llava()
    m = interp.load(model, proc)
    inputs = m.inputs([tiny.image()], [m.prompt("what is this ?")])

    class PrefillOnly(interp.Intervention):
        kind = "prefill_only"

        def edits(self, lvlm, batch):
            return {"lm.blocks.0": lambda x: x * 1.01}

    with pytest.raises(SpatialBiasError, match="decode steps"):
        m.generate(inputs, [PrefillOnly()], max_new_tokens=2)
    m.generate(inputs, [PrefillOnly()], max_new_tokens=1)  # a single token needs no decode step


def test_caching_during_generation_gives_one_value_per_forward(arch):
    name, m, inputs = arch
    t = trace(m, inputs, cache=["lm.blocks.0", "lm.final_norm"], max_new_tokens=3)
    L = inputs["input_ids"].shape[1]
    assert [v.shape[1] for v in t.cache["lm.blocks.0"]] == [L, 1, 1]
    # the second decode step's residual equals a no-cache forward's at that position (same position ids)
    full = _extended(m, inputs, t.tokens, 2)
    want = trace(m, {**full, "position_ids": _reference_ids(m, inputs, full, False)},
                 cache=["lm.blocks.0"]).cache["lm.blocks.0"]
    assert want.shape[1] == L + 2
    assert torch.allclose(t.cache["lm.blocks.0"][2][:, 0], want[:, -1], atol=1e-4)


# ------------------------------------------------------------------------------------------------
# low precision: bf16 and fp16 on CPU, against fp32


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 0.03), (torch.float16, 0.004)], ids=["bf16", "fp16"])
def test_low_precision_runs_agree_with_fp32(dtype, tol):
    """Stated tolerances (max |Δ| of last-position logits, tiny models): bf16 0.03, fp16 0.004, for
    the plain run, BaPA's and AGCI's effects (intervened − plain) and a patching metric — or twice
    HF's own precision loss on the same inputs (its plain forward in ``dtype`` against fp32) where
    a model loses more by itself (the tiny Gemma4: 0.025 in bf16), so the engine adds none of its own;
    an effect, the difference of two runs that each lose that much, gets twice that (the tiny
    ``gemma4_small`` in fp16 under ``ATEN_CPU_CAPABILITY=default``: BaPA's effect 0.0101 off against
    HF's own 0.0045 per run).

    With ``ATEN_CPU_CAPABILITY=default`` on a CPU that has AVX-512, torch 2.13's bf16 SDPA kernel
    for CPU fails inside torch ("pack_vnni2 is only supported when avx512 is supported": its
    runtime check reads the CPU, its kernel was built for the forced level), for HF's forward as
    for ours; there both sides run SDPA's math backend, which the comparison does not depend on."""
    with _sdpa_that_runs_here(dtype):
        _low_precision_runs_agree(dtype, tol)


def _sdpa_that_runs_here(dtype):
    """SDPA's math backend where torch's own bf16 CPU kernel cannot run (see above), else nothing."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.MATH]) if dtype == torch.bfloat16 and bf16_sdpa_forced_off() else contextlib.nullcontext()


def _low_precision_runs_agree(dtype, tol):
    for name in NAMES:
        runs, own = {}, {}
        for dt in (torch.float32, dtype):
            model, proc = tiny.BUILDERS[name]()
            m = interp.load(model.to(dt), proc)
            x = m.inputs([tiny.image(64, 64, seed=1), tiny.image(64, 64, seed=2)], [m.prompt("what is this ?")] * 2)
            with torch.no_grad():
                own[dt] = m.model(**x).logits[:, -1].float()
                plain = m.run(x, last_only=True)[:, -1].float()
                bapa = m.run(x, [interp.BaPA()], last_only=True)[:, -1].float() - plain
                agci = m.run(x, [interp.AGCI(lam=0.5)], last_only=True)[:, -1].float() - plain
            cands = [m.tokenizer.convert_tokens_to_ids(w) for w in ("cat", "dog")]
            df = patching.run_patches(m, m.rows(x, [0]), m.rows(x, [1]), [patching.Patch("lm.input", "image")],
                                      torch.tensor([cands[0]]), cands, [()])
            runs[dt] = (plain, bapa, agci, torch.tensor(df.metric.to_numpy()))
            assert all(torch.isfinite(v).all() for v in runs[dt]), (name, dt)
        loss = float((own[torch.float32] - own[dtype]).abs().max())
        for a, b, what in zip(runs[torch.float32], runs[dtype], ("plain", "bapa", "agci", "patching")):
            # an effect is the difference of two runs, each with HF's own loss: twice it, doubled as margin
            limit = max(tol, (2 if what in ("plain", "patching") else 4) * loss)
            assert (a - b).abs().max() < limit, (name, dtype, what, float((a - b).abs().max()), limit)


@pytest.mark.parametrize("name", ["qwen2vl", "qwen25vl", "gemma3", "llava_onevision"])
def test_vision_token_order_is_each_sites_own(name):
    """Qwen2.5-VL permutes its patches into vision windows between ``vision.embed`` and the first
    block: read in image raster order, the block's input equals the embedding output; and each
    merged token of the projector covers the 2×2 patches of the merger's input group."""
    model, proc = tiny.BUILDERS[name]()
    m = interp.load(model, proc)
    x = m.inputs([tiny.image(64, 64, seed=1), tiny.image(80, 64, seed=2)], [m.prompt("what is this ?")] * 2)
    t = trace(m, x, cache=["vision.embed", "vision.blocks.0#input"], positions="image")
    assert torch.equal(t.cache["vision.embed"], t.cache["vision.blocks.0#input"])
    raw = trace(m, x, cache=["vision.embed", "vision.blocks.0#input"])
    if name == "qwen25vl":  # the window order really differs from the processor's
        assert not torch.equal(raw.cache["vision.embed"], raw.cache["vision.blocks.0#input"])
    if name.startswith("qwen"):
        vo, pr = m.token_map(x, "vision.out"), m.token_map(x, "projector")
        assert torch.equal(vo.row.view(-1, 4)[:, 0] // 2, pr.row) and torch.equal(vo.col.view(-1, 4)[:, 0] // 2, pr.col)
        assert torch.equal(vo.batch_row.view(-1, 4)[:, 0], pr.batch_row)


def test_bf16_runs_on_a_cpu_without_avx512():
    """torch's CPU flash attention refuses bf16 sequences of 64+ tokens without AVX-512; the engine
    runs them on the math kernel there (checked in a process pinned to ATen's DEFAULT and AVX2
    capabilities, whatever this CPU has). Without the guard the forward raises pack_vnni2."""
    import subprocess
    import sys
    code = ("import torch, interp; from interp import tiny\n"
            "model, proc = tiny.BUILDERS['llava_next']()\n"
            "m = interp.load(model.to(torch.bfloat16), proc)\n"
            "x = m.inputs([tiny.image(64, 64, seed=1)] * 2, [m.prompt('what is this ?')] * 2)\n"
            "assert x['input_ids'].shape[1] >= 64, x['input_ids'].shape\n"
            "with torch.no_grad():\n"
            "    a = m.run(x, last_only=True)\n"
            "    b = m.run(x, [interp.BaPA()], last_only=True)\n"
            "print(torch.backends.cpu.get_cpu_capability(), bool(a.isfinite().all() and b.isfinite().all()))\n")
    for cap in ("default", "avx2"):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                           env={**__import__("os").environ, "ATEN_CPU_CAPABILITY": cap, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-1500:]
        assert r.stdout.split() == [cap.upper(), "True"], r.stdout
