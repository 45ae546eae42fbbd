"""Issue 12's silent failures, each reproduced as a test (all failed before the engine redesign).

Every test compares against a reference that does not go through the code under test: a direct
forward, a left-padded twin of the batch, a per-row run, a full no-cache forward."""
import pytest
import torch

import interp
from helpers import mirrored_pair
from interp import patching, tiny
from interp.interventions import Knockout
from spatialbias.errors import SpatialBiasError
from interp.tracing import trace


def _pair(name, n=2, size=64):
    """Two placements of ``n`` items (the second mirrored), prompts equal; answer candidates."""
    model, proc = tiny.BUILDERS[name]()
    m = interp.load(model, proc)
    return (m, *mirrored_pair(m, n, size))


# 1. Qwen2.5-VL's merger output is in vision-window order: cell masks must follow the site's own token order.
@pytest.mark.parametrize("cells", [(1, 7), (2, 4), (0, 8)])
def test_qwen25_projector_cells_equal_lm_input_cells(cells):
    m, clean, corrupt, correct, cands = _pair("qwen25vl")
    ps = [patching.Patch("projector", "target"), patching.Patch("lm.input", "target")]
    df = patching.run_patches(m, corrupt, clean, ps, correct, cands, [cells] * 2)
    a = df[df.site == "projector"].sort_values("item").metric.to_numpy()
    b = df[df.site == "lm.input"].sort_values("item").metric.to_numpy()
    assert abs(a - b).max() < 1e-5, (a, b)


# 3. Two images in a row: the rows' pixel values must follow their rows.
@pytest.mark.parametrize("resume", [None, False], ids=["resumed", "full"])
@pytest.mark.parametrize("arch", ["llava", "qwen3vl"])  # qwen3vl: DeepStack features of both images move too
def test_two_images_per_row_patching_base_metric_is_the_direct_run(arch, resume):
    model, proc = tiny.BUILDERS[arch]()
    m = interp.load(model, proc)
    prompt = m.prompt("what is this ?", n_images=2)
    imgs = [[tiny.image(seed=2 * i), tiny.image(seed=2 * i + 1)] for i in range(3)]
    base = m.inputs(imgs, [prompt] * 3)
    src = m.inputs([[b, a] for a, b in imgs], [prompt] * 3)
    cands = [m.tokenizer.convert_tokens_to_ids(w) for w in ("cat", "dog")]
    correct = torch.tensor([cands[0]] * 3)
    df = patching.run_patches(m, base, src, [patching.Patch("lm.input", "image")], correct, cands, [()] * 3,
                              resume=resume)
    with torch.no_grad():
        direct = patching.logit_diff(m.run(base, last_only=True)[:, -1], correct, cands)
        source = patching.logit_diff(m.run(src, last_only=True)[:, -1], correct, cands)
    got = df.sort_values("item")
    assert torch.allclose(torch.tensor(got.base_metric.to_numpy()), direct.double(), atol=1e-5)
    assert torch.allclose(torch.tensor(got.source_metric.to_numpy()), source.double(), atol=1e-5)
    # patching every image token at the LM input turns the base row into the source row
    assert torch.allclose(torch.tensor(got.metric.to_numpy()), source.double(), atol=1e-4)


# 4. Right padding: every runner reads the answer at each row's last real token.
def test_right_padded_inputs_give_the_left_padded_answers():
    model, proc = tiny.build_llava()
    m = interp.load(model, proc)
    prompts = [m.prompt("what is this ?"), m.prompt("what is this a picture of the dog ?")]
    imgs = [tiny.image(seed=1), tiny.image(seed=2)]
    left = m.inputs(imgs, prompts)
    m.tokenizer.padding_side = "right"
    right = dict(m.processor(images=imgs, text=prompts, return_tensors="pt", padding=True))
    m.tokenizer.padding_side = "left"
    assert right["attention_mask"][0, -1] == 0  # the short row really is right padded
    with torch.no_grad():
        want = m.run(left, last_only=True)[:, -1]
        got = m.run(right, last_only=True)[:, -1]
        assert torch.allclose(got, want, atol=1e-5)
        t = trace(m, right, cache=["lm.blocks.1"])
        assert torch.allclose(t.logits[:, -1], want, atol=1e-5)
        ko = Knockout(cells=(0,), query="text")
        assert torch.allclose(m.run(right, [ko], last_only=True)[:, -1], m.run(left, [ko], last_only=True)[:, -1],
                              atol=1e-5)


