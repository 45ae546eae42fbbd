"""``spatialbias zoo``: every organism × seed through the plan / runner / store machinery, then
one table (and one figure) of what the toolkit diagnoses against what was planted.

Role: the zoo campaign as a sweep. May import: ``spatialbias``, ``interp.load``, ``analyses.{plan,
runner, summary, diagnosis, figures}``, ``analyses.organisms.{recipes, zoo}``. The organisms are the
plan's models (``{recipe}-s{seed}``, each its checkpoint folder from :func:`zoo.get`), the probe
is the organisms' 48 px shapes probe (one for all: every organism, the M-RoPE one included,
reads 48 px images), the interventions baseline, BaPA and AGCI λ, the analyses eval (every
condition) and patching (baseline and BaPA: activation, position-id and the vision-side "moved"
patch); an organism whose LM takes M-RoPE ids (its adapter's ``rope_kind`` on its checkpoint's
config) is also evaluated under BaPA's ``keep_hw`` variant (:data:`KEEP_HW`). The runner resumes a
killed run and runs on Ray (``executor="ray"``).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import numpy as np
import pandas as pd

from analyses.diagnosis import LM_IDS, NONE, ORDER, VISION, VISION_CODE, diagnose, kind
from analyses.organisms.recipes import RECIPES
from spatialbias.errors import SpatialBiasError
from spatialbias.files import atomic_write_text

LAMBDAS = (0.25, 0.5, 1.0, 2.0)
PATCH_CELLS = [8, 0]
"""Clean and corrupt cell of the causal analyses: the skew's most and least frequent training
cells (row-major weights 1², …, 9²), the same pair for every organism (an organism without a
bias has no gap there, and its diagnosis is decided by the χ² test before any ratio is read)."""
PROBE = {"build": "shapes", "seed": 12345, "cell_px": 16}
PLAN_SEED = 0
"""The zoo plan's one seed (its bootstrap and sampling seed; an organism's own training seed is in
its name, ``{recipe}-s{seed}``): every organism is diagnosed on this seed's rows."""
EXPECTED: dict[str, set | None] = {
    "planted-lm": {LM_IDS}, "learned-absolute": {LM_IDS}, "mrope": {LM_IDS},
    "planted-vision": {VISION, VISION_CODE}, "planted-order": {ORDER},
    "uniform": {NONE}, "where": {NONE}, "lora": {NONE, LM_IDS}, "lora-bapa": {NONE, LM_IDS}, "recency": None,
    "deepstack": {LM_IDS},
}
"""Per recipe, the diagnoses (label kinds, :func:`analyses.diagnosis.kind`) its construction allows —
None: exploratory, not scored. Every organism is diagnosed under ordinary ids (baseline), as a
user's checkpoint would be. See docs/diagnosis_preregistration.md."""
PLANTED = {"planted-lm": "LM position ids (RoPE)", "learned-absolute": "LM position ids (learned absolute)",
           "mrope": "LM position ids (M-RoPE)", "planted-vision": "vision tower / projector",
           "planted-order": "LM token order (trained under BaPA)", "uniform": "none", "where": "none",
           "lora": "planted-lm, LoRA on uniform data", "lora-bapa": "planted-lm, LoRA+BaPA on uniform data",
           "recency": "exploratory: LM text prior", "deepstack": "LM position ids (interleaved M-RoPE; DeepStack)"}


def mapping(models: dict[str, str], items: int, causal_items: int, lambdas: Sequence[float] = LAMBDAS,
            batch_size: int = 64) -> dict:
    """The sweep mapping of a zoo run: ``models`` name → checkpoint folder."""
    return {"seeds": [PLAN_SEED], "batch_size": batch_size, "causal_items": causal_items,
            "patch_cells": list(PATCH_CELLS), "analyses": ["eval", "patching"],
            "models": {name: {"path": str(path), "probes": ["shapes"]} for name, path in models.items()},
            "probes": {"shapes": {**PROBE, "n": items}},
            "interventions": {"baseline": True, "bapa": ["reference"], "agci": [float(x) for x in lambdas]},
            "analysis": {"patching": {"interventions": ["baseline", "bapa"]}}}


KEEP_HW = "bapa:keep_hw"
"""BaPA's variant that collapses only the temporal row of M-RoPE ids (the image tokens keep their
row / column offsets): evaluated on the M-RoPE organisms beside the reference BaPA."""


