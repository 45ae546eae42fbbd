"""The zoo's measurement campaign: for each (recipe, seed) get the checkpoint (train + cache on
first use) and measure it on the held-out probe; one JSON record per run (docs/zoo_runs.json).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from analyses.organisms import measure
from analyses.organisms.recipes import RECIPES
from analyses.organisms.zoo import get
from spatialbias.files import atomic_write_text

TRAINING_KEYS = ("steps", "stopped_by", "stop_rule", "running_acc", "train_seconds", "train_cpu_seconds", "grid_seconds", "loadavg_start",
                 "loadavg_end", "threads", "cpu_model", "cpu_capability", "torch", "sha256", "fingerprint")


def run_one(name: str, seed: int, cache_dir: str | Path | None = None, n_items: int = 200,
            probe_seed: int = 12345) -> dict:
    """One record: the recipe, seed, checkpoint path, the training facts from its
    ``training.json`` and the measurements (:func:`analyses.organisms.measure.measure`)."""
    path = get(name, seed, cache_dir)
    rec = json.loads((path / "training.json").read_text())
    res = measure.measure(path, n_items=n_items, seed=probe_seed, kinds=RECIPES[name].kinds)
    out = {"recipe": name, "seed": seed, "path": str(path), "probe": {"n_items": n_items, "seed": probe_seed},
           "training": {k: rec.get(k) for k in TRAINING_KEYS}, "results": res}
    if "text_stage" in rec:
        out["training"]["text_stage"] = rec["text_stage"]
    return out


def campaign(names: Sequence[str], seeds: Sequence[int], out: str | Path, cache_dir: str | Path | None = None,
             n_items: int = 200, probe_seed: int = 12345, log=print) -> list[dict]:
    """Run every (name, seed) in order and rewrite ``out`` (a JSON list) after each run, keeping
    records of other runs already in it (same recipe and seed are replaced)."""
    out = Path(out)
    records = json.loads(out.read_text()) if out.is_file() else []
    for name in names:
        for seed in seeds:
            r = run_one(name, seed, cache_dir, n_items, probe_seed)
            records = [x for x in records if (x["recipe"], x["seed"]) != (name, seed)] + [r]
            atomic_write_text(out, json.dumps(records, indent=1) + "\n")
            log(line(r))
    return records


def line(r: dict) -> str:
    """One-line summary of a record."""
    t = r["training"]
    parts = [f"{r['recipe']} seed {r['seed']}: {t['steps']} steps, {t['train_seconds']:.0f} s"]
    for kind, conds in r["results"].items():
        for c, v in conds.items():
            parts.append(f"{kind}/{c} acc {v['mean_accuracy']:.3f} range {v['range']:.3f} (p {v['chi2_p']:.2g})")
    return "; ".join(parts)


def _cell(v: dict) -> str:
    return f"{v['range']:.3f} [{v['chi2_p']:.2g}]"


def markdown_table(records: list[dict]) -> str:
    """One row per (recipe, seed, question): steps, wall / CPU seconds (1-minute load average at
    the start), final running training accuracy, mean accuracy and range [chi-square p] under
    the baseline and BaPA, the Cochran–Armitage trend z (accuracy against cell index 0..8) under
    baseline, BaPA and BaPA with the image tokens reversed, and BaPA keep_hw on M-RoPE."""
    head = ("| organism | seed | steps | train s wall / CPU (load) | train acc | question | baseline acc | "
            "baseline range [χ² p] | BaPA acc | BaPA range [χ² p] | trend z: base / BaPA / BaPA+rev | other |")
    rows = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for r in sorted(records, key=lambda x: (list(RECIPES).index(x["recipe"]) if x["recipe"] in RECIPES else 99,
                                            x["seed"])):
        t = r["training"]
        acc = t["running_acc"]
        acc = "/".join(f"{a:.2f}" for a in acc.values()) if isinstance(acc, dict) else f"{acc:.2f}"
        load = t["loadavg_start"][0] if t.get("loadavg_start") else float("nan")
        cpu = t.get("train_cpu_seconds")
        time_s = f"{t['train_seconds']:.0f} / {cpu:.0f} ({load:.1f})" if cpu is not None else f"{t['train_seconds']:.0f} ({load:.1f})"
        for kind, conds in r["results"].items():
            b, p = conds["baseline"], conds["bapa"]
            other = "; ".join(f"{c}: {v['mean_accuracy']:.3f}, {_cell(v)}" for c, v in conds.items()
                              if c in ("bapa_keep_hw",))
            z = " / ".join(f"{conds[c]['trend']['z']:+.1f}" if c in conds else "–"
                           for c in ("baseline", "bapa", "bapa_reversed"))
            rows.append(f"| {r['recipe']} | {r['seed']} | {t['steps']} | {time_s} | {acc} | {kind} | "
                        f"{b['mean_accuracy']:.3f} | {_cell(b)} | {p['mean_accuracy']:.3f} | {_cell(p)} | {z} | {other} |")
    return "\n".join(rows)
