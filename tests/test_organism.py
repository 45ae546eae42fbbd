"""The bundled organism: a real HF checkpoint, its processor, and reproducible training."""
import json

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

from interp.load import ORGANISM_DIR
from analyses.organisms import build, train
from analyses.organisms.recipes import RECIPES, SKEW
from probes import shapes


def test_checkpoint_loads_with_plain_hf_and_matches_its_record():
    model = LlavaForConditionalGeneration.from_pretrained(ORGANISM_DIR, local_files_only=True)
    proc = AutoProcessor.from_pretrained(ORGANISM_DIR, local_files_only=True)
    assert type(model.model.language_model).__name__ == "LlamaModel"
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    record = json.loads((ORGANISM_DIR / "training.json").read_text())
    assert record["sha256"] == train.sha256(ORGANISM_DIR / "model.safetensors")
    assert "planted on purpose" in record["description"] and record["stopped_by"] == "stop_acc"
    assert record["config"]["cell_weights"] == list(SKEW) and record["recipe"] == "planted-lm"
    assert record["fingerprint"] == RECIPES["planted-lm"].fingerprint()
    assert proc.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id


def test_processor_path_equals_training_path():
    proc = AutoProcessor.from_pretrained(ORGANISM_DIR, local_files_only=True)
    imgs, shp, _, _ = shapes.Renderer().sample(np.random.default_rng(0), 3)
    texts = [proc.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": shapes.question(shapes.SHAPES[s])}]}], add_generation_prompt=True)
        for s in shp]
    enc = proc(images=[Image.fromarray(x) for x in imgs], text=texts, return_tensors="pt", padding=True)
    assert torch.equal(enc["input_ids"], build.input_ids(shp))
    assert torch.equal(enc["pixel_values"], build.pixel_values(imgs))


def test_training_is_deterministic_for_a_seed():
    recipe = RECIPES["planted-lm"].with_(max_steps=3, batch=8)
    a, _, ra, _ = train.train(recipe, seed=5, progress=False)
    b, _, rb, _ = train.train(recipe, seed=5, progress=False)
    c, _, _, _ = train.train(recipe, seed=6, progress=False)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert ra["steps"] == rb["steps"] == 3 and ra["stopped_by"] == "max_steps"
