"""What the benchmarks share: timing (medians after warm-up, CUDA synchronised), the machine
record, the two-placement batch and the organism's cell pairs, real-shape models (random weights),
and the batched-vs-looped patching comparison (:func:`patching_speed`) that ``spatialbias bench``,
its ``speed`` section and :mod:`analyses.bench.gpu_patching` run.
"""
from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

import interp
from interp import patching
from interp.model import LVLM


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_s(fn: Callable, repeats: int = 5, warmup: int = 1, device="cpu") -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def machine() -> dict:
    d = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or
         platform.machine(), "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        d["gpu"] = torch.cuda.get_device_name()
    return d


def placement_batch(lvlm: LVLM, n: int, size: tuple[int, int] = (336, 336)):
    """n items as two placements (the image and its mirror), with the tiny vocabulary's answers."""
    from interp import tiny
    imgs = [tiny.image(*size, seed=s) for s in range(n)]
    q = lvlm.prompt("what is this ?")
    clean = lvlm.inputs(imgs, [q] * n)
    corrupt = lvlm.inputs([im.transpose(0) for im in imgs], [q] * n)
    cands = [lvlm.tokenizer.convert_tokens_to_ids(w) for w in ("cat", "dog", "red")]
    correct = torch.tensor([cands[i % 3] for i in range(n)])
    return clean, corrupt, correct, cands, [(0, 8)] * n


def organism_pairs(out: Path, n: int = 100):
    from analyses.causal import placement_pairs
    from probes.build import shapes_probe
    m = interp.load("organism")
    probe = shapes_probe(out / "probe", n_items=n, seed=0, progress=False).parent
    return m, placement_pairs(m, probe, 8, 0, n_items=n)


def real_model(name: str, layers: int, dtype=torch.bfloat16, device: str = "cpu", vision_layers: int | None = None):
    """(LVLM, image size) of a real-shape model with ``layers`` LM layers and as many vision
    blocks (at most the real count; random weights)."""
    from interp import realshape
    spec = realshape.REAL[name]
    model, proc = spec.build(layers, vision_layers or min(layers, spec.vision_layers), dtype=dtype, device=device)
    return interp.load(model, proc), spec.image_px


def _loop_patching(lvlm: LVLM, base, source, patches, correct, cands, targets, last_only: bool = False) -> torch.Tensor:
    """What one writes by hand: per item, cache the source activations, then one forward per patch.
    Returns (patches, items) metrics. ``last_only``: every forward computes the head at the last
    position only (``logits_to_keep=1``) instead of over all positions, as a careful loop would.
    An LM-side patch also takes the source's features of the injections still to come at its image
    tokens (DeepStack, as the engine does: :func:`interp.patching.core.injection_edits`); one row per
    forward, so an injection's (T, D) features are that row's image tokens in sequence order."""
    from interp.dispatch import forward
    from interp.patching.core import injection_start
    inj = lvlm.adapter.injections(lvlm.model)
    sites = sorted({p.site for p in patches} | set(inj.values()))
    N = base["input_ids"].shape[0]
    vals = torch.empty(len(patches), N)
    for i in range(N):
        b = lvlm.rows(base, [i])
        s = lvlm.rows(source, [i])
        cache = forward(lvlm, s, cache=sites, last_only=last_only).cache
        masks = patching.group_masks(lvlm, b, [targets[i]])
        image = lvlm.image_mask(b["input_ids"])[0]
        for j, p in enumerate(patches):
            src = cache[p.site]
            if p.group == "all" or not (p.site.startswith("lm.") or p.site == "unembed"):
                edit = {p.site: lambda x, v=src: v.clone()}
            else:
                edit = {p.site: lambda x, v=src, mk=masks[p.group]: torch.where(mk[..., None], v, x)}
            k0 = injection_start(lvlm, p.site)
            moved = (masks[p.group][0] if p.group != "all" else torch.ones_like(image))[image]  # per image token
            for k, site in inj.items():
                if k0 is not None and k >= k0:
                    edit[site] = lambda x, v=cache[site], mk=moved: torch.where(mk[:, None].to(x.device), v, x)
            lg = forward(lvlm, b, edits=edit, last_only=last_only).logits[:, -1]
            vals[j, i] = patching.logit_diff(lg, correct[i:i + 1].to(lg.device), cands)[0]
    return vals


def patching_speed(lvlm: LVLM, base, source, patches, correct, cands, targets, batch_size: int = 64,
                   loop_last_only: bool = False) -> dict:
    """The batched engine (:func:`interp.patching.run_patches`) vs :func:`_loop_patching` on the same
    patches and items, in that order, each timed once (s); outputs asserted equal (fp32: 1e-3,
    else 0.25 logit-difference units). ``loop_last_only``: the loop's forwards compute the head at
    the last position only."""
    dev = lvlm.device
    t0 = time.perf_counter()
    df = patching.run_patches(lvlm, base, source, patches, correct, cands, targets, batch_size=batch_size)
    _sync(dev)
    batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    loop = _loop_patching(lvlm, base, source, patches, correct, cands, targets, last_only=loop_last_only)
    _sync(dev)
    looped = time.perf_counter() - t0
    got = torch.tensor([[df[(df.item == i) & (df.site == p.site) & (df.group == p.group)].metric.iloc[0]
                         for i in range(loop.shape[1])] for p in patches], dtype=torch.float32)
    err = float((got - loop).abs().max())
    tol = 1e-3 if next(lvlm.model.parameters()).dtype == torch.float32 else 0.25
    if err > tol:
        raise AssertionError(f"batched and looped patching disagree by {err}")
    return {"patches": len(patches), "items": loop.shape[1], "batched_s": batched, "loop_s": looped,
            "speedup": looped / batched, "max_abs_diff": err, "loop_last_only": loop_last_only}
