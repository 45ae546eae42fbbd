"""transformer-lens' TransformerBridge against HF's own forward and the engine, on the tiny random LVLMs.

Per architecture (every ``interp.tiny.BUILDERS`` class whose HF class transformer-lens 4.3 lists as
multimodal: LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE, Qwen3.5,
Gemma3, Gemma4 and its small form with per-layer embeddings and shared keys; fp32, one image + chat prompt), the bridge wraps a second build of the same seeded
model; the reference runs HF eager attention (the bridge forces eager). Checked, all at
``atol=1e-5, rtol=0``:

* against HF: logits; ``blocks.{i}.hook_resid_pre`` == the input of HF decoder layer i (forward
  pre-hook) and ``blocks.{i}.hook_resid_post`` == its output (forward hook); HF
  ``hidden_states[i + 1]`` == ``blocks.{i}.hook_resid_post`` and ``ln_final.hook_out`` ==
  ``hidden_states[-1]`` (HF's last entry has the final norm applied); ``vision_projector.hook_in``
  / ``hook_out`` == the input/output of HF's projector (``multi_modal_projector``; Qwen:
  ``visual.merger``; Gemma4: ``embed_vision``, called with a keyword).
* between blocks: ``resid_pre[i + 1] - resid_post[i]`` is zero, except after the blocks the
  adapter declares injections for (Qwen3-VL's DeepStack), where it is zero at the text positions
  and the injected merger's HF output at the image positions. There HF's ``hidden_states[i + 1]``
  is the block's output *before* the addition, so it is not the next block's input.
* against the engine (``interp.tracing.trace`` on the HF reference): logits, ``lm.blocks.{i}`` ==
  ``resid_post``, ``lm.blocks.{i}#input`` == ``resid_pre``, ``projector`` == ``vision_projector.hook_out``;
  and an edit (``x * 0.5 + v`` on block 0's output) through the engine's ``edits`` gives the
  logits of the same edit as a bridge ``fwd_hook`` on ``blocks.0.hook_resid_post`` (its effect is
  asserted to be large, so a dropped or misplaced edit fails; ``* 0.5`` does not commute with
  DeepStack's addition, so editing after it fails too).

Qwen2.5-VL, Qwen3-VL(-MoE) and Qwen3.5 boot with their adapters' torchvision requirement waived
(``interp.bridge.boot``; it is for the processor, which is given). On LLaVA-OneVision the bridge
leaves the SigLIP tower on SDPA (the reference is eager): up to 1.2e-6 apart, SDPA's rounding.
Qwen2-VL and InternVL cannot be cross-checked: transformer-lens 4.3 has no adapter for
``Qwen2VLForConditionalGeneration`` or ``InternVLForConditionalGeneration`` (asserted, so this test
flags when one arrives).
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import interp  # noqa: E402
from interp import bridge, tiny  # noqa: E402
from interp.tracing import trace  # noqa: E402

ATOL = 1e-5
ARCHS = ["llava", "llava_next", "llava_onevision", "qwen25vl", "qwen3vl", "qwen3vl_moe", "qwen35", "gemma3", "gemma4",
         "gemma4_small"]
UNSUPPORTED = ["qwen2vl", "internvl"]


def close(got, want):
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


def first(args, kwargs):
    """A module call's first tensor argument, positional or keyword (Gemma4's ``embed_vision(inputs_embeds=…)``)."""
    return args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))


def edit(x):
    v = torch.randn(x.shape[-1], generator=torch.Generator().manual_seed(0), dtype=x.dtype)
    return x * 0.5 + v.to(x.device)


@pytest.fixture(scope="module", params=ARCHS)
def runs(request):
    """HF (outputs, layer inputs/outputs, projector, injected features), engine trace, bridge logits/cache."""
    name = request.param
    ref, proc = tiny.BUILDERS[name]()
    model, _ = tiny.BUILDERS[name]()
    tb = bridge.boot(model, proc)
    assert tb.original_model is model and model is not ref
    ref.set_attn_implementation("eager")
    m = interp.load(ref, proc)
    inputs = m.inputs([tiny.image(seed=0)], [m.prompt("describe the image ?")])
    n = m.adapter.layer_count(ref, "lm")
    injections = m.adapter.injections(ref)

    r = {"name": name, "n": n, "injections": injections, "image": m.image_mask(inputs["input_ids"]),
         "ins": {}, "outs": {}, "proj": {}, "inj": {}}
    hooks = []
    for i in range(n):
        block = m.adapter.module(ref, f"lm.blocks.{i}")
        hooks.append(block.register_forward_pre_hook(
            lambda mod, a, kw, i=i: r["ins"].__setitem__(i, first(a, kw)), with_kwargs=True))
        hooks.append(block.register_forward_hook(
            lambda mod, a, o, i=i: r["outs"].__setitem__(i, o[0] if isinstance(o, tuple) else o)))
    hooks.append(m.adapter.module(ref, "projector").register_forward_hook(
        lambda mod, a, kw, o: r["proj"].update(inp=first(a, kw), out=o), with_kwargs=True))
    for j, site in injections.items():
        hooks.append(m.adapter.module(ref, site).register_forward_hook(
            lambda mod, a, o, j=j: r["inj"].__setitem__(j, o)))
    with torch.no_grad():
        r["hf"] = ref(**inputs, output_hidden_states=True, use_cache=False)
    for h in hooks:
        h.remove()

    sites = [f"lm.blocks.{i}" for i in range(n)] + [f"lm.blocks.{i}#input" for i in range(n)] + ["projector"]
    r["engine"] = trace(m, inputs, cache=sites)
    r["engine_edited"] = trace(m, inputs, edits={"lm.blocks.0": edit}).logits
    with torch.no_grad():
        extra = {k: v for k, v in inputs.items() if k != "input_ids"}
        r["logits"], r["cache"] = tb.run_with_cache(inputs["input_ids"], **extra)
        r["bridge_edited"] = tb.run_with_hooks(
            inputs["input_ids"], fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: edit(x))], **extra)
    return r


def test_logits_match_hf(runs):
    close(runs["logits"], runs["hf"].logits)


def test_residual_stream_matches_hf_layers(runs):
    cache, n, hs = runs["cache"], runs["n"], runs["hf"].hidden_states
    assert len(hs) == n + 1 and n == cache.model.cfg.n_layers and len(runs["ins"]) == len(runs["outs"]) == n
    for i in range(n):
        close(cache[f"blocks.{i}.hook_resid_pre"], runs["ins"][i])
        close(cache[f"blocks.{i}.hook_resid_post"], runs["outs"][i])
    close(cache["blocks.0.hook_resid_pre"], hs[0])
    for i in range(n - 1):
        close(cache[f"blocks.{i}.hook_resid_post"], hs[i + 1])
    close(cache["ln_final.hook_out"], hs[-1])  # HF's last hidden state is after the final norm


def test_between_blocks_only_declared_injections_are_added(runs):
    cache, image = runs["cache"], runs["image"]
    assert image.any() and set(runs["inj"]) == set(runs["injections"])
    if runs["name"].startswith("qwen3vl"):
        assert runs["injections"], "Qwen3-VL declares its DeepStack additions"
    for i in range(runs["n"] - 1):
        added = cache[f"blocks.{i + 1}.hook_resid_pre"] - cache[f"blocks.{i}.hook_resid_post"]
        close(added[~image], torch.zeros_like(added[~image]))
        want = runs["inj"][i] if i in runs["injections"] else torch.zeros_like(added[image])
        close(added[image], want)
        if i in runs["injections"]:
            assert want.abs().max() > 1e-2  # the addition is real, so the check above has teeth


def test_projector_hooks_match_hf_module(runs):
    close(runs["cache"]["vision_projector.hook_in"], runs["proj"]["inp"])
    close(runs["cache"]["vision_projector.hook_out"], runs["proj"]["out"])


def test_engine_caches_match_bridge(runs):
    cache, engine = runs["cache"], runs["engine"]
    close(engine.logits, runs["logits"])
    for i in range(runs["n"]):
        close(engine.cache[f"lm.blocks.{i}"], cache[f"blocks.{i}.hook_resid_post"])
        close(engine.cache[f"lm.blocks.{i}#input"], cache[f"blocks.{i}.hook_resid_pre"])
    close(engine.cache["projector"], cache["vision_projector.hook_out"])


def test_engine_edit_matches_bridge_hook(runs):
    close(runs["engine_edited"], runs["bridge_edited"])
    assert (runs["bridge_edited"] - runs["logits"]).abs().max() > 1e-2


@pytest.mark.parametrize("name", UNSUPPORTED)
def test_no_bridge_adapter(name):
    model, proc = tiny.BUILDERS[name]()
    with pytest.raises(ValueError, match="Could not determine supported architecture"):
        bridge.boot(model, proc)
