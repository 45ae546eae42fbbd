"""Scale sections of ``spatialbias bench`` (``--only memory,speed,sharding,screen``):

* ``memory``: peak memory per analysis at LLaVA-1.5-7B and Qwen2.5-VL-7B widths (random weights,
  bf16, 1–2 LM layers, CPU), measured in a fresh process each (:func:`analyses.bench.memory.measure_memory`)
  against :func:`analyses.estimate.activation_peak`; the per-layer growth measured vs predicted
  (linear in layers), and the memory model's 32-layer figure for ``spatialbias report``.
* ``speed``: a full position-swap patching map (every LM block × target/image/text/last × items,
  denoising) by :func:`interp.patching.run_patches` vs the per-patch loop one writes by hand
  (:func:`analyses.bench.common._loop_patching`: per item one cached source run, then one hooked forward
  per patch), outputs asserted equal, on tiny models, the organism and 7B widths.
* ``sharding``: every tiny architecture split across CPU and disk (accelerate), logits equal.
* ``screen``: how often ``--screen K`` misses an exact effect ≥ 5 % of the gap on the organism.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

import interp
from analyses import estimate
from analyses.bench import common as b
from analyses.bench import memory as mem
from interp import patching

SECTIONS = ("memory", "speed", "sharding", "screen")


def memory(models=("llava15", "qwen25vl"), layers=(2, 8), analyses=mem.MEMORY_ANALYSES, rows: int = 2,
           parallel: int = 2, vision_layers: int = 2) -> dict:
    """Measured vs predicted peak (bytes above the loaded model) per model, LM layers and analysis,
    ``parallel`` fresh processes at a time (one torch thread each), the vision tower fixed at
    ``vision_layers`` blocks so that the growth between the layer counts is the LM's per layer.
    Each model at its ``cpu_px`` canvas (:data:`interp.realshape.REAL`: Qwen at 448 px, its default
    840 px canvas needs more RAM than this machine has to spare)."""
    specs = [{"model": m, "layers": n, "vision_layers": vision_layers, "analysis": a,
              "rows": 4 if a == "patching" else rows, "threads": 1, "dtype": "bfloat16",
              **_px(m)}
             for m in models for n in layers for a in analyses]
    with ThreadPoolExecutor(parallel) as pool:
        got = list(pool.map(mem.measure_memory, specs))
    return {"runs": got, "linear": linear(got), "report_llava7b": report_prediction()}


def _px(name: str) -> dict:
    """The memory spec's canvas where a CPU run needs a smaller one than the model's own."""
    from interp.realshape import REAL
    r = REAL[name]
    return {"image_px": list(r.cpu_px)} if r.cpu_px != r.image_px else {}


def linear(runs: list[dict], full: dict | None = None) -> dict:
    """Per model/analysis with two or more LM layer counts: growth per LM layer, measured and
    predicted, between the fewest and most layers, and both carried on to the model's full depth
    (``full``: LLaVA-1.5-7B 32, Qwen2.5-VL-7B 28 layers) from the deepest run."""
    if full is None:
        from interp.realshape import REAL
        full = {name: r.lm_layers for name, r in REAL.items()}
    out = {}
    for key in dict.fromkeys((x["model"], x["analysis"]) for x in runs):
        r = {x["layers"]: x for x in runs if (x["model"], x["analysis"]) == key}
        if len(r) < 2:
            continue
        lo, hi = min(r), max(r)
        per = {k: (r[hi][f"{k}_bytes"] - r[lo][f"{k}_bytes"]) / (hi - lo) for k in ("measured", "predicted")}
        n = full.get(key[0], hi)
        out["/".join(key)] = {"measured_per_layer": per["measured"], "predicted_per_layer": per["predicted"],
                              "layers": n, **{f"{k}_at_full": r[hi][f"{k}_bytes"] + (n - hi) * per[k] for k in per}}
    return out


def report_prediction(budget_gib: float = 40.0) -> dict:
    """The memory model on ``spatialbias report``'s analyses at LLaVA-1.5-7B shapes (bf16, 32
    layers, 336 px, the shapes prompt): peak at the default 64 rows per step, and the rows each
    analysis gets under ``budget_gib`` of GPU memory with its peak."""
    from interp import realshape
    cfg = realshape.llava_15_7b_config(32, 24).to_dict()
    s = estimate.Shapes.from_config(cfg, "bfloat16", image_px=(336, 336))
    room = int(budget_gib * 2 ** 30) - s.weights
    out = {"weights_bytes": s.weights, "seq_len": s.seq_len, "budget_bytes": int(budget_gib * 2 ** 30), "analyses": {}}
    for a in ("eval", "flow", "knockout", "patching", "attribution"):
        steps = {k: estimate.choose_rows(s, k, room, 64) for k in estimate.profiles(a)}  # the report's batch size
        kind = max(steps, key=lambda k: estimate.activation_peak(s, k, steps[k]))  # the step with the largest peak
        out["analyses"][a] = {"peak_at_64_rows": s.weights + max(estimate.activation_peak(s, k, 64) for k in steps),
                              "rows_under_budget": steps[kind],
                              "peak_under_budget": s.weights + estimate.activation_peak(s, kind, steps[kind]),
                              "steps": {k: {"rows": r, "peak": s.weights + estimate.activation_peak(s, k, r)}
                                        for k, r in steps.items()}}
    return out


def position_map(lvlm) -> list[patching.Patch]:
    n = lvlm.adapter.layer_count(lvlm.model, "lm")
    return [patching.Patch(f"lm.blocks.{i}", g) for i in range(n) for g in ("target", "image", "text", "last")]


def speed(out: Path, organism_items: int = 100, tiny_items: int = 8, real_items: int = 2, real_layers: int = 2,
          real: tuple[str, ...] | None = None) -> dict:
    """Resumed batched patching vs the hand-written loop (see the module doc) on the organism, every
    tiny model and the ``real`` real-shape models (default: every one of
    :data:`interp.realshape.REAL`) by :func:`real_speed`."""
    from interp import realshape, tiny
    res = {}
    m, pairs = b.organism_pairs(out, organism_items)
    res["organism"] = b.patching_speed(m, pairs.corrupt, pairs.clean, position_map(m), pairs.correct,
                                       pairs.candidates, pairs.targets)
    for name, build in tiny.BUILDERS.items():
        lvlm = interp.load(*build())
        clean, corrupt, correct, cands, targets = b.placement_batch(lvlm, tiny_items, (48, 48))
        res[f"tiny/{name}"] = b.patching_speed(lvlm, corrupt, clean, position_map(lvlm), correct, cands, targets)
    for name in realshape.REAL if real is None else real:
        res[f"{name}/{real_layers} layers"] = real_speed(name, real_layers, real_items)
    return res


def real_speed(name: str, layers: int = 2, items: int = 2, batch_size: int = 4, warmup: bool = True,
               loop_last_only: bool = False) -> dict:
    """The full position-swap map (:func:`position_map`: every LM block × target/image/text/last)
    on ``items`` items of one real-shape model (:data:`interp.realshape.REAL`; ``layers`` LM layers
    and as many vision blocks, random weights) at its ``cpu_px`` canvas, batched vs the per-patch
    loop (:func:`analyses.bench.common.patching_speed`: times in seconds, ``speedup`` = loop / batched
    from the same run, ``max_abs_diff`` in logit-difference units, asserted ≤ 1e-3). fp32, so that
    equality is checked at 1e-3 (bf16 differences would need a loose tolerance). ``warmup``: one
    unpatched forward of one row first, so that neither timing pays the first call's set-up.
    ``loop_last_only``: the loop computes the head at the last position only."""
    from interp import realshape
    lvlm, _ = b.real_model(name, layers, torch.float32, vision_layers=layers)
    size = realshape.REAL[name].cpu_px
    clean, corrupt, correct, cands, targets = b.placement_batch(lvlm, items, size)
    if warmup:
        with torch.no_grad():
            lvlm.run(lvlm.rows(clean, [0]))
    r = b.patching_speed(lvlm, corrupt, clean, position_map(lvlm), correct, cands, targets, batch_size=batch_size,
                         loop_last_only=loop_last_only)
    return {**r, "image_px": list(size), "dtype": "float32", "lm_layers": layers,
            "tokens": int(clean["input_ids"].shape[1]), "image_tokens": int(lvlm.image_mask(clean["input_ids"])[0].sum())}


def sharding(tmp: Path) -> dict:
    """Every tiny architecture: accelerate's ``device_map="auto"`` under a CPU budget of half the
    weights (the rest memory-mapped from disk) vs the plain model: logits equal bit for bit."""
    from interp import tiny
    out = {}
    for name, build in tiny.BUILDERS.items():
        plain = interp.load(*build())
        model, proc = build()
        half = sum(t.numel() * t.element_size() for t in model.parameters()) // 2
        split = interp.load(model, proc, device_map="auto", max_memory={"cpu": half}, offload_folder=tmp / name)
        x = plain.inputs([tiny.image(48, 48, seed=s) for s in range(2)], [plain.prompt("what is this ?")] * 2)
        with torch.no_grad():
            a, c = plain.run(x), split.run(x)
        out[name] = {"weights": split.weight_bytes(), "equal": bool(torch.equal(a, c))}
        if not out[name]["equal"]:
            raise AssertionError(f"{name}: split logits differ by {(a - c).abs().max()}")
    return out


def screen(out: Path, items: int = 100, ks=(5, 10, 20, 40)) -> dict:
    """Full exact patching and attribution patching of the default patches on the organism
    (denoising, cells 8 ← 0): per K, the effects ≥ 5 % of the gap outside the top K by attribution."""
    from interp.attribution import attribution_patching
    from interp.screen import screen_misses
    m, pairs = b.organism_pairs(out, items)
    ps = patching.default_patches(m)
    args = (pairs.corrupt, pairs.clean, ps, pairs.correct, pairs.candidates, pairs.targets)
    t0 = time.perf_counter()
    exact = patching.run_patches(m, *args)
    t1 = time.perf_counter()
    est = attribution_patching(m, *args)
    t2 = time.perf_counter()
    return {"items": items, "patches": len(ps), "exact_s": t1 - t0, "attribution_s": t2 - t1,
            "ks": screen_misses(exact, est, ks)}


def run(out: Path, only: tuple[str, ...]) -> dict:
    """The named sections; each records its wall time and the machine's load average at start."""
    import os
    res = {"machine": b.machine(), "sections": list(only)}
    for name in only:
        t0, load = time.perf_counter(), os.getloadavg()
        if name == "memory":
            r = memory()
        elif name == "speed":
            r = speed(out)
        elif name == "sharding":
            r = sharding(out / "offload")
        elif name == "screen":
            r = screen(out)
        else:
            raise ValueError(name)
        res[name] = {**r, "wall_s": time.perf_counter() - t0, "loadavg_at_start": load}
    return res