# 5. One site means one thing in every runner; repeated calls are addressable; rotary is (cos, sin).
def test_gemma3_rotary_edit_is_the_same_in_run_and_trace_and_calls_are_named():
    model, proc = tiny.build_gemma3()
    m = interp.load(model, proc)
    inputs = m.inputs([tiny.image(seed=1)], [m.prompt("what is this ?")])

    def scale(cs):
        cos, sin = cs
        return cos * 0.5, sin * 0.5

    class Edit(interp.Intervention):
        kind = "test_edit"

        def edits(self, lvlm, batch):
            return {"lm.rotary": scale}

    with torch.no_grad():
        base = m.run(inputs)
        via_run = m.run(inputs, [Edit()])
    via_trace = trace(m, inputs, edits={"lm.rotary": scale}).logits
    assert torch.equal(via_run, via_trace)
    assert (via_run - base).abs().max() > 1e-3
    with pytest.raises(SpatialBiasError, match="lm.rotary@"):
        trace(m, inputs, cache=["lm.rotary"])  # two calls per forward: name one
    names = ["lm.rotary@sliding_attention", "lm.rotary@full_attention", "lm.rotary@0", "lm.rotary@1"]
    t = trace(m, inputs, cache=names)
    cos, sin = t.cache["lm.rotary@full_attention"]
    assert cos.shape == sin.shape and not torch.equal(cos, sin)
    assert not torch.equal(t.cache["lm.rotary@sliding_attention"][0], cos)  # different rope bases
    # HF calls the rotary in set order of the layer types (which varies between processes): the two
    # indexed calls are the two named ones, in some order
    by_index = {tuple(t.cache[n][0].flatten()[:64].tolist()) for n in names[2:]}
    by_name = {tuple(t.cache[n][0].flatten()[:64].tolist()) for n in names[:2]}
    assert by_index == by_name and len(by_name) == 2


# 6. No forward-order cache: a text-only trace first must not break later image traces.
def test_text_only_trace_first_then_image_trace():
    model, proc = tiny.build_llava()
    m = interp.load(model, proc)
    text = {k: v for k, v in m.tokenizer(["what is this ?"], return_tensors="pt").items()}
    trace(m, text, cache=["lm.blocks.0"])
    inputs = m.inputs([tiny.image()], [m.prompt("what is this ?")])
    t = trace(m, inputs, cache=["projector", "lm.blocks.0"])
    assert t.cache["projector"].shape[0] == 1


# 7. Edits act on every decode step, or refuse.
@pytest.mark.parametrize("name", ["llava", "gemma3"])
def test_knockout_acts_on_decoded_tokens(name):
    model, proc = tiny.BUILDERS[name]()
    m = interp.load(model, proc)
    inputs = m.inputs([tiny.image(seed=1)], [m.prompt("what is this ?")])
    ko = Knockout(cells=None, query="text")
    t = trace(m, inputs, interventions=[ko], max_new_tokens=3)
    full = {k: v for k, v in inputs.items()}
    full["input_ids"] = torch.cat([inputs["input_ids"], t.tokens[:, :2]], 1)
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    for k in ("token_type_ids", "mm_token_type_ids"):
        if k in full:
            full[k] = torch.cat([full[k], full[k].new_zeros(1, 2)], 1)
    with torch.no_grad():
        want = m.run(full, [ko])[0, -3:]
    assert torch.allclose(t.logits[0], want, atol=1e-4)


def test_knockout_refuses_attention_it_cannot_edit():
    model, proc = tiny.build_llava()
    m = interp.load(model, proc)
    inputs = m.inputs([tiny.image(seed=1)], [m.prompt("what is this ?")])
    tc = model.config.text_config
    before = tc._attn_implementation
    tc._attn_implementation_internal = "flash_attention_2"
    try:
        with pytest.raises(SpatialBiasError, match="flash_attention_2"):
            m.run(inputs, [Knockout(cells=(0,))])
    finally:
        tc._attn_implementation_internal = before


# 8. A sweep's resume must not reuse results computed under other settings or other weights.
def test_sweep_ids_include_run_settings_and_changed_weights_are_refused(tmp_path):
    from analyses import plan as pl, runner
    org = interp.load("organism")
    tiny.save(org.model, org.processor, tmp_path / "ckpt")
    probe = tmp_path / "probe"
    from probes.build import shapes_probe
    shapes_probe(probe, n_items=1, seed=0, cell_px=16, progress=False)
    text = ('analyses = ["eval"]\n[models]\nm = "ckpt"\n[probes]\np = "probe"\n[interventions]\nbaseline = true\n'
            'bapa = ["reference"]\n')
    (tmp_path / "a.toml").write_text(text)
    (tmp_path / "b.toml").write_text('dtype = "bfloat16"\n' + text)
    (tmp_path / "c.toml").write_text('batch_size = 3\n' + text)
    ids = [{c.id for c in pl.load(tmp_path / f, tmp_path / "out").conditions} for f in ("a.toml", "b.toml", "c.toml")]
    assert not ids[0] & ids[1] and not ids[0] & ids[2]  # dtype and batch size are part of every id
    with pytest.raises(SpatialBiasError, match="dtype"):
        (tmp_path / "d.toml").write_text('dtype = "int8"\n' + text)
        pl.load(tmp_path / "d.toml", tmp_path / "out")
    out = tmp_path / "out"
    res = runner.run(pl.load(tmp_path / "a.toml", out), out, progress=False)
    assert res["ran"] == 2 and not res["failed"]
    fp = set(__import__("pandas").read_parquet(out / "results.parquet").model_fingerprint)
    assert len(fp) == 1 and None not in fp
    # the same folder, other weights under the same path: refused before anything runs
    model = interp.load(tmp_path / "ckpt").model
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1e-3
    tiny.save(model, org.processor, tmp_path / "ckpt")
    with pytest.raises(SpatialBiasError, match="other weights"):
        runner.run(pl.load(tmp_path / "a.toml", out), out, progress=False)
