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
                            "recency", "lora", "lora-bapa"}
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


@pytest.mark.parametrize("name", ["planted-lm", "learned-absolute", "mrope", "where"])
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
    m1, proc, rec, peft1 = train.train(r, seed=0, progress=False)
    m2, _, _, _ = train.train(r, seed=0, progress=False)
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


@pytest.mark.parametrize("name", ["lora", "lora-bapa"])
def test_shipped_adapters_are_small_and_recorded(name):
    path = zoo.shipped(name, 0)
    assert path is not None
    rec = json.loads((path / "training.json").read_text())
    assert rec["adapter_sha256"] == train.sha256(path / "adapter" / "adapter_model.safetensors")
    assert (path / "adapter" / "adapter_model.safetensors").stat().st_size < 200_000


def _measure(name, kinds=("colour",), n_items=60):
    return measure.measure(zoo.get(name, 0), n_items=n_items, seed=999, kinds=kinds)
