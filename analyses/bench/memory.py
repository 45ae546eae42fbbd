"""Peak memory per analysis at real widths, measured in a fresh process, against
:func:`analyses.estimate.activation_peak` (the ``memory`` section of ``spatialbias bench --only``,
:mod:`analyses.bench.scale`).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from analyses.bench.common import placement_batch, real_model
from interp import patching
from interp.model import LVLM


MEMORY_ANALYSES = ("forward", "flow", "knockout", "patching", "attribution")


def _proc_status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("VmHWM", "VmRSS")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) * 1024
    return out


def memory_child(spec: dict) -> dict:
    """One measurement (run in a fresh process by :func:`memory`): build the model, warm up with
    one row, reset the kernel's peak-RSS mark (``/proc/self/clear_refs`` 5), run the analysis step
    with ``spec["rows"]`` rows, and report the peak growth beside :func:`analyses.estimate.activation_peak`."""
    from analyses import estimate
    from interp import attention, attribution
    from interp.interventions import Knockout
    torch.set_num_threads(spec.get("threads", 2))
    dtype = getattr(torch, spec.get("dtype", "bfloat16"))
    lvlm, size = real_model(spec["model"], spec["layers"], dtype, vision_layers=spec.get("vision_layers"))
    size = tuple(spec.get("image_px") or size)
    R, kind = spec["rows"], spec["analysis"]
    n = max(1, R // 2) if kind in ("patching", "attribution") else R
    clean, corrupt, correct, cands, targets = placement_batch(lvlm, n, size)
    with torch.no_grad():
        lvlm.run(lvlm.rows(clean, [0]), last_only=True)  # warm-up: lazy buffers, kernels
    cfg = lvlm.model.config.to_dict()
    px = tuple(clean["pixel_values"].shape[-2:]) if clean["pixel_values"].dim() == 4 else size
    shapes = estimate.Shapes.from_config(cfg, spec.get("dtype", "bfloat16"), image_px=px).with_run(
        clean["input_ids"].shape[1], vision_tokens_per_row(lvlm, clean))
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    base = _proc_status()["VmRSS"]
    t0 = time.perf_counter()
    if kind == "forward":
        with torch.no_grad():
            lvlm.run(clean, last_only=True)
    elif kind == "flow":
        attention.cell_flow(lvlm, clean)
    elif kind == "knockout":
        with torch.no_grad():
            lvlm.run(clean, [Knockout(cells=(0,), query="text")], last_only=True)
    elif kind == "patching":
        patching.run_patches(lvlm, corrupt, clean, patching.default_patches(lvlm), correct, cands, targets,
                             batch_size=R)
    elif kind == "attribution":  # what the attribution analysis runs: plain AtP over the default patches
        attribution.attribution_patching(lvlm, corrupt, clean, patching.default_patches(lvlm), correct, cands,
                                         targets, batch_size=R)
    else:
        raise ValueError(kind)
    seconds = time.perf_counter() - t0
    grown = _proc_status()["VmHWM"] - base
    predicted = estimate.activation_peak(shapes, estimate.profiles(kind)[-1], R)
    return {**spec, "seq_len": shapes.seq_len, "vision_tokens": shapes.vision_tokens, "measured_bytes": grown,
            "predicted_bytes": predicted, "ratio": predicted / max(grown, 1), "seconds": seconds,
            "weights_bytes": sum(lvlm.weight_bytes().values())}


def vision_tokens_per_row(lvlm: LVLM, inputs) -> int:
    """Tokens per row through the vision tower, from the inputs (the adapter counts them)."""
    return lvlm.adapter.vision_tokens(lvlm.model, inputs) // lvlm.batch(inputs).rows


def measure_memory(spec: dict) -> dict:
    """:func:`memory_child` in a fresh Python process (its own peak RSS; large blocks mmapped so
    freed memory leaves the RSS: ``MALLOC_MMAP_THRESHOLD_=65536``)."""
    import os
    import subprocess
    import sys
    code = ("import json, sys; from analyses.bench.memory import memory_child; "
            "print('RESULT ' + json.dumps(memory_child(json.loads(sys.argv[1]))))")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True, env=env,
                       cwd=str(Path(__file__).resolve().parents[2]))
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"memory measurement {spec} failed: {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(line[len("RESULT "):])
