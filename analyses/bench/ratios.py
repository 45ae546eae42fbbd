"""Benchmarks: every figure is a ratio of medians measured in the same run (these machines are
noisy), after warm-up. ``spatialbias bench`` writes ``bench.json`` and ``bench.md``.

* tracing overhead: nnsight trace caching K sites vs the bare HF forward;
* position-swap patching: the batched engine vs the loop a TransformerLens/nnsight user writes
  (one cached clean forward per item, then one forward per patch), outputs asserted equal
  (:func:`analyses.bench.common.patching_speed`);
* attribution patching vs exact patching: speed-up and rank agreement (Spearman, top-10) of the
  patch rankings, per (site, group) and per single (site, position), for several estimators;
* scaling: time and memory against image tokens and number of cached sites;
* the demo's phases (load, probe, evaluation, causal analyses, figures).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from scipy import stats

import interp
from analyses.bench.common import machine, median_s, organism_pairs, patching_speed, placement_batch
from interp import attribution, patching
from interp.model import LVLM
from interp.tracing import trace
from spatialbias.files import atomic_write_text


def lm_sites(lvlm: LVLM, k: int | None) -> list[str]:
    """k LM block outputs spread over the depth (all of them when k is None), plus the projector."""
    n = lvlm.adapter.layer_count(lvlm.model, "lm")
    idx = list(range(n)) if k is None or k >= n else sorted({round(i * (n - 1) / max(k - 1, 1)) for i in range(k)})
    return ["projector"] + [f"lm.blocks.{i}" for i in idx]


def tracing_overhead(lvlm: LVLM, inputs, repeats: int = 5, ks=(1, 8, None)) -> dict:
    dev = lvlm.device
    with torch.no_grad():
        bare = median_s(lambda: lvlm.model(**inputs, use_cache=False), repeats, 1, dev)
    out = {"bare_forward_s": bare, "wrapper_run_s": median_s(lambda: lvlm.run(inputs), repeats, 1, dev)}
    for k in ks:
        sites = lm_sites(lvlm, k)
        t = median_s(lambda: trace(lvlm, inputs, cache=sites), repeats, 1, dev)
        out[f"trace_{len(sites)}_sites_s"] = t
        out[f"trace_{len(sites)}_sites_ratio"] = t / bare
    out["wrapper_run_ratio"] = out["wrapper_run_s"] / bare
    return out


ATTRIBUTION_METHODS = (("atp", 1), ("atp", 8), ("conductance", 4), ("conductance", 32), ("site_ig", 4))
"""(method, steps) of :mod:`interp.attribution` compared with exact patching."""


def rank_agreement(exact, estimate, k: int = 10, floor: float = 0.05) -> dict:
    """Spearman of two rankings over all patches, Spearman over the patches whose exact
    |restoration| ≥ ``floor`` (the rest are ranked by noise-sized differences), and the overlap
    of the top-``k`` patches by |value|."""
    import numpy as np
    ex, es = np.asarray(exact, float), np.asarray(estimate, float)
    big = np.abs(ex) >= floor
    top = len(set(np.argsort(-np.abs(ex), kind="stable")[:k]) & set(np.argsort(-np.abs(es), kind="stable")[:k]))
    return {"spearman": float(stats.spearmanr(ex, es).statistic),
            "spearman_nonnegligible": float(stats.spearmanr(ex[big], es[big]).statistic) if big.sum() > 2 else None,
            "n_nonnegligible": int(big.sum()), f"top{k}_overlap": top}


def attribution_vs_exact(lvlm: LVLM, base, source, patches, correct, cands, targets, batch_size: int = 64,
                         repeats: int = 3, methods=ATTRIBUTION_METHODS, sites=None) -> dict:
    """Attribution patching vs exact (batched) patching at two granularities, times as medians of
    ``repeats`` runs after one warm-up:

    * ``patches``: the (site, group) ``patches`` (exact: :func:`interp.patching.run_patches`);
    * ``positions``: every single (site, position) of ``sites`` (default
      :func:`interp.attribution.position_sites`; exact: :func:`interp.attribution.run_position_patches`).

    Per granularity and method (``atp1``, ``atp8``, ``conductance4``, …): seconds, speed-up over
    exact and :func:`rank_agreement` with exact denoising restoration. The top-level
    ``exact_s``/``atpK_*`` keys repeat the ``patches`` numbers of earlier versions.
    """
    dev = lvlm.device
    sites = list(sites or attribution.position_sites(lvlm))
    res: dict = {}
    for gran in ("patches", "positions"):
        got = {}

        def exact():
            if gran == "patches":
                got["ex"] = patching.restoration(patching.run_patches(
                    lvlm, base, source, patches, correct, cands, targets, batch_size=batch_size), "denoise")
            else:
                got["ex"] = attribution.position_restoration(attribution.run_position_patches(
                    lvlm, base, source, sites, correct, cands, batch_size=batch_size))
        t_ex = median_s(exact, repeats, 1, dev)
        keys = ["site", "group"] if gran == "patches" else ["site", "position"]
        r = {"n": len(got["ex"]), "exact_s": t_ex, "methods": {}}
        if gran == "positions":
            r["sites"] = sites
        for method, steps in methods:
            def est():
                if gran == "patches":
                    df = attribution.attribution_patching(lvlm, base, source, patches, correct, cands, targets,
                                                          batch_size=batch_size, steps=steps, method=method)
                else:
                    df = attribution.position_attribution(lvlm, base, source, sites, correct, cands,
                                                          batch_size=batch_size, steps=steps, method=method)
                got["at"] = attribution.estimated_restoration(df, keys)
            t = median_s(est, repeats, 1, dev)
            j = got["ex"].merge(got["at"], on=keys)
            r["methods"][f"{method}{steps}"] = {"method": method, "steps": steps, "s": t, "speedup": t_ex / t,
                                                 **rank_agreement(j.restoration, j.estimate)}
        res[gran] = r
    p = res["patches"]
    out = {"exact_s": p["exact_s"]}
    for steps in (1, 8):
        m = p["methods"].get(f"atp{steps}")
        if m:
            out.update({f"atp{steps}_s": m["s"], f"atp{steps}_speedup": m["speedup"],
                        f"atp{steps}_spearman": m["spearman"]})
    return {**out, **res}


def scaling(device: str, sizes=(112, 336, 756), lm_layers: int = 2, vision_layers: int = 2,
            dtype=torch.float32) -> list[dict]:
    """Time and memory of a forward and of traces with 1 / 4 / all LM sites against the number of
    image tokens ((size/14)²: 64, 576, 2916), at LLaVA-1.5-7B widths with few layers."""
    from interp import realshape, tiny
    rows = []
    for size in sizes:
        model, proc = realshape.llava_15_7b(lm_layers, vision_layers, image_size=size, dtype=dtype, device=device)
        lvlm = interp.load(model, proc)
        x = lvlm.inputs([tiny.image(size, size)], [lvlm.prompt("what is this ?")])
        n_img = int(lvlm.image_mask(x["input_ids"]).sum())
        for k in (1, 4, None):
            sites = lm_sites(lvlm, k)
            if torch.device(device).type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t = median_s(lambda: trace(lvlm, x, cache=sites), 3, 1, device)
            with torch.no_grad():
                bare = median_s(lambda: lvlm.model(**x, use_cache=False), 3, 1, device)
            cache = trace(lvlm, x, cache=sites, to_cpu=True).cache
            rows.append({"image_tokens": n_img, "seq_len": int(x["input_ids"].shape[1]), "sites": len(sites),
                         "trace_s": t, "bare_s": bare, "ratio": t / bare,
                         "cache_mib": sum(v.numel() * v.element_size() for v in cache.values()) / 2 ** 20,
                         "cuda_peak_gib": (torch.cuda.max_memory_allocated() / 2 ** 30
                                           if torch.device(device).type == "cuda" else None)})
        del model, lvlm
    return rows


def demo_phases(out: Path) -> dict:
    """The demo's phases, timed inside ``report.run`` (set-up is measured outside: README)."""
    from analyses import report
    t0 = time.perf_counter()
    s = report.run("organism", out / "demo", progress=False)
    return {**s["timings"], "total_in_process_s": time.perf_counter() - t0}


