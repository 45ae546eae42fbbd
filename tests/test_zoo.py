"""The organism zoo: recipes, deterministic training, the cache, LoRA merging, and properties of
the shipped checkpoints (measured through the engine, so they hold on any machine)."""
import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import interp
from analyses.organisms import arch as arch_mod
from analyses.organisms import build, lora, measure, recipes, train, zoo
from analyses.organisms.recipes import RECIPES
from probes import shapes

ROOT = Path(__file__).resolve().parents[1]


def test_recipe_registry_is_consistent():
    assert set(RECIPES) == {"planted-lm", "uniform", "planted-order", "planted-vision", "learned-absolute", "mrope", "where",
                            "recency", "lora", "lora-bapa", "blind", "deepstack", "vision-only"}
    prints = set()
    for name, r in RECIPES.items():
        assert r.name == name and r.arch in arch_mod.ARCHS
        assert "says nothing about pretrained LVLMs" in r.description
        assert "bias" in r.expected
        assert len(r.cell_weights) == 9 and set(r.kinds) <= {"colour", "where"}
        for dep in (r.base, r.vision_from):
            assert dep is None or dep in RECIPES
        prints.add(r.fingerprint())
    assert len(prints) == len(RECIPES)
    assert RECIPES["planted-lm"].cell_weights == recipes.SKEW == tuple(float(k * k) for k in range(1, 10))
    assert RECIPES["planted-vision"].bapa_train and not RECIPES["planted-lm"].bapa_train
    with pytest.raises(ValueError):
        recipes.Recipe("bad", "x", lora=recipes.Lora())


def test_fingerprint_follows_training_fields_only():
    r = RECIPES["uniform"]
    assert r.with_(description="other words").fingerprint() == r.fingerprint()
    assert r.with_(lr=1e-3).fingerprint() != r.fingerprint()


