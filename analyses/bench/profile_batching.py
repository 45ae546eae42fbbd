"""Why batching patch rows does not speed up patching at 7B scale: time per row of a forward at
batch 1 vs batch 8 (LLaVA-1.5-7B shapes, random weights), and a torch.profiler table of where
the time goes. Usage: python -m analyses.bench.profile_batching --device cuda --out OUT"""
import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import interp
from interp import realshape, tiny


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, default=Path("out/profile"))
    a = ap.parse_args(argv)
    model, proc = realshape.llava_15_7b(dtype=torch.bfloat16, device=a.device)
    m = interp.load(model, proc)
    res = {}
    for b in (1, 8):
        x = m.inputs([tiny.image(336, 336, seed=i) for i in range(b)], [m.prompt("what is this ?")] * b)
        with torch.no_grad():
            for _ in range(2):
                model(**x, use_cache=False, logits_to_keep=1)
            ts = []
            for _ in range(5):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                model(**x, use_cache=False, logits_to_keep=1)
                torch.cuda.synchronize()
                ts.append(time.perf_counter() - t0)
        res[f"batch{b}_s"] = statistics.median(ts)
        res[f"batch{b}_per_row_s"] = statistics.median(ts) / b
    res["per_row_ratio_b1_over_b8"] = res["batch1_per_row_s"] / res["batch8_per_row_s"]
    x = m.inputs([tiny.image(336, 336, seed=i) for i in range(8)], [m.prompt("what is this ?")] * 8)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        model(**x, use_cache=False, logits_to_keep=1)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=12)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "profile.txt").write_text(table)
    (a.out / "batching.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    print(table)


if __name__ == "__main__":
    main()
