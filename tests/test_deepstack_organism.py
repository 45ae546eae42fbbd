"""The deepstack organism (recipe ``deepstack``: planted-lm's recipe on a tiny Qwen3-VL with DeepStack):
its training inputs are the processor's, the shipped seed-0 checkpoint loads with its DeepStack on,
and the planted bias is there (numbers of the shipped run, docs/zoo.md, with tolerances)."""
import numpy as np
import pytest
import torch
from PIL import Image

import interp
from analyses.organisms import build, measure, zoo
from analyses.organisms.arch import ARCHS
from analyses.organisms.recipes import RECIPES
from probes import shapes


def test_training_inputs_equal_the_processor_inputs():
    """Every tensor the trainer feeds the Qwen3-VL organism (input ids, mask, mm_token_type_ids
    (B, 18); pixel_values (B·36, 384); image_grid_thw (B, 3)) is what its processor makes."""
    a = ARCHS[RECIPES["deepstack"].arch]
    assert a.is_qwen and a.deepstack
    words = a.words()
    proc = a.processor(words)
    imgs, shp, _, _ = shapes.Renderer().sample(np.random.default_rng(1), 4)
    texts = [proc.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": build.question("colour", int(s))}]}], add_generation_prompt=True)
        for s in shp]
    enc = proc(images=[Image.fromarray(x) for x in imgs], text=texts, return_tensors="pt", padding=True)
    ours = a.inputs(imgs, shp, words)
    assert set(ours) == set(enc)
    for k in ours:
        assert torch.equal(ours[k], enc[k]), k
    assert ours["pixel_values"].shape == (4 * 36, 384) and ours["input_ids"].shape == (4, 18)


EXPECTED = {"acc": 0.830, "range": 0.250, "z": 5.81, "bapa_range": 0.050}
"""The shipped seed-0 checkpoint on ``measure.measure(n_items=60, seed=999)`` (one thread): baseline
accuracy 0.830, range 0.250 (cells 0–2 at 0.68–0.70, cells 6–8 at 0.92–0.93), χ² p 7e-6, trend
z +5.81; BaPA accuracy 0.880, range 0.050, z +0.05."""


@pytest.fixture(scope="module")
def lvlm():
    path = zoo.shipped("deepstack", 0)
    assert path is not None, "no shipped deepstack seed-0 checkpoint matching the recipe"
    return interp.load(str(path))


def test_shipped_checkpoint_loads_with_deepstack_on(lvlm):
    """interp.load reads it as Qwen3-VL; the adapter declares one DeepStack injection (after LM
    block 0), and the DeepStack merger's output (B·9, 128) moves the answer: zeroing it changes the
    answer logits."""
    assert type(lvlm.model).__name__ == "Qwen3VLForConditionalGeneration"
    assert lvlm.adapter.injections(lvlm.model) == {0: "vision.deepstack.0"}
    assert list(lvlm.model.config.vision_config.deepstack_visual_indexes) == [0]
    items = measure.probe_items(4, 999)  # 36 rows (item-major); rows 0, 10, 20, 30: item k at cell k
    rows = slice(0, 36, 10)
    inputs = lvlm.inputs([Image.fromarray(x) for x in items["images"][rows]],
                         [lvlm.prompt(build.question("colour", int(s))) for s in items["shape"][rows]])
    merger = lvlm.model.model.visual.deepstack_merger_list[0]
    seen = {}

    def zero(_mod, _args, out):
        seen["shape"] = tuple(out.shape)
        return torch.zeros_like(out)
    with torch.no_grad():
        base = lvlm.model(**inputs).logits[:, -1]
        h = merger.register_forward_hook(zero)
        try:
            off = lvlm.model(**inputs).logits[:, -1]
        finally:
            h.remove()
    assert seen["shape"] == (4 * 9, 128)
    assert (base - off).abs().max() > 0.1


def test_planted_bias_is_present_and_bapa_shrinks_it():
    """On a held-out probe (60 items × 9 cells, seed 999): accuracy rises with the cell index (trend
    z) and BaPA (reference variant) shrinks the range. Expected values from the shipped run, with
    tolerances."""
    r = measure.measure(zoo.get("deepstack", 0), n_items=60, seed=999, conditions={
        "baseline": [], "bapa": [interp.BaPA()]})["colour"]
    base, bapa = r["baseline"], r["bapa"]
    assert base["range"] == pytest.approx(EXPECTED["range"], abs=0.08)
    assert base["trend"]["z"] > EXPECTED["z"] - 2.0 and base["chi2_p"] < 1e-3
    assert base["mean_accuracy"] == pytest.approx(EXPECTED["acc"], abs=0.05)
    assert bapa["range"] == pytest.approx(EXPECTED["bapa_range"], abs=0.08) and bapa["range"] < base["range"]