def run(out: str | Path, quick: bool = False, device: str = "cpu", real_layers: int = 2,
        real: tuple[str, ...] = ("llava15", "qwen25vl")) -> dict:
    """Run every benchmark; write ``out/bench.json`` and ``out/bench.md``."""
    out = Path(out)
    res: dict = {"machine": machine(), "quick": quick, "device": device}
    m, pairs = organism_pairs(out, 40 if quick else 100)
    res["organism"] = {
        "tracing": tracing_overhead(m, pairs.clean, repeats=5 if quick else 20),
        "patching": patching_speed(m, pairs.corrupt, pairs.clean, patching.default_patches(m), pairs.correct,
                                   pairs.candidates, pairs.targets),
        "attribution": attribution_vs_exact(m, pairs.corrupt, pairs.clean, patching.default_patches(m),
                                            pairs.correct, pairs.candidates, pairs.targets),
    }
    from interp import tiny
    res["tiny"] = {}
    for name, build in tiny.BUILDERS.items():
        lvlm = interp.load(*build())
        clean, corrupt, correct, cands, targets = placement_batch(lvlm, 4, (48, 48))
        ps = [patching.Patch(f"lm.blocks.{i}", g) for i in range(2) for g in ("image", "text", "last")]
        res["tiny"][name] = {"tracing": tracing_overhead(lvlm, clean, repeats=5),
                             "patching": patching_speed(lvlm, corrupt, clean, ps, correct, cands, targets)}
    if real_layers:
        from interp import realshape
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        res["real"] = {}
        for name in real:
            spec = realshape.REAL[name]
            model, proc = spec.build(min(real_layers, spec.lm_layers), min(real_layers, spec.vision_layers),
                                     dtype=dtype, device=device)
            size = spec.image_px
            lvlm = interp.load(model, proc)
            n = 2 if quick or torch.device(device).type == "cpu" else 8
            clean, corrupt, correct, cands, targets = placement_batch(lvlm, n, size)
            n_lm = lvlm.adapter.layer_count(lvlm.model, "lm")
            ps = [patching.Patch(f"lm.blocks.{i}", g) for i in range(n_lm) for g in ("image", "text", "last")]
            r = {"lm_layers": n_lm, "dtype": str(dtype), "image_tokens": int(lvlm.image_mask(
                clean["input_ids"])[0].sum()), "tracing": tracing_overhead(lvlm, clean, repeats=3 if quick else 10)}
            r["patching"] = patching_speed(lvlm, corrupt, clean, ps, correct, cands, targets,
                                           batch_size=8 if torch.device(device).type == "cuda" else 4)
            res["real"][name] = r
            del model, lvlm
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
    res["scaling"] = scaling(device, sizes=(112, 336) if quick else (112, 336, 756),
                             dtype=torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32,
                             lm_layers=2 if torch.device(device).type == "cpu" else 8,
                             vision_layers=2 if torch.device(device).type == "cpu" else 8)
    if not quick:
        res["demo"] = demo_phases(out)
    atomic_write_text(out / "bench.json", json.dumps(res, indent=1, default=str) + "\n")
    atomic_write_text(out / "bench.md", markdown(res))
    return res