def rope_kind(path: str | Path) -> str:
    """``"1d"``, ``"mrope"`` or ``"none"``: the position ids of a checkpoint's LM, as its adapter's
    :meth:`~interp.adapters.Adapter.rope_kind` reads them from its ``config.json`` (no weights
    loaded; the method reads only ``model.config``)."""
    from interp.load import read_config
    cfg, adapter = read_config(str(path))
    return adapter.rope_kind(SimpleNamespace(config=cfg))


def plan(models: dict[str, str], items: int, causal_items: int, lambdas: Sequence[float], out: Path):
    """The zoo run's plan: :func:`mapping` for every organism, plus eval under :data:`KEEP_HW` for
    those whose LM takes M-RoPE ids (``config`` records that mapping under ``keep_hw``)."""
    from analyses import plan as planmod
    full = planmod.from_mapping(mapping(models, items, causal_items, lambdas), Path.cwd(), out, "spatialbias zoo")
    mrope = {name: path for name, path in models.items() if rope_kind(path) == "mrope"}
    if not mrope:
        return full
    extra_map = {**mapping(mrope, items, causal_items, lambdas), "analyses": ["eval"],
                 "interventions": {"baseline": False, "conditions": [KEEP_HW]}}
    del extra_map["analysis"]
    extra = planmod.from_mapping(extra_map, Path.cwd(), out, "spatialbias zoo")
    return dataclasses.replace(full, conditions=full.conditions + extra.conditions,
                               config={**full.config, "keep_hw": extra.config})


def organisms(recipes: Sequence[str], seeds: Sequence[int], cache_dir=None, log=print) -> dict[str, str]:
    """``{recipe}-s{seed}`` → checkpoint folder (shipped, cached, or trained now and cached)."""
    from analyses.organisms.zoo import get
    bad = [r for r in recipes if r not in RECIPES]
    if bad:
        raise SpatialBiasError(f"unknown organism(s) {', '.join(bad)}; the zoo has {', '.join(RECIPES)}")
    out = {}
    for r in recipes:
        for s in seeds:
            out[f"{r}-s{s}"] = str(get(r, s, cache_dir))
            log(f"{r} seed {s}: {out[f'{r}-s{s}']}")
    return out


def run(out: str | Path, recipes: Sequence[str], seeds: Sequence[int], items: int = 200, causal_items: int = 50,
        lambdas: Sequence[float] = LAMBDAS, executor: str = "local", cache_dir=None, progress: bool = True,
        log=print) -> pd.DataFrame:
    """Get the organisms, run the plan into ``out`` (resumable), write ``zoo.{parquet,csv,md}``,
    ``summary.json`` and the figure ``figures/zoo_diagnosis.{png,svg}``; returns the table."""
    from analyses import runner
    out = Path(out)
    models = organisms(recipes, seeds, cache_dir, log)
    res = runner.run(plan(models, items, causal_items, lambdas, out), out, executor=executor, progress=progress)
    if res["failed"]:
        raise SpatialBiasError(f"{len(res['failed'])} zoo condition(s) failed, first: {res['failed'][0][1]}; see "
                               f"{out}/failed.json, fix and run the same command again (finished ones are kept)")
    df = pd.read_parquet(out / "results.parquet")
    tab = table(df, models)
    write(tab, out)
    from analyses.summary import build
    atomic_write_text(out / "summary.json", json.dumps(build(out, df), indent=1, default=str) + "\n")
    return tab


def _training(path: str) -> dict:
    p = Path(path) / "training.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def _get(d: pd.DataFrame, iv: str, metric: str) -> pd.Series | None:
    x = d[(d.analysis == "eval") & (d.intervention == iv) & (d.metric == metric) & d.cell.isna()]
    return None if x.empty else x.iloc[0]


