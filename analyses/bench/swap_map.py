"""The position-swap map at one real-shape model's widths (few layers, random weights, fp32, CPU):
the resumed batched engine vs the per-patch loop, outputs asserted equal, the speed-up measured
in one run (:func:`analyses.bench.scale.real_speed`). Prints one line and writes ``--out`` (JSON):

    python -m analyses.bench.swap_map --model qwen3vl8b --layers 2 --items 2 --threads 2 --out FILE.json
    python -m analyses.bench.swap_map --model qwen3vl8b --layers 2 --threads 2 --loop-last-only  # fairer loop

``--model`` is a name of :data:`interp.realshape.REAL`. The JSON records the machine, the load
average (1/5/15 min) at start and end, the wall time (s) and the section's numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import time


def main(argv=None) -> dict:
    from interp.realshape import REAL
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(REAL), required=True)
    ap.add_argument("--layers", type=int, default=2, help="LM layers (and vision blocks) kept")
    ap.add_argument("--items", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4, help="rows per forward of the batched engine")
    ap.add_argument("--threads", type=int, required=True, help="torch threads (set explicitly: shared machines)")
    ap.add_argument("--loop-last-only", action="store_true",
                    help="the per-patch loop computes the head at the last position only (logits_to_keep=1)")
    ap.add_argument("--out", default=None, help="JSON file to write")
    a = ap.parse_args(argv)
    import torch

    from analyses.bench import common, scale
    torch.set_num_threads(a.threads)
    load0, t0 = os.getloadavg(), time.perf_counter()
    r = scale.real_speed(a.model, a.layers, a.items, a.batch_size, loop_last_only=a.loop_last_only)
    res = {"model": a.model, "machine": common.machine(), "loadavg_at_start": load0, "loadavg_at_end": os.getloadavg(),
           "wall_s": time.perf_counter() - t0, **r}
    print(f"{a.model}, {a.layers} LM layers, {r['patches']} patches × {r['items']} items, {r['tokens']} tokens "
          f"({r['image_tokens']} image), fp32, {a.threads} threads: batched {r['batched_s']:.2f} s, per-patch loop "
          f"({'last-position' if a.loop_last_only else 'all-position'} logits) "
          f"{r['loop_s']:.2f} s, speed-up {r['speedup']:.2f}×, max |Δ| {r['max_abs_diff']:.1e} (tolerance 1e-3); "
          f"load average {load0[0]:.2f} at start, {res['loadavg_at_end'][0]:.2f} at end; wall {res['wall_s']:.0f} s")
    if a.out:
        from spatialbias.files import atomic_write_text
        atomic_write_text(a.out, json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    main()