@pytest.mark.parametrize("name", ["planted-lm", "learned-absolute", "mrope", "where", "deepstack"])
def test_training_inputs_equal_the_processor_inputs(name):
    """What the trainer feeds the model is exactly what the checkpoint's processor makes."""
    r = RECIPES[name]
    a = arch_mod.ARCHS[r.arch]
    words = a.words(r.extra_words)
    proc = a.processor(words)
    imgs, shp, _, _ = shapes.Renderer().sample(np.random.default_rng(0), 3)
    for kind in r.kinds:
        texts = [proc.apply_chat_template([{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": build.question(kind, int(s))}]}], add_generation_prompt=True)
            for s in shp]
        enc = proc(images=[Image.fromarray(x) for x in imgs], text=texts, return_tensors="pt", padding=True)
        ours = a.inputs(imgs, shp, words, kind)
        assert set(ours) == set(enc), (set(ours), set(enc))
        for k in ours:
            assert torch.equal(ours[k], enc[k]), k


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", ["planted-vision", "mrope"])
def test_short_training_is_deterministic_for_a_seed(name):
    r = RECIPES[name].with_(max_steps=3, batch=8)
    a, _, ra, _ = train.train(r, seed=5, progress=False)
    b, _, rb, _ = train.train(r, seed=5, progress=False)
    c, _, _, _ = train.train(r, seed=6, progress=False)
    assert _same(a, b) and not _same(a, c)
    assert ra["steps"] == rb["steps"] == 3 and ra["stopped_by"] == "max_steps"
    assert ra["fingerprint"] == r.fingerprint() and ra["cpu_capability"] and ra["threads"] == 1


def test_lora_run_is_deterministic_and_its_adapter_merges_back(tmp_path):
    """LoRA on the shipped planted-lm (seed 0): two identical runs; the saved adapter merged into
    the base (load_merged) gives the run's merged weights; the folder loads with interp.load."""
    r = RECIPES["lora-bapa"].with_(max_steps=2, batch=8)
    m1, proc, rec, peft1 = zoo.train_recipe(r, seed=0, progress=False)
    m2, _, _, _ = zoo.train_recipe(r, seed=0, progress=False)
    assert _same(m1, m2)
    base = zoo.get("planted-lm", 0)
    assert not _same(m1, interp.load(str(base)).model)  # the adapter changed the weights
    out = train.save(m1, proc, rec, tmp_path / "ft", peft1)
    merged = lora.load_merged(base, out / "adapter")
    s1, s2 = m1.state_dict(), merged.state_dict()
    assert all(torch.allclose(s1[k], s2[k], atol=1e-6) for k in s1)
    assert type(merged).__name__ == "LlavaForConditionalGeneration" and "lora" not in " ".join(s2)
    lvlm = interp.load(str(lora.save_merged(base, out / "adapter", tmp_path / "merged")))
    imgs, shp, _, _ = shapes.Renderer().sample(np.random.default_rng(1), 2)
    inputs = lvlm.inputs([Image.fromarray(x) for x in imgs], [lvlm.prompt(build.question("colour", s)) for s in shp])
    with torch.inference_mode():
        assert torch.allclose(lvlm.run(inputs, last_only=True), m1(**inputs, logits_to_keep=1).logits, atol=1e-5)


def test_get_trains_once_caches_and_loads(tmp_path, monkeypatch):
    tiny = RECIPES["uniform"].with_(name="tiny-test", max_steps=2, batch=4)
    monkeypatch.setitem(RECIPES, "tiny-test", tiny)
    path = zoo.get("tiny-test", seed=3, cache_dir=tmp_path)
    assert path.parent == tmp_path / "zoo" and tiny.fingerprint()[:12] in path.name
    record = json.loads((path / "training.json").read_text())
    assert record["sha256"] == train.sha256(path / "model.safetensors") and record["steps"] == 2
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert zoo.get("tiny-test", seed=3, cache_dir=tmp_path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # not retrained
    lvlm = interp.load(str(path))
    imgs, shp, _, _ = shapes.Renderer().sample(np.random.default_rng(0), 2)
    inputs = lvlm.inputs([Image.fromarray(x) for x in imgs], [lvlm.prompt(build.question("colour", s)) for s in shp])
    assert lvlm.run(inputs, [interp.BaPA()], last_only=True).shape == (2, 1, len(build.WORDS))
    with pytest.raises(interp.SpatialBiasError, match="unknown organism"):
        zoo.get("no-such-recipe")


def test_sparse_sampling_empties_cells_but_never_the_target():
    from analyses.organisms import data
    render = shapes.Renderer()
    fill = np.array([0.0] * 8 + [1.0])  # only cell 8 may hold a distractor
    imgs, shp, col, cells = data.sample_sparse(render, np.random.default_rng(0), 6, np.full(9, 1 / 9), fill)
    bright = imgs.reshape(6, 3, 16, 3, 16, 3).max(axis=(2, 4, 5)).reshape(6, 9) > 150  # a shape in the cell
    for b in range(6):
        assert bright[b, cells[b]] and set(np.flatnonzero(bright[b])) <= {int(cells[b]), 8}


def test_trend_test_sign_and_null():
    n = np.full(9, 200)
    up = measure.trend_test(np.linspace(100, 180, 9).round(), n)
    flat = measure.trend_test(np.full(9, 150), n)
    assert up["z"] > 5 and up["p_one_sided"] < 1e-6 and up["slope"] > 0
    assert flat["z"] == 0 and flat["p_two_sided"] == 1.0


def test_interp_imports_neither_probes_nor_analyses():
    """Layers import one way: probes → interp → analyses."""
    bad = []
    for f in (ROOT / "interp").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad += [f"{f.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in ("probes", "analyses")]
    assert not bad, bad


# ---------------------------------------------------------------- shipped checkpoints
SHIPPED = [n for n in RECIPES if n not in ("lora", "lora-bapa")]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_checkpoint_matches_its_recipe_and_record(name):
    path = zoo.shipped(name, 0)
    assert path is not None, f"{name}: no shipped seed-0 checkpoint matching the recipe"
    rec = json.loads((path / "training.json").read_text())
    assert rec["sha256"] == train.sha256(path / "model.safetensors")
    assert (path / "model.safetensors").stat().st_size <= 2_000_000
    for k in ("seed", "threads", "steps", "stop_rule", "cpu_model", "cpu_capability", "torch", "config"):
        assert k in rec, k
    assert rec["seed"] == 0 and rec["threads"] == 1


def test_recency_text_stage_left_a_recency_prior():
    """The recency organism's LM, after its text stage, answers targets far from the question
    (index 0 of 9 items) worse than near ones: the prior the pre-registered test looks for."""
    rec = json.loads((zoo.shipped("recency", 0) / "training.json").read_text())
    acc = rec["text_stage"]["acc_by_target_index_9_items"]
    assert acc[0] < acc[-1] - 0.1 and rec["config"]["train_parts"] == ["projector"]


@pytest.mark.parametrize("name", ["lora", "lora-bapa"])
def test_shipped_adapters_are_small_and_recorded(name):
    path = zoo.shipped(name, 0)
    assert path is not None
    rec = json.loads((path / "training.json").read_text())
    assert rec["adapter_sha256"] == train.sha256(path / "adapter" / "adapter_model.safetensors")
    assert (path / "adapter" / "adapter_model.safetensors").stat().st_size < 200_000


def _measure(name, conditions, kinds=("colour",), n_items=60):
    """Measure the shipped seed-0 organism on a probe none of them was selected on (seed 999)."""
    return measure.measure(zoo.get(name, 0), n_items=n_items, seed=999, kinds=kinds, conditions=conditions)


BAPA, REV = [interp.BaPA()], [measure.ReverseImageTokens()]


def test_planted_lm_bias_is_removed_by_bapa():
    r = _measure("planted-lm", {"baseline": [], "bapa": BAPA})["colour"]
    assert r["baseline"]["range"] > 0.15 and r["baseline"]["chi2_p"] < 1e-3 and r["baseline"]["trend"]["z"] > 3
    assert r["bapa"]["range"] < r["baseline"]["range"] / 2


def test_vision_only_organism_is_biased_and_its_lm_cannot_see_position():
    """Round 3's positive control (docs/diagnosis.md): the bias is large, and it lives before the
    LM by construction — BaPA (one shared id) and reversed image tokens leave every answer as it was."""
    r = _measure("vision-only", {"baseline": [], "bapa": BAPA, "reversed": REV})["colour"]
    assert r["baseline"]["range"] > 0.3 and r["baseline"]["chi2_p"] < 1e-6
    for other in ("bapa", "reversed"):
        assert r[other]["cell_accuracy"] == pytest.approx(r["baseline"]["cell_accuracy"], abs=1e-9), other


def test_uniform_organism_shows_no_bias():
    r = _measure("uniform", {"baseline": []})["colour"]["baseline"]
    assert r["range"] < 0.12 and r["chi2_p"] > 0.01 and r["mean_accuracy"] > 0.7


def test_planted_order_bias_survives_bapa_and_follows_the_token_order():
    r = _measure("planted-order", {"bapa": BAPA, "bapa_reversed": BAPA + REV}, n_items=100)["colour"]
    assert r["bapa"]["range"] > 0.15 and r["bapa"]["trend"]["z"] > 3
    assert r["bapa_reversed"]["trend"]["z"] < -2  # reversing the tokens mirrors it: it sits in the LM


def test_planted_vision_bias_survives_bapa_and_follows_the_content():
    r = _measure("planted-vision", {"bapa": BAPA, "bapa_reversed": BAPA + REV})["colour"]
    assert r["bapa"]["range"] > 0.2 and r["bapa"]["trend"]["z"] > 3
    assert r["bapa_reversed"]["trend"]["z"] > 3  # it stays with the content: it sits before the LM


def test_learned_absolute_bias_is_flattened_by_bapa_at_a_cost():
    r = _measure("learned-absolute", {"baseline": [], "bapa": BAPA}, n_items=100)["colour"]
    assert r["baseline"]["range"] > 0.3
    assert r["bapa"]["range"] < 0.2 and r["bapa"]["mean_accuracy"] < r["baseline"]["mean_accuracy"] - 0.15


def test_mrope_keep_hw_keeps_the_bias_the_reference_variant_removes():
    r = _measure("mrope", {"baseline": [], "bapa": BAPA, "keep_hw": [interp.BaPA(variant="keep_hw")]})["colour"]
    assert r["baseline"]["range"] > 0.15
    assert r["keep_hw"]["range"] > 0.15 and r["keep_hw"]["trend"]["z"] > 3
    assert r["bapa"]["trend"]["z"] < r["keep_hw"]["trend"]["z"] / 2


def test_where_question_needs_position_ids_and_colour_does_not():
    r = _measure("where", {"baseline": [], "bapa": BAPA}, kinds=("colour", "where"), n_items=50)
    assert r["colour"]["baseline"]["mean_accuracy"] > 0.9 and r["colour"]["bapa"]["mean_accuracy"] > 0.9
    assert r["where"]["baseline"]["mean_accuracy"] > 0.6 and r["where"]["bapa"]["mean_accuracy"] < 0.3


def test_lora_bapa_is_flat_under_bapa_and_keeps_the_old_bias_under_plain_ids():
    r = _measure("lora-bapa", {"baseline": [], "bapa": BAPA})["colour"]
    assert r["bapa"]["range"] < 0.12 and r["baseline"]["range"] > 0.2
    assert _measure("lora", {"baseline": []}, n_items=100)["colour"]["baseline"]["range"] < 0.2
