"""``patching``: activation patching in both directions at every default patch (site × token
group), the vision-side "moved" patch (``restoration_denoise`` at ``lm.input``, group ``moved``:
the target's clean image tokens in the corrupt cell's slots, position ids kept), the joint patch
(group ``joint``: moved with their clean ids), the vision-side position patch (site
``vision.embed``, group ``vision_position``: the vision tower's position code of the two cells
swapped) and position-id patching, between the condition's clean and corrupt cells — the
components of :mod:`analyses.diagnosis`. Every ratio is gated by the gap (``gap``, ``gap_read``:
:func:`analyses.causal.gate`). With ``screen`` K, attribution ranks
the patches and only the top K are patched exactly (the rest are ``screen_estimate_*`` rows)."""
from __future__ import annotations

import pandas as pd

from analyses import causal
from analyses.registry import Analysis, FigureSpec, Section, having, model_probes, register, stem
from analyses.tasks import Context, pair_rows, pairs_of, patched_count, rng_of
from spatialbias.errors import SpatialBiasError


def run(lvlm, cond, ctx: Context):
    pairs, ivs, rng = pairs_of(lvlm, cond, ctx), cond.build(), rng_of(cond)
    patch_rows = ctx.rows(lvlm, "patching", pairs.clean, "patching")
    screen = cond.options.get("screen")
    screen_rows = ctx.rows(lvlm, "attribution", pairs.clean, "patching --screen") if screen else None
    act = causal.activation_items(lvlm, pairs, ivs, batch_size=patch_rows, progress=ctx.progress, screen=screen,
                                  screen_batch_size=screen_rows)
    fwd = ctx.rows(lvlm, "forward", pairs.clean, "patching")
    act = pd.concat([act, causal.moved_items(lvlm, pairs, ivs, patch_rows), causal.joint_items(lvlm, pairs, ivs,
                                                                                               patch_rows),
                     causal.vision_position_items(lvlm, pairs, ivs, fwd)], ignore_index=True)
    pos = causal.position_items(lvlm, pairs, ivs, batch_size=fwd)
    rows = causal.gate(causal.restoration_rows(act, rng) + causal.position_rows(pos, rng)
                       + causal.interaction_rows(act, pos, rng), causal.gap_rows(act, rng))
    return rows + pair_rows(pairs), pd.concat([act.assign(kind="activation"), pos.assign(kind="position")],
                                              ignore_index=True)


def causal_sizes(cond, probe_rows: int, items: int) -> tuple[int, int, int]:
    """(placements per item, items the condition uses, forward rows of the baseline pass that
    picks the cells on the held-out items when they are "auto") — what the cost of every causal
    analysis starts from."""
    cells = max(1, round(probe_rows / max(items, 1)))
    auto = cond.options.get("cells") == "auto"
    n = patched_count(items, cond.options.get("items", 20)) if auto else min(cond.options.get("items", 20), items)
    return cells, n, cells * (items - n) if auto else 0


def cost(cond, probe_rows: int, items: int, lm_layers: int) -> int:
    """Both directions of every default patch (vision blocks, projector, lm.input and the LM blocks
    × 4 groups) with their clean and corrupt runs, position ids (all and per layer), the moved patch
    (3 rows); with ``screen`` K, each direction's attribution (2 rows) and K exact patches instead."""
    _, n, auto = causal_sizes(cond, probe_rows, items)
    patches = 4 * lm_layers + 6
    k = cond.options.get("screen")
    act = 2 * (patches + 2) if k is None else 2 * (2 + min(k, patches) + 2)
    return n * (act + 2 * (lm_layers + 2) + 3 + 3 + 3) + auto  # + the joint patch and the vision position patch


def profile(opts: dict):
    """Exact patching keeps every block's residual stream of the captured items; ``screen`` adds an
    attribution step (a backward pass), so both profiles bound it."""
    return ("patching", "attribution") if opts.get("screen") is not None else "patching"


def check(opts: dict, where: str) -> dict:
    k = opts.pop("screen")  # absent at its default (None: exact patching), so earlier ids stay
    if k is not None:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise SpatialBiasError(f"{where}: [analysis.patching] screen must be a positive integer (patches "
                                   f"confirmed exactly), got {k!r}")
        opts["screen"] = k
    return opts


