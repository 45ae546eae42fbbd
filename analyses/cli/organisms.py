"""``spatialbias organism train``, ``zoo`` and ``finetune``: the model organisms
(:mod:`analyses.organisms`)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from analyses.cli.base import THREADS_HELP, _threads, app, clean_errors, organism_app
from spatialbias.errors import SpatialBiasError


@organism_app.command("train")
@clean_errors
def organism_train(out: Path = typer.Option(..., help="Output checkpoint folder."),
                   recipe: str = typer.Option("planted-lm", help="Zoo recipe (analyses/organisms/recipes.py); "
                                              "planted-lm is the shipped organism."),
                   seed: int = typer.Option(0, help="Seed (the shipped checkpoint used 0 with 1 thread)."),
                   threads: int = typer.Option(1, help="torch threads; bit-for-bit reproduction needs the same count."),
                   max_steps: Optional[int] = typer.Option(None, help="Upper bound on steps (default: the recipe's; "
                                                           "most recipes stop at 80% running accuracy).")):
    """Train an organism of the zoo from scratch (planted-lm: about a minute on one CPU thread)."""
    from analyses.organisms import train as tr
    from analyses.organisms.recipes import RECIPES
    from analyses.organisms.zoo import train_recipe
    if recipe not in RECIPES:
        raise SpatialBiasError(f"unknown recipe {recipe!r}; the zoo has {', '.join(RECIPES)}")
    rec = RECIPES[recipe] if max_steps is None else RECIPES[recipe].with_(max_steps=max_steps)
    model, proc, record, peft_model = train_recipe(rec, seed=seed, threads=threads)
    path = tr.save(model, proc, record, out, peft_model)
    typer.echo(f"wrote {path} after {record['steps']} steps (running accuracy {json_acc(record['running_acc'])}); "
               f"sha256 {tr.sha256(path / 'model.safetensors')}")


def json_acc(acc) -> str:
    """A running accuracy, or one per question kind."""
    return ", ".join(f"{k} {v:.3f}" for k, v in acc.items()) if isinstance(acc, dict) else f"{acc:.3f}"


@app.command("zoo")
@clean_errors
def zoo(out: Path = typer.Option(..., help="Run folder (resumable): results.parquet, zoo.parquet/.csv/.md, "
                                 "summary.json, figures/zoo_diagnosis.png/.svg."),
        recipes: str = typer.Option("all", help="Comma-separated organisms (analyses/organisms/recipes.py) or 'all'."),
        seeds: str = typer.Option("0,1,2", help="Comma-separated training seeds of each organism."),
        items: int = typer.Option(200, help="Probe items (each at all 9 cells) of the eval conditions."),
        causal_items: int = typer.Option(50, help="Items of the patching analysis (cells 8 → 0)."),
        lambdas: str = typer.Option("0.25,0.5,1,2", help="AGCI λ values."),
        executor: str = typer.Option("local", help="'local' or 'ray'."),
        cache: Optional[Path] = typer.Option(None, help="Cache folder for trained organisms "
                                             "(default $SPATIALBIAS_CACHE or ~/.cache/spatialbias)."),
        threads: Optional[int] = typer.Option(None, help=THREADS_HELP)):
    """Organism zoo: train or load each organism, run eval (baseline, BaPA, AGCI) and patching
    (activation, position-id, vision-side) through the sweep runner, and score the automatic
    diagnosis against where each bias was planted."""
    _threads(threads)
    from analyses.organisms.recipes import RECIPES
    from analyses.organisms.zoo_table import markdown, run
    names = list(RECIPES) if recipes == "all" else [r.strip() for r in recipes.split(",") if r.strip()]
    try:
        seed_list = [int(x) for x in seeds.split(",") if x.strip()]
        lams = [float(x) for x in lambdas.split(",") if x.strip()]
    except ValueError:
        raise SpatialBiasError(f"--seeds {seeds!r} / --lambdas {lambdas!r}: give comma-separated numbers") from None
    tab = run(out, names, seed_list, items=items, causal_items=causal_items, lambdas=lams, executor=executor,
              cache_dir=cache, log=typer.echo)
    typer.echo(markdown(tab))


@app.command("finetune")
@clean_errors
def finetune(out: Path = typer.Option(..., help="Output folder: lora/ and lora-bapa/ checkpoints (with adapter/), "
                                      "results, report, finetune.parquet/.csv/.md."),
             seed: int = typer.Option(0, help="Seed of the planted-lm organism and of the fine-tuning."),
             steps: int = typer.Option(300, help="LoRA steps (300: the zoo's cached lora / lora-bapa recipes)."),
             items: int = typer.Option(200, help="Probe items (each at all 9 cells)."),
             cache: Optional[Path] = typer.Option(None, help="Cache folder for trained organisms "
                                                  "(default $SPATIALBIAS_CACHE or ~/.cache/spatialbias)."),
        threads: Optional[int] = typer.Option(None, help=THREADS_HELP)):
    """Lightweight fine-tuning of the planted-lm organism on uniform target cells: no fine-tuning
    vs LoRA vs LoRA with BaPA active, accuracy and range with 95% intervals under baseline and BaPA."""
    _threads(threads)
    from analyses.organisms.finetune import markdown, run
    tab = run(out, seed=seed, steps=steps, items=items, cache_dir=cache)
    typer.echo(markdown(tab, seed, steps))