def markdown(res: dict) -> str:
    lines = [f"# Benchmark ({'quick' if res['quick'] else 'full'}, {res['device']})", "",
             f"Machine: {json.dumps(res['machine'])}", "",
             "| model | traced forward / bare forward (K sites) | batched vs per-patch loop | patches × items |",
             "|---|---|---|---|"]

    def row(name, r):
        tr = r["tracing"]
        ratios = ", ".join(f"{v:.2f}× ({k.split('_')[1]})" for k, v in tr.items() if k.endswith("sites_ratio"))
        p = r["patching"]
        lines.append(f"| {name} | {ratios} | {p['speedup']:.1f}× faster (max |Δ| {p['max_abs_diff']:.1e}) | "
                     f"{p['patches']} × {p['items']} |")
    row("organism", res["organism"])
    for k, v in res.get("tiny", {}).items():
        row(f"tiny {k}", v)
    for k, v in res.get("real", {}).items():
        row(f"{k} ({v['lm_layers']} LM layers, {v['image_tokens']} image tokens, {v['dtype']})", v)
    a = res["organism"]["attribution"]
    lines += ["", "| attribution patching (organism) | granularity | time s (exact s) | speed-up vs exact | "
              "Spearman | Spearman, \\|exact\\| ≥ 0.05 (n) | top-10 overlap |", "|---|---|---|---|---|---|---|"]
    for gran in ("patches", "positions"):
        g = a[gran]
        for name, v in g["methods"].items():
            nn = v["spearman_nonnegligible"]
            lines.append(f"| {name} | {g['n']} {gran} | {v['s']:.3f} ({g['exact_s']:.3f}) | {v['speedup']:.1f}× | "
                         f"{v['spearman']:.2f} | {'–' if nn is None else f'{nn:.2f}'} ({v['n_nonnegligible']}) | "
                         f"{v['top10_overlap']}/10 |")
    lines += ["", "| image tokens | sites | traced / bare | cache MiB | CUDA peak GiB |", "|---|---|---|---|---|"]
    for r in res["scaling"]:
        peak = f"{r['cuda_peak_gib']:.2f}" if r["cuda_peak_gib"] is not None else "–"
        lines.append(f"| {r['image_tokens']} | {r['sites']} | {r['ratio']:.2f} | {r['cache_mib']:.1f} | {peak} |")
    if "demo" in res:
        d = res["demo"]
        lines += ["", "Demo phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in d.items())]
    return "\n".join(lines) + "\n"
