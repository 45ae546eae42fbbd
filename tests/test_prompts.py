"""One prompt builder (interp.prompts.prompt, LVLM.prompt) for scoring, the causal analyses,
similarity and occlusion: the processor's chat template, else the architecture's published
format, else ``marker\\ntext``."""

import pytest
from PIL import Image

import interp
from analyses import occlusion as occ
from analyses.causal import placement_pairs
from analyses.evaluate import score_probe
from analyses.scoring import PAPER_PROMPT
from interp import prompts, tiny
from helpers import paper_probe


def paper_probe_png(folder, n_items=1):
    return paper_probe(folder, n_items, size=48, ext="png")


def bare_llava():
    """A tiny LLaVA whose processor has no chat template (a checkpoint saved without one)."""
    m, p = tiny.build_llava()
    p.chat_template = None
    return interp.load(m, p)


def recording(lvlm, monkeypatch):
    seen = []
    real = lvlm.inputs
    monkeypatch.setattr(lvlm, "inputs", lambda images, texts: seen.append(list(texts)) or real(images, texts))
    return seen


def test_causal_scoring_and_occlusion_feed_the_same_prompt(tmp_path, monkeypatch):
    lvlm = bare_llava()
    probe = paper_probe_png(tmp_path / "p")
    seen = recording(lvlm, monkeypatch)
    score_probe(lvlm, probe, {"baseline": []}, progress=False)
    scored = [p for batch in seen for p in batch]
    assert len(scored) == 9
    want = "USER: <image>\n" + PAPER_PROMPT.format(caption="a cat 0") + " ASSISTANT:"  # LLaVA-1.5's format
    assert scored[8] == scored[0] == want
    seen.clear()
    pairs = placement_pairs(lvlm, probe, clean_cell=8, corrupt_cell=0)
    assert seen == [[scored[8]], [scored[0]]]  # clean (cell 8), corrupt (cell 0)
    assert pairs.clean["input_ids"].shape[1] == lvlm.inputs([Image.new("RGB", (48, 48))], [want])["input_ids"].shape[1]
    seen.clear()
    occ.occlusion_scores(lvlm, probe, steps=1, progress=False, rows=None)
    assert {p for batch in seen for p in batch} == {want}


def test_prompt_builder_order(tiny_llava):
    """The processor's template when it has one; else the architecture's fallback; else marker\\ntext."""
    assert tiny_llava.prompt("is it ?") == tiny_llava.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "is it ?"}]}],
        add_generation_prompt=True)
    bare = bare_llava()
    assert bare.prompt("is it ?") == "USER: <image>\nis it ? ASSISTANT:"
    assert bare.prompt("is it ?", n_images=2) == "USER: <image>\n<image>\nis it ? ASSISTANT:"
    assert bare.inputs([tiny.image()], [bare.prompt("is it ?")])["input_ids"].shape[0] == 1
    proc = bare.processor
    assert prompts.prompt(proc, "no_such_arch", "<image>", "is it ?") == "<image>\nis it ?"
    assert prompts.prompt(proc, "qwen25vl", "<|image_pad|>", "q") == prompts.prompt(proc, "qwen2vl", "<|image_pad|>", "q")
    assert prompts.prompt(proc, "qwen2vl", "<|image_pad|>", "q").endswith(
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>q<|im_end|>\n<|im_start|>assistant\n")
    assert prompts.prompt(proc, "gemma3", "<start_of_image>", "q") == (
        "<start_of_turn>user\n<start_of_image>q<end_of_turn>\n<start_of_turn>model\n")
    assert prompts.prompt(proc, "llava_next", "<image>", "q") == "[INST] <image>\nq [/INST]"
    assert prompts.prompt(proc, "llava_onevision", "<image>", "q") == (
        "<|im_start|>user\n<image>\nq<|im_end|>\n<|im_start|>assistant\n")
    assert prompts.prompt(proc, "internvl", "<IMG_CONTEXT>", "q") == (
        "<|im_start|>user\n<IMG_CONTEXT>\nq<|im_end|>\n<|im_start|>assistant\n")  # HF's InternVL-hf processor tests
    assert prompts.prompt(proc, "gemma4", "<|image|>", "q") == "<|turn>user\n<|image|>q<turn|>\n<|turn>model\n"
    assert prompts.prompt(proc, "gemma3n", "<image_soft_token>", "q") == (
        "<start_of_turn>user\n<image_soft_token>q<end_of_turn>\n<start_of_turn>model\n")
    assert set(prompts.FALLBACK_TEMPLATES) == {"llava", "llava_next", "qwen2vl", "qwen25vl", "gemma3", "llava_onevision",
                                             "qwen3vl", "internvl", "qwen3vlmoe", "gemma4", "qwen35", "gemma3n"}
    from interp.adapters import ADAPTERS
    assert all(prompts.chat_format(a) is a.chat for a in ADAPTERS)  # the adapter's own field


@pytest.mark.parametrize("name", ["llava", "llava_next", "qwen2vl", "qwen25vl", "gemma3", "llava_onevision", "qwen3vl",
                                  "internvl", "qwen3vl_moe", "gemma4", "qwen35"])
def test_fallback_prompts_hold_one_marker_per_image(name):
    m, p = tiny.BUILDERS[name]()
    p.chat_template = None
    lvlm = interp.load(m, p)
    for n in (1, 2):
        text = lvlm.prompt("what is this ?", n_images=n)
        assert text.count(lvlm.image_marker) == n and "what is this ?" in text
    ims = [tiny.image(32, 32, seed=s) for s in range(2)]
    assert lvlm.inputs([ims[:1]], [lvlm.prompt("what is this ?")])["input_ids"].shape[0] == 1
