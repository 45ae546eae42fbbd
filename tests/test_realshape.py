"""The real-shape benchmark models and the position-swap map benchmark on them.

* Qwen3-VL-8B (:func:`interp.realshape.qwen3_vl_8b_config`) has the widths of
  ``benchmarks/configs/qwen3-vl-8b/config.json`` (the published values), only the depths and the
  token ids (the tiny tokenizer's) differ; with few vision blocks DeepStack taps blocks it keeps;
  its benchmark canvas is the adapter's probe canvas (288 px: 81 merged image tokens).
* ``python -m analyses.bench.swap_map`` end to end on a tiny Qwen3-VL registered as a real-shape
  model (seconds): batched and looped maps equal (the loop with the head over all positions or
  the last one only), one line printed, the JSON written.
"""
import json
from pathlib import Path

import pytest

from interp import realshape, tiny

ROOT = Path(__file__).parent.parent


def test_qwen3_vl_8b_config_has_the_published_widths():
    from transformers import Qwen3VLConfig
    ref = Qwen3VLConfig(**json.loads((ROOT / "benchmarks/configs/qwen3-vl-8b/config.json").read_text()))
    cfg = realshape.qwen3_vl_8b_config(36, 27)
    ids = {"bos_token_id", "eos_token_id", "pad_token_id", "dtype"}
    for part in ("text_config", "vision_config"):
        a, b = getattr(cfg, part).to_dict(), getattr(ref, part).to_dict()
        assert {k: (a.get(k), b.get(k)) for k in (set(a) | set(b)) - ids if a.get(k) != b.get(k)} == {}, part
    assert cfg.text_config.rope_parameters["mrope_section"] == [24, 20, 20]
    assert cfg.text_config.rope_parameters["mrope_interleaved"] is True
    assert realshape.REAL["qwen3vl8b"].lm_layers == 36 and realshape.REAL["qwen3vl8b"].vision_layers == 27


@pytest.mark.parametrize("vision_layers,want", [(2, [0, 1]), (4, [0, 1, 2]), (17, [8, 16]), (27, [8, 16, 24])])
def test_qwen3_vl_8b_deepstack_within_the_kept_blocks(vision_layers, want):
    assert realshape.qwen3_vl_8b_config(2, vision_layers).vision_config.deepstack_visual_indexes == want


def test_qwen3_vl_8b_canvas_is_the_probe_canvas():
    from transformers import Qwen2VLImageProcessorPil

    from interp import adapters
    ip = Qwen2VLImageProcessorPil(patch_size=16, temporal_patch_size=2, merge_size=2,
                                  size={"shortest_edge": 65536, "longest_edge": 16777216})
    side = adapters.for_class("Qwen3VLForConditionalGeneration").probe_canvas(realshape.qwen3_vl_8b_config(2, 2), ip)
    assert (side, side) == realshape.REAL["qwen3vl8b"].image_px == realshape.REAL["qwen3vl8b"].cpu_px == (288, 288)


@pytest.mark.parametrize("last_only", [False, True])
def test_swap_map_script_on_a_tiny_qwen3_vl(monkeypatch, tmp_path, capsys, last_only):
    from analyses.bench import swap_map
    spec = realshape.RealModel(lambda lm, vision, dtype=None, device="cpu": tiny.build_qwen3vl(), 3, 2, (48, 48),
                               (48, 48))
    monkeypatch.setitem(realshape.REAL, "tiny_qwen3vl", spec)
    out = tmp_path / "r.json"
    r = swap_map.main(["--model", "tiny_qwen3vl", "--items", "2", "--threads", "1", "--out", str(out)]
                      + ["--loop-last-only"] * last_only)
    assert r["patches"] == 3 * 4 and r["items"] == 2  # every LM block × target/image/text/last
    assert r["max_abs_diff"] <= 1e-3 and r["speedup"] > 0 and r["image_tokens"] == 9
    assert r["loop_last_only"] is last_only
    assert json.loads(out.read_text())["speedup"] == r["speedup"]
    line = capsys.readouterr().out.strip()
    assert len(line.splitlines()) == 1 and "speed-up" in line and "max |Δ|" in line and "load average" in line
