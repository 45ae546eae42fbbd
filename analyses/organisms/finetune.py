"""``spatialbias finetune``: the paper's lightweight fine-tuning on the planted-lm organism —
no fine-tuning vs LoRA vs LoRA with BaPA active — scored on one probe through the sweep runner.

Role: a thin command over the zoo's ``lora`` / ``lora-bapa`` recipes (peft LoRA r 8 on the LM's
attention and MLP projections, uniform target cells, ``steps`` steps). May import:
``spatialbias``, ``analyses.{plan, runner, report}``, ``analyses.organisms.{recipes, train, zoo}``.

Writes into ``out``: ``lora/`` and ``lora-bapa/`` (each an ordinary checkpoint folder that
``interp.load`` reads — the LoRA merged into the weights — with the peft adapter itself in
``adapter/`` and ``training.json``), the run (``results.parquet``, ``summary.json``,
``index.html``: the report), and ``finetune.{parquet,csv,md}``: per arm × inference condition
(baseline, BaPA) mean accuracy and range across cells with item-bootstrap 95 % intervals and
the χ² p.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd

from analyses.organisms.recipes import RECIPES
from spatialbias.errors import SpatialBiasError
from spatialbias.files import atomic_write_text

ARMS = ("lora", "lora-bapa")


def arm_checkpoint(arm: str, seed: int, steps: int, out: Path, cache_dir=None) -> Path:
    """``out/arm``: the recipe's checkpoint (cached by :func:`zoo.get` at its own step count, else
    trained here for ``steps`` steps on one thread), with its adapter."""
    from analyses.organisms import train
    from analyses.organisms.zoo import get, train_recipe
    dest = out / arm
    if (dest / "training.json").is_file():
        rec = json.loads((dest / "training.json").read_text())
        if (rec.get("seed"), rec.get("config", {}).get("max_steps")) != (seed, steps):
            raise SpatialBiasError(f"{dest} was fine-tuned with seed {rec.get('seed')} for "
                                   f"{rec.get('config', {}).get('max_steps')} steps, not seed {seed} for {steps}; "
                                   "use another --out")
        return dest
    recipe = RECIPES[arm]
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if steps == recipe.max_steps:
        shutil.copytree(get(arm, seed, cache_dir), tmp)
    else:
        get(recipe.base, seed, cache_dir)  # the base, shipped or cached
        recipe = recipe.with_(max_steps=steps, warmup=min(recipe.warmup, max(1, steps // 10)))
        model, proc, record, peft_model = train_recipe(recipe, seed=seed, threads=1, progress=False)
        train.save(model, proc, record, tmp, peft_model)
    if not (tmp / "adapter" / "adapter_config.json").is_file():
        raise SpatialBiasError(f"{tmp}: no LoRA adapter was saved; delete {out} and run again")
    tmp.rename(dest)
    return dest


def run(out: str | Path, seed: int = 0, steps: int = 300, items: int = 200, cache_dir=None,
        progress: bool = True) -> pd.DataFrame:
    """The three arms on the organisms' 48 px shapes probe (seed 12345), baseline and BaPA."""
    from analyses import plan as planmod
    from analyses import report, runner
    from analyses.organisms.zoo import get
    if steps < 1:
        raise SpatialBiasError(f"--steps {steps}: give a positive number of fine-tuning steps")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    models = {"no-finetune": str(get("planted-lm", seed, cache_dir))}
    models.update({arm: str(arm_checkpoint(arm, seed, steps, out, cache_dir)) for arm in ARMS})
    cfg = {"seeds": [0], "analyses": ["eval"], "models": models,
           "probes": {"shapes": {"build": "shapes", "seed": 12345, "cell_px": 16, "n": items}},
           "interventions": {"baseline": True, "bapa": ["reference"]}}
    plan = planmod.from_mapping(cfg, Path.cwd(), out, "spatialbias finetune")
    res = runner.run(plan, out, progress=progress)
    if res["failed"]:
        raise SpatialBiasError(f"finetune: {res['failed'][0][1]}")
    report.build(out)
    tab = table(pd.read_parquet(out / "results.parquet"))
    tab.to_parquet(out / "finetune.parquet", index=False)
    atomic_write_text(out / "finetune.csv", tab.to_csv(index=False))
    atomic_write_text(out / "finetune.md", markdown(tab, seed, steps))
    return tab


def table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per arm × condition: accuracy and range with intervals, χ² p."""
    rows = []
    for (arm, iv), d in df[(df.analysis == "eval") & df.cell.isna()].groupby(["model", "intervention"], sort=False):
        g = d.set_index("metric")
        rows.append({"arm": arm, "condition": iv, "accuracy": g.loc["mean_accuracy", "value"],
                     "accuracy_lo": g.loc["mean_accuracy", "ci_low"], "accuracy_hi": g.loc["mean_accuracy", "ci_high"],
                     "range": g.loc["range", "value"], "range_lo": g.loc["range", "ci_low"],
                     "range_hi": g.loc["range", "ci_high"], "chi2_p": g.loc["chi2_p", "value"]})
    return pd.DataFrame(rows)


def markdown(tab: pd.DataFrame, seed: int, steps: int) -> str:
    head = "| arm | inference | accuracy [95% CI] | range [95% CI] | χ² p |\n|---|---|---|---|---|\n"
    return (f"planted-lm seed {seed}; LoRA {steps} steps on uniform target cells\n\n" + head + "".join(
        f"| {r.arm} | {r.condition} | {r.accuracy:.3f} [{r.accuracy_lo:.3f}, {r.accuracy_hi:.3f}] | "
        f"{r.range:.3f} [{r.range_lo:.3f}, {r.range_hi:.3f}] | {r.chi2_p:.2g} |\n" for r in tab.itertuples()))
