"""Real-scale check of the wrapper and the interventions: LLaVA-1.5-7B's shapes, random weights.

Builds ``LlavaForConditionalGeneration`` with LLaVA-1.5-7B's config (CLIP ViT-L/14 at 336 px →
576 image tokens; Llama-2-7B: 32 layers × 4096) with random weights — no download — and a real
``LlavaProcessor`` (PIL image processor at 336 px; a small word-level tokenizer). Checks that
the wrapper with no intervention reproduces HF's logits bit for bit, and times, in one run,
the bare HF forward against the wrapper with no intervention, BaPA and AGCI (medians over
repeats after warm-up; the ratios are the result).

    python -m analyses.bench.real_scale --device cuda --out OUT          # all 32 layers (GPU)
    python -m analyses.bench.real_scale --device cpu --lm-layers 2 --vision-layers 2 --batch 1
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch


def build(lm_layers: int, vision_layers: int, dtype: torch.dtype, device: str):
    from interp.realshape import llava_15_7b
    return llava_15_7b(lm_layers, vision_layers, dtype=dtype, device=device)


def median_time(fn, repeats: int, warmup: int, device: str) -> float:
    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--lm-layers", type=int, default=32)
    ap.add_argument("--vision-layers", type=int, default=24)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("out/bench"))
    a = ap.parse_args()

    import interp
    from interp import tiny
    dtype = getattr(torch, a.dtype)
    t0 = time.perf_counter()
    model, proc = build(a.lm_layers, a.vision_layers, dtype, a.device)
    build_s = time.perf_counter() - t0
    m = interp.load(model, proc)
    texts = ["describe the image ?", "what is this a picture of ?", "what color is the dog ?", "what is this ?"]
    inputs = m.inputs([tiny.image(400, 500, seed=i) for i in range(a.batch)],
                      [m.prompt(texts[i % len(texts)]) for i in range(a.batch)])
    n_img = int(m.image_mask(inputs["input_ids"])[0].sum())
    with torch.inference_mode():
        exact = torch.equal(m.run(inputs), model(**inputs).logits)
        base = m.run(inputs, last_only=True)
        bapa = m.run(inputs, [interp.BaPA()], last_only=True)
        agci = m.run(inputs, [interp.AGCI(lam=0.5)], last_only=True)
        runs = {
            "hf_forward": lambda: model(**inputs, use_cache=False, logits_to_keep=1).logits,
            "wrapper_no_intervention": lambda: m.run(inputs, last_only=True),
            "wrapper_bapa": lambda: m.run(inputs, [interp.BaPA()], last_only=True),
            "wrapper_agci": lambda: m.run(inputs, [interp.AGCI(lam=0.5)], last_only=True),
        }
        times = {k: median_time(f, a.repeats, a.warmup, a.device) for k, f in runs.items()}
    ref = times["hf_forward"]
    res = {
        "model": "LLaVA-1.5-7B config, random weights",
        "lm_layers": a.lm_layers, "vision_layers": a.vision_layers, "dtype": a.dtype, "batch": a.batch,
        "seq_len": int(inputs["input_ids"].shape[1]), "image_tokens_per_row": n_img,
        "device": torch.cuda.get_device_name() if a.device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__, "build_s": build_s,
        "wrapper_equals_hf_bitwise": exact,
        "bapa_max_abs_logit_change": float((bapa - base).abs().max()),
        "agci_max_abs_logit_change": float((agci - base).abs().max()),
        "median_s": times, "ratio_to_hf_forward": {k: v / ref for k, v in times.items()},
        "repeats": a.repeats, "warmup": a.warmup,
    }
    if a.device.startswith("cuda"):
        res["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "real_scale.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))
    print("\n| run | median s | × HF forward |\n|---|---|---|")
    for k, v in times.items():
        print(f"| {k} | {v:.4f} | {v / ref:.3f} |")


if __name__ == "__main__":
    main()
