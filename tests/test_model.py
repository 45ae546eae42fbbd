"""The wrapper against HF's own forward, and the interventions applied through it."""
import pytest
import torch

import interp
from interp import tiny
from spatialbias.errors import SpatialBiasError
from interp.interventions import agci_inject, bapa_position_ids


@pytest.fixture(scope="module")
def batch(tiny_llava):
    m = tiny_llava
    return m.inputs([tiny.image(seed=0), tiny.image(seed=1)],
                    [m.prompt("describe the image ?"), m.prompt("what is this a picture of ?")])


@pytest.mark.parametrize("which", ["tiny_llava", "organism"])
def test_no_intervention_is_hf_forward_exactly(which, request, batch):
    m = request.getfixturevalue(which)
    inp = batch if which == "tiny_llava" else m.inputs([tiny.image(48, 48)], [m.prompt("what colour is the circle ?")])
    with torch.no_grad():
        assert torch.equal(m.run(inp), m.model(**inp).logits)
        # explicit default position ids reproduce the default logits exactly
        L = inp["input_ids"].shape[1]
        pos = torch.arange(L).expand_as(inp["input_ids"])
        assert torch.equal(m.model(**inp, position_ids=pos).logits, m.model(**inp).logits)


def test_bapa_through_wrapper_equals_manual_position_ids(tiny_llava, batch):
    m = tiny_llava
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pos = bapa_position_ids(ids, ids == m.model.config.image_token_id, mask)
    with torch.no_grad():
        want = m.model(**batch, position_ids=pos).logits
        got = m.run(batch, [interp.BaPA()])
        base = m.run(batch)
    assert torch.equal(got, want)
    assert (got - base).abs().max() > 1e-4  # BaPA changes the output


def test_bapa_left_padding_matches_unpadded_row(tiny_llava):
    m = tiny_llava
    short, long = m.prompt("what is this ?"), m.prompt("what is this a picture of the dog ?")
    img = tiny.image(seed=3)
    padded = m.inputs([img, img], [short, long])
    alone = m.inputs([img], [short])
    assert padded["attention_mask"][0, 0] == 0  # the short row is left padded
    with torch.no_grad():
        a = m.run(padded, [interp.BaPA()], last_only=True)[0, -1]
        b = m.run(alone, [interp.BaPA()], last_only=True)[0, -1]
    assert torch.allclose(a, b, atol=1e-5)


def test_agci_through_wrapper_equals_manual_projector_edit(tiny_llava, batch):
    m = tiny_llava
    proj = m.adapter.module(m.model, "projector")
    h = proj.register_forward_hook(lambda _m, _a, out: agci_inject(out, 0.7))
    try:
        with torch.no_grad():
            want = m.model(**batch).logits
    finally:
        h.remove()
    with torch.no_grad():
        got = m.run(batch, [interp.AGCI(lam=0.7)])
        zero = m.run(batch, [interp.AGCI(lam=0.0)])
        base = m.run(batch)
    assert torch.equal(got, want)
    assert (got - base).abs().max() > 1e-4
    assert torch.equal(zero, base)  # λ = 0 is the identity
    assert not proj._forward_hooks  # hooks are removed after the run


def test_bapa_and_agci_compose(tiny_llava, batch):
    with torch.no_grad():
        both = tiny_llava.run(batch, [interp.BaPA(), interp.AGCI(lam=0.5)])
        one = tiny_llava.run(batch, [interp.BaPA()])
    assert (both - one).abs().max() > 1e-5


def test_prompt_without_image_token_is_one_clear_error(tiny_llava):
    with pytest.raises(SpatialBiasError, match="has 0 image token"):
        tiny_llava.inputs([tiny.image()], ["describe the image ?"])
    bad = dict(tiny_llava.inputs([tiny.image()], [tiny_llava.prompt("what is this ?")]))
    bad["input_ids"] = bad["input_ids"].masked_fill(bad["input_ids"] == tiny_llava.image_token_id, 5)
    with pytest.raises(SpatialBiasError, match="no image token"):
        tiny_llava.run(bad)


@pytest.mark.parametrize("site", ["vision.embed", "vision.blocks.0", "projector", "lm.embed",
                                  "lm.blocks.0", "lm.blocks.1", "lm.blocks.0.attn", "lm.blocks.1.mlp",
                                  "lm.final_norm", "unembed"])
def test_every_edit_site_fires_and_changes_output(tiny_llava, batch, site):
    m = tiny_llava
    fired = []

    class Scale(interp.Intervention):
        kind = "test_scale"

        def edits(self, lvlm, inputs):
            return {site: lambda x: fired.append(tuple(x.shape)) or x * 1.5}

    with torch.no_grad():
        base = m.run(batch)
        got = m.run(batch, [Scale()])
    assert fired, f"{site} never fired"
    assert (got - base).abs().max() > 1e-5, f"writing to {site} did not change the logits"


def test_vision_blocks_after_the_feature_layer_are_dead(tiny_llava, batch):
    # LLaVA reads image features at vision_feature_layer (-2 here, as in LLaVA-1.5): the last
    # CLIP block runs but cannot influence the answer. The edit fires and changes nothing.
    m = tiny_llava
    assert m.model.config.vision_feature_layer == -2
    fired = []

    class Scale(interp.Intervention):
        kind = "test_scale"

        def edits(self, lvlm, inputs):
            return {"vision.blocks.1": lambda x: fired.append(1) or x * 1.5}

    with torch.no_grad():
        assert torch.equal(m.run(batch, [Scale()]), m.run(batch))
    assert fired


def test_unknown_site_and_class_errors(tiny_llava):
    with pytest.raises(SpatialBiasError, match="unknown site"):
        tiny_llava.adapter.path("lm.block.0")
    with pytest.raises(SpatialBiasError, match="unsupported model class"):
        interp.load(torch.nn.Linear(2, 2), processor=object())


def test_save_load_round_trip(tmp_path, tiny_llava, batch):
    path = tiny.save(tiny_llava.model, tiny_llava.processor, tmp_path / "ckpt")
    back = interp.load(str(path))
    assert back.source == str(path)
    with torch.no_grad():
        assert torch.equal(back.run(batch), tiny_llava.run(batch))


def test_missing_checkpoint_is_one_clear_error(tmp_path):
    with pytest.raises(SpatialBiasError, match="cannot load model"):
        interp.load(str(tmp_path / "nowhere"))
    with pytest.raises(SpatialBiasError, match="cannot load model"):
        interp.load("no-such-org/no-such-model")
