"""transformer-lens' TransformerBridge against HF's own forward, on the tiny random LVLMs.

Per architecture (LLaVA, LLaVA-NeXT, Qwen2.5-VL, Gemma3; fp32, one image + chat prompt), the
bridge wraps a second build of the same seeded model; the reference runs HF eager attention
(the bridge forces eager). Checked, all at ``atol=1e-5, rtol=0``:
logits; ``blocks.{i}.hook_resid_pre`` == HF ``hidden_states[i]`` and ``ln_final.hook_out`` ==
``hidden_states[-1]`` (HF's last entry has the final norm applied, so it is *not*
``blocks.{n-1}.hook_resid_post``); ``blocks.{i}.hook_resid_post`` == the output of HF decoder
layer i (forward hook); ``vision_projector.hook_in``/``hook_out`` == the input/output of HF's
projector (``multi_modal_projector``; Qwen2.5-VL: ``visual.merger``).
Qwen2.5-VL boots with its adapter's torchvision requirement waived (``interp.bridge.boot``; it is
for the processor, which is given). Qwen2-VL cannot be cross-checked: transformer-lens 4.3 has no
adapter for it (asserted, so this test flags when one arrives).
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import interp  # noqa: E402
from interp import bridge, tiny  # noqa: E402

ATOL = 1e-5
ARCHS = ["llava", "llava_next", "qwen25vl", "gemma3"]


def close(got, want):
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


@pytest.fixture(scope="module", params=ARCHS)
def runs(request):
    """(HF eager outputs, HF layer outputs, HF projector (in, out), bridge logits, bridge cache)."""
    name = request.param
    ref, proc = tiny.BUILDERS[name]()
    model, _ = tiny.BUILDERS[name]()
    tb = bridge.boot(model, proc)
    assert tb.original_model is model and model is not ref
    ref.set_attn_implementation("eager")
    m = interp.load(ref, proc)
    inputs = m.inputs([tiny.image(seed=0)], [m.prompt("describe the image ?")])

    layers, proj = [], {}
    n_layers = m.adapter.layer_count(ref, "lm")
    hooks = [m.adapter.module(ref, f"lm.blocks.{i}").register_forward_hook(
        lambda mod, a, o: layers.append(o[0] if isinstance(o, tuple) else o)) for i in range(n_layers)]
    hooks.append(m.adapter.module(ref, "projector").register_forward_hook(
        lambda mod, a, o: proj.update(inp=a[0], out=o)))
    with torch.no_grad():
        out = ref(**inputs, output_hidden_states=True, use_cache=False)
        extra = {k: v for k, v in inputs.items() if k != "input_ids"}
        logits, cache = tb.run_with_cache(inputs["input_ids"], **extra)
    for h in hooks:
        h.remove()
    return out, layers, proj, logits, cache


def test_logits_match_hf(runs):
    out, _, _, logits, _ = runs
    close(logits, out.logits)


def test_residual_stream_matches_hf_hidden_states(runs):
    out, layers, _, _, cache = runs
    hs, n = out.hidden_states, len(layers)
    assert len(hs) == n + 1 and n == cache.model.cfg.n_layers
    for i in range(n):
        close(cache[f"blocks.{i}.hook_resid_pre"], hs[i])
        close(cache[f"blocks.{i}.hook_resid_post"], layers[i])
    for i in range(n - 1):
        close(cache[f"blocks.{i}.hook_resid_post"], hs[i + 1])
    close(cache["ln_final.hook_out"], hs[-1])  # HF's last hidden state is after the final norm


def test_projector_hooks_match_hf_module(runs):
    _, _, proj, _, cache = runs
    close(cache["vision_projector.hook_in"], proj["inp"])
    close(cache["vision_projector.hook_out"], proj["out"])


def test_qwen2vl_has_no_bridge_adapter():
    model, proc = tiny.build_qwen2vl()
    with pytest.raises(ValueError, match="Could not determine supported architecture"):
        bridge.boot(model, proc)