def table(df: pd.DataFrame, models: dict[str, str]) -> pd.DataFrame:
    """One row per organism × seed: what was planted, baseline / BaPA / best AGCI range (with
    intervals) and accuracy, the two restorations under the diagnosed condition, the diagnosis
    and whether it matches the construction; for a model diagnosed under BaPA also its diagnosis
    under baseline ids (off its training distribution, shown, not scored)."""
    rows = []
    for name, path in models.items():
        rec = _training(path)
        recipe, seed = rec.get("recipe", name.rsplit("-s", 1)[0]), rec.get("seed", int(name.rsplit("-s", 1)[1]))
        d = df[(df.model == name) & (df.seed == PLAN_SEED)]
        probe = d.probe.iloc[0]
        dg = diagnose(df, name, probe, "baseline", seed=PLAN_SEED)
        b_rng, b_acc = _get(d, "baseline", "range"), _get(d, "baseline", "mean_accuracy")
        p_rng, p_acc = _get(d, "bapa", "range"), _get(d, "bapa", "mean_accuracy")
        k_rng, k_acc = _get(d, KEEP_HW, "range"), _get(d, KEEP_HW, "mean_accuracy")
        agci = [(iv, _get(d, iv, "range"), _get(d, iv, "mean_accuracy")) for iv in d.intervention.unique()
                if str(iv).startswith("agci:")]
        best = min(agci, key=lambda t: t[1].value) if agci else None
        exp = EXPECTED.get(recipe)
        match = "n/a (exploratory)" if exp is None else ("yes" if kind(dg["label"]) in exp else "no")
        comps = dg["components"]
        rows.append({
            "organism": recipe, "seed": seed, "planted": PLANTED.get(recipe, "?"), "condition": dg["condition"],
            "baseline_acc": b_acc.value, "baseline_range": b_rng.value, "baseline_range_lo": b_rng.ci_low,
            "baseline_range_hi": b_rng.ci_high, "baseline_chi2_p": _get(d, "baseline", "chi2_p").value,
            "bapa_acc": p_acc.value, "bapa_range": p_rng.value, "bapa_range_lo": p_rng.ci_low,
            "bapa_range_hi": p_rng.ci_high, "bapa_chi2_p": _get(d, "bapa", "chi2_p").value,
            "keep_hw_acc": np.nan if k_acc is None else k_acc.value,
            **{f"keep_hw_range{s}": np.nan if k_rng is None else getattr(k_rng, v)
               for s, v in (("", "value"), ("_lo", "ci_low"), ("_hi", "ci_high"))},
            "agci_best": best[0] if best else None, "agci_best_range": best[1].value if best else np.nan,
            "agci_best_acc_cost": (b_acc.value - best[2].value) if best else np.nan,
            "condition_p": dg["p"],
            **{f"{k}{s}": (comps.get(c) or {}).get(v, np.nan)
               for k, c in (("position", "P"), ("vision", "V"), ("vision_code", "Q"), ("joint", "J"))
               for s, v in (("", "value"), ("_lo", "ci_low"), ("_hi", "ci_high"))},
            "diagnosis": dg["label"], "matches": match})
    return pd.DataFrame(rows)


def _ci(v, lo, hi, fmt=".3f") -> str:
    if v is None or pd.isna(v):
        return "–"
    return f"{v:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]" if pd.notna(lo) and pd.notna(hi) else f"{v:{fmt}}"


def markdown(tab: pd.DataFrame) -> str:
    """The zoo table in markdown (restorations are shares of the clean − corrupt gap)."""
    head = ("| organism | seed | planted | baseline acc | baseline range [95% CI] (χ² p) | BaPA range [CI] (acc) | "
            "BaPA keep_hw range [CI] (acc; M-RoPE) | best AGCI range (λ, accuracy cost) | diagnosed under | "
            "position-id restoration [CI] | vision-side restoration [CI] | diagnosis | matches construction |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in tab.itertuples():
        keep_hw = "–" if pd.isna(r.keep_hw_range) else \
            f"{_ci(r.keep_hw_range, r.keep_hw_range_lo, r.keep_hw_range_hi)} ({r.keep_hw_acc:.3f})"
        agci = "–" if r.agci_best is None else f"{r.agci_best_range:.3f} ({r.agci_best.split(':')[1]}, {r.agci_best_acc_cost:+.3f})"
        diag = r.diagnosis
        out.append(f"| {r.organism} | {r.seed} | {r.planted} | {r.baseline_acc:.3f} | "
                   f"{_ci(r.baseline_range, r.baseline_range_lo, r.baseline_range_hi)} ({r.baseline_chi2_p:.2g}) | "
                   f"{_ci(r.bapa_range, r.bapa_range_lo, r.bapa_range_hi)} ({r.bapa_acc:.3f}) | {keep_hw} | {agci} | "
                   f"{r.condition} | "
                   f"{_ci(r.position, r.position_lo, r.position_hi, '.2f')} | "
                   f"{_ci(r.vision, r.vision_lo, r.vision_hi, '.2f')} | {diag} | {r.matches} |")
    return "\n".join(out) + "\n"


def write(tab: pd.DataFrame, out: Path) -> None:
    """``zoo.parquet``, ``zoo.csv``, ``zoo.md`` and ``figures/zoo_diagnosis.{png,svg}`` in ``out``."""
    from analyses import figures
    tab.to_parquet(out / "zoo.parquet", index=False)
    atomic_write_text(out / "zoo.csv", tab.to_csv(index=False))
    atomic_write_text(out / "zoo.md", markdown(tab))
    figures.save(figures.zoo_diagnosis(tab), out / "figures", "zoo_diagnosis")