def markdown(res: dict) -> str:
    """The scale sections as docs/benchmarks.md tables."""
    g = 2 ** 30
    lines = []
    if "memory" in res:
        r = res["memory"]
        lines += [f"### memory (wall {r['wall_s']:.0f} s, load average at start {r['loadavg_at_start'][0]:.1f})", "",
                  "| model | LM layers | analysis | rows | tokens | measured MiB | predicted MiB | predicted / measured |",
                  "|---|---|---|---|---|---|---|---|"]
        for x in r["runs"]:
            lines.append(f"| {x['model']} | {x['layers']} | {x['analysis']} | {x['rows']} | {x['seq_len']} | "
                         f"{x['measured_bytes'] / 2 ** 20:.0f} | {x['predicted_bytes'] / 2 ** 20:.0f} | {x['ratio']:.2f} |")
        lines += ["", "| model/analysis | measured MiB per LM layer | predicted MiB per LM layer | all layers: "
                  "measured (extrapolated) MiB | predicted MiB | predicted / measured |", "|---|---|---|---|---|---|"]
        for k, v in r["linear"].items():
            mib = [int(round(v[x] / 2 ** 20)) for x in ("measured_per_layer", "predicted_per_layer", "measured_at_full",
                                                         "predicted_at_full")]
            lines.append(f"| {k} | {mib[0]} | {mib[1]} | {mib[2]} ({v['layers']} layers) | {mib[3]} | "
                         f"{v['predicted_at_full'] / max(v['measured_at_full'], 1):.2f} |")
        p = r["report_llava7b"]
        lines += ["", f"`spatialbias report` at LLaVA-1.5-7B shapes (bf16, 32 layers, {p['seq_len']} tokens; "
                  f"weights {p['weights_bytes'] / g:.1f} GiB), memory model:", "",
                  "| analysis | peak at 64 rows (GiB) | rows under 40 GiB | peak then (GiB) |", "|---|---|---|---|"]
        for a, v in p["analyses"].items():
            lines.append(f"| {a} | {v['peak_at_64_rows'] / g:.1f} | {v['rows_under_budget']} | "
                         f"{v['peak_under_budget'] / g:.1f} |")
    if "speed" in res:
        r = res["speed"]
        lines += ["", f"### speed (wall {r['wall_s']:.0f} s, load average at start {r['loadavg_at_start'][0]:.1f})",
                  "", "| model | patches × items | resumed batched (s) | hand-written loop (s) | speed-up | max abs. difference |",
                  "|---|---|---|---|---|---|"]
        for k, v in r.items():
            if isinstance(v, dict) and "speedup" in v:
                lines.append(f"| {k} | {v['patches']} × {v['items']} | {v['batched_s']:.2f} | {v['loop_s']:.2f} | "
                             f"{v['speedup']:.1f}× | {v['max_abs_diff']:.1e} |")
    if "sharding" in res:
        r = res["sharding"]
        lines += ["", "### sharding", "", "| tiny model | weights per place (bytes) | logits equal |", "|---|---|---|"]
        for k, v in r.items():
            if isinstance(v, dict) and "equal" in v:
                lines.append(f"| {k} | {v['weights']} | {v['equal']} |")
    if "screen" in res:
        r = res["screen"]
        lines += ["", f"### screen (organism, {r['items']} items, {r['patches']} patches; exact {r['exact_s']:.1f} s, "
                  f"attribution {r['attribution_s']:.1f} s)", "",
                  "| K | effects ≥ 5 % of the gap | missed by the top K | miss rate | missed |", "|---|---|---|---|---|"]
        for v in r["ks"]:
            lines.append(f"| {v['k']} | {v['effects']} | {v['missed']} | {v['miss_rate']:.2f} | "
                         f"{', '.join(v['missed_patches']) or '—'} |")
    return "\n".join(lines) + "\n"