def summary(p: pd.DataFrame, order: list[str]) -> dict:
    """``patching``: per intervention its restorations (direction, site, group) and the clean and
    corrupt logit differences; ``position_patching``: position-id restoration and damage, all
    layers and per layer."""
    from analyses.blocks import vci
    ivs = [iv for iv in order if iv in set(p.intervention)]
    return {
        "patching": {iv: {
            "restoration": [{"direction": r.metric.split("_")[1], "site": r.site, "group": r.group,
                             **vci(r._asdict())}
                            for r in p[(p.intervention == iv) & p.metric.str.startswith("restoration_")].itertuples()],
            **{m: vci(p[(p.intervention == iv) & (p.metric == m)].iloc[0]) for m in ("logit_diff_clean",
                                                                                    "logit_diff_corrupt")}}
            for iv in ivs},
        "position_patching": {iv: [
            {"layers": "all" if pd.isna(r.layer) else int(r.layer), "what": r.metric.split("_")[1], **vci(r._asdict())}
            for r in p[(p.intervention == iv) & p.metric.str.startswith("position_")].itertuples()] for iv in ivs}}


def claims(run: dict) -> list:
    from analyses.blocks import position_of, restoration_of
    c, out = run["causal"], []
    cells = c.get("cells", {})
    for iv, p in c.get("patching", {}).items():
        out += [(f"answer logit difference, target in cell {cells.get('clean')} (clean)", iv, p["logit_diff_clean"]),
                (f"answer logit difference, target in cell {cells.get('corrupt')} (corrupt)", iv,
                 p["logit_diff_corrupt"]),
                ("P, position-id patching, all layers (the target's and the other cell's ids swapped): share of the "
                 "gap restored", iv,
                 position_of(run, iv, "all", "restoration")),
                ("converse position-id swap on the clean run: share of the gap removed", iv,
                 position_of(run, iv, "all", "damage"))]
        out += [(f"position-id patching, layer {r['layers']} alone", iv, r)
                for r in c.get("position_patching", {}).get(iv, []) if r["layers"] != "all" and r["what"] == "restoration"]
        out += [("the target cell's tokens at the LM input (denoising restoration; near 100 % by construction: "
                 "every later difference flows from them)", iv, restoration_of(run, iv, "lm.input", "target")),
                ("V, vision side: the target's clean image tokens moved into the corrupt cell's slots, position "
                 "ids kept (share of the gap)", iv, restoration_of(run, iv, "lm.input", "moved")),
                ("Q, vision position code: the vision tower's position embeddings of the two cells swapped (share "
                 "of the gap)", iv, restoration_of(run, iv, "vision.embed", "vision_position")),
                ("J, joint: the moved tokens with the clean ids too (share of the gap; 1 − J: token order)", iv,
                 restoration_of(run, iv, "lm.input", "joint"))]
    return out


def figures(df, tables) -> list[FigureSpec]:
    """The causal graph of each (model, probe) in the verdict (the report opens with it), the
    restoration heatmaps and the position-id restorations in their sections."""
    from analyses.blocks import runs
    graph = [FigureSpec("verdict", stem("causal_graph_", m, p), "causal_graph", {"model": m, "probe": p},
                        f"{m} · {p}") for m, p in runs(having(df, "patching", "gap"))]
    specs = graph + [FigureSpec("patching", stem(f"restoration_{direction}_", m, p), "restoration_heatmaps",
                        {"model": m, "probe": p, "direction": direction}, f"{direction} · {m} · {p}")
             for direction in ("denoise", "noise")
             for m, p in model_probes(having(df, "patching", f"restoration_{direction}"))]
    return specs + [FigureSpec("position-patching", stem("position_restoration_", m, p), "position_restoration",
                               {"model": m, "probe": p}, f"{m} · {p}")
                    for m, p in model_probes(having(df, "patching", "position_restoration"))]


PATCHING = register(Analysis(
    "patching", run, cost, options={"items": None, "cells": None, "screen": None}, check=check, profile=profile,
    causal=True, summary=summary, claims=claims, figures=figures,
    sections=(Section("patching", "Activation patching", "Normalised restoration of the clean − corrupt logit "
                      "difference per site × token group, between the baseline's best and worst cell."),
              Section("position-patching", "Position-id patching", "Share of the gap restored by giving the target's "
                      "image tokens their clean position ids, all layers and per layer."))))
