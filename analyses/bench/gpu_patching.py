"""Batched position-swap patching at 7B widths on a GPU (random weights, bf16, all LM layers):
:func:`analyses.bench.common.patching_speed` on LLaVA-1.5-7B (336 px) and Qwen2.5-VL-7B (840 px),
8 items, every LM block × image/text/last, batch 16; writes ``$OUT/real_patching.json``.

    HF_HUB_OFFLINE=1 OUT=DIR timeout 250 python -m analyses.bench.gpu_patching

(On a bare device machine, install the wheels first, e.g. ``python3 -m pip install --no-index
--no-deps --target /tmp/site .whl/*.whl`` and ``PYTHONPATH=/tmp/site:$PWD``.)
"""
import json
import os

import torch

import interp
from analyses.bench import common
from interp import patching, realshape


def main() -> None:
    res = {}
    for name in ("llava15", "qwen25vl"):
        spec = realshape.REAL[name]
        model, proc = spec.build(spec.lm_layers, spec.vision_layers, dtype=torch.bfloat16, device="cuda")
        size = spec.image_px
        m = interp.load(model, proc)
        clean, corrupt, correct, cands, targets = common.placement_batch(m, 8, size)
        n = m.adapter.layer_count(model, "lm")
        ps = [patching.Patch(f"lm.blocks.{i}", g) for i in range(n) for g in ("image", "text", "last")]
        res[name] = {bs: common.patching_speed(m, corrupt, clean, ps, correct, cands, targets, batch_size=bs)
                     for bs in (16,)}
        print(name, json.dumps(res[name]))
        del model, m; torch.cuda.empty_cache()
    open(os.environ["OUT"] + "/real_patching.json", "w").write(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
