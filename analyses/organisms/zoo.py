"""``get(name, seed)``: a zoo organism's checkpoint folder, shipped or trained once and cached.

Shipped: the planted-lm organism with seed 0 is ``interp/organism/checkpoint``; other recipes'
seed-0 checkpoints live in ``analyses/organisms/checkpoints/<name>-seed0`` (LoRA recipes ship
only their adapter, merged into the base on first use). A shipped folder is used only while its
``training.json`` fingerprint matches the current recipe. Anything else is trained on first use
with one thread and cached under ``cache_dir`` (default ``$SPATIALBIAS_CACHE`` or
``~/.cache/spatialbias``) in ``zoo/<name>-seed<seed>-<fingerprint[:12]>``.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from analyses.organisms.recipes import RECIPES, Recipe
from spatialbias.errors import SpatialBiasError
from interp.load import ORGANISM_DIR

SHIPPED_DIR = Path(__file__).parent / "checkpoints"


def shipped_dir(name: str, seed: int) -> Path:
    """Where the shipped checkpoint of (name, seed) lives, whether or not it exists."""
    return ORGANISM_DIR if (name, seed) == ("planted-lm", 0) else SHIPPED_DIR / f"{name}-seed{seed}"


def shipped(name: str, seed: int) -> Path | None:
    """The shipped folder of (name, seed) if there is one and it matches the current recipe."""
    path = shipped_dir(name, seed)
    rec = path / "training.json"
    if not rec.is_file():
        return None
    return path if json.loads(rec.read_text()).get("fingerprint") == RECIPES[name].fingerprint() else None


def cache_root(cache_dir: str | Path | None = None) -> Path:
    root = cache_dir or os.environ.get("SPATIALBIAS_CACHE") or Path.home() / ".cache" / "spatialbias"
    return Path(root) / "zoo"


def get(name: str, seed: int = 0, cache_dir: str | Path | None = None, progress: bool = False) -> Path:
    """A checkpoint folder of recipe ``name`` trained with ``seed`` (one thread) that
    ``interp.load(path)`` reads: shipped, else cached, else trained now and cached."""
    if name not in RECIPES:
        raise SpatialBiasError(f"unknown organism {name!r}; the zoo has {', '.join(RECIPES)}")
    recipe = RECIPES[name]
    ship = shipped(name, seed)
    if ship is not None and (ship / "model.safetensors").is_file():
        return ship
    out = cache_root(cache_dir) / f"{name}-seed{seed}-{recipe.fingerprint()[:12]}"
    if (out / "training.json").is_file():
        return out
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if ship is not None:  # a shipped adapter: merge it into its base
        from analyses.organisms.lora import save_merged
        save_merged(get(recipe.base, seed, cache_dir), ship / "adapter", tmp)
        shutil.copytree(ship / "adapter", tmp / "adapter")
        shutil.copy(ship / "training.json", tmp / "training.json")
    else:
        from analyses.organisms import train
        threads = torch.get_num_threads()
        try:
            model, proc, record, peft_model = train_recipe(recipe, seed=seed, threads=1, progress=progress)
            train.save(model, proc, record, tmp, peft_model)
        finally:
            torch.set_num_threads(threads)
    out.parent.mkdir(parents=True, exist_ok=True)
    if (out / "training.json").is_file():  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    return out


def dependencies(recipe: Recipe, seed: int) -> dict[str, Path]:
    """Checkpoint folders of the ``base`` and ``vision_from`` recipes (same seed), trained and
    cached first if needed."""
    return {k: get(v, seed) for k, v in (("base", recipe.base), ("vision_from", recipe.vision_from)) if v}


def train_recipe(recipe: Recipe, seed: int = 0, threads: int = 1, progress: bool = True):
    """:func:`train.train` of ``recipe`` from its start, its dependencies found (or trained) first
    so the clock of this run starts after them. Returns what :func:`train.train` returns."""
    from analyses.organisms import train
    return train.train(recipe, seed=seed, threads=threads, progress=progress, deps=dependencies(recipe, seed))
