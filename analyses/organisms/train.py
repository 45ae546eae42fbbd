"""One trainer for every zoo recipe (:mod:`analyses.organisms.recipes`).

Stages, each optional except the last:
  1. start: a fresh model (``torch.manual_seed(seed)``), or the ``base`` recipe's checkpoint of
     the same seed; the vision tower copied from the ``vision_from`` recipe's checkpoint;
  2. text: the LM pretrained alone on the recency text task (``text_stage``);
  3. grid: the grid task; only ``train_parts`` (or only LoRA weights) train; with
     ``bapa_train`` the LM gets BaPA position ids (and the attention mask) in every step, with
     ``shuffle_image_tokens`` the image tokens enter the LM in a random order per row; with
     ``first_kind_until`` only the first question kind is asked until its running accuracy
     reaches that value, then the kinds alternate step by step; stops
     when the running accuracy (EMA 0.95) of every question kind reaches ``stop_acc`` after
     ``min_steps``, or at ``max_steps`` (``stop_acc=None``: always ``max_steps``).

Determinism: all data come from ``numpy.random.default_rng(seed)``, all initialisation from
``torch.manual_seed(seed)``; for a fixed seed and thread count on one machine and torch build the
saved ``model.safetensors`` is identical bit for bit. The planted-lm recipe with seed 0 and one
thread reproduces the shipped organism (``interp/organism/checkpoint``).
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from analyses.organisms import data
from analyses.organisms.arch import ARCHS, Arch
from analyses.organisms.recipes import Recipe
from probes import shapes
from spatialbias.errors import SpatialBiasError
from spatialbias.files import atomic_write_text

EMA = 0.95


def _running(prev: float | None, x: float) -> float:
    return x if prev is None else EMA * prev + (1 - EMA) * x


def _optimiser(params: list[torch.nn.Parameter], lr: float, warmup: int, steps: int):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    return opt, sched


def _step(opt, sched, params, loss: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()


def environment(threads: int) -> dict:
    """What decides floating-point results besides the seed: CPU, kernel set, torch, threads."""
    cpu = next((ln.split(":", 1)[1].strip() for ln in _cpuinfo() if ln.startswith("model name")), platform.processor())
    return {"threads": threads, "cpu_model": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY"), "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine()}


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def text_stage(model, recipe: Recipe, rng: np.random.Generator, words: tuple[str, ...], progress: bool) -> dict:
    """Pretrain the LM and unembedding on the recency text task (vision and projector untouched).
    Returns the stage record, with accuracy per target index for 9 items (the grid's length)."""
    st = recipe.text_stage
    lm = list(model.model.language_model.parameters()) + list(model.lm_head.parameters())
    opt, sched = _optimiser(lm, st.lr, recipe.warmup, st.steps)
    t0, run_acc, run_loss, step = time.perf_counter(), None, None, 0
    for step in tqdm(range(st.steps), desc="text", disable=not progress):
        ids, mask, pos, y, _ = data.recency_batch(rng, st.batch, words, st.n_items, st.skew, st.copies)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                       logits_to_keep=1).logits[:, -1]
        loss = F.cross_entropy(logits, y)
        _step(opt, sched, lm, loss)
        run_loss = _running(run_loss, loss.item())
        run_acc = _running(run_acc, (logits.argmax(-1) == y).float().mean().item())
        if st.stop_acc is not None and step >= st.min_steps and run_acc >= st.stop_acc:
            break
    model.eval()
    acc = []
    with torch.no_grad():
        for t in range(data.N_CELLS):
            ids, mask, pos, y, _ = data.recency_batch(np.random.default_rng(10_000 + t), 200, words, st.n_items, 0.0,
                                                      0, n_fixed=data.N_CELLS, target_fixed=t)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits[:, -1]
            acc.append(float((logits.argmax(-1) == y).float().mean()))
    model.train()
    return {"steps": step + 1, "running_acc": run_acc, "running_loss": run_loss,
            "seconds": time.perf_counter() - t0, "acc_by_target_index_9_items": acc}


class _TokenShuffle:
    """Training-only forward hook on the projector: each row's 9 image tokens enter the LM in the
    order ``perm`` (B, 9) sets for the step, so the LM cannot tell cells apart by sequence slot."""

    def __init__(self, arch: Arch, model):
        self.perm: torch.Tensor | None = None
        self.handle = arch.projector_module(model).register_forward_hook(self._hook)

    def _hook(self, _mod, _args, out: torch.Tensor) -> torch.Tensor:
        B, n = self.perm.shape
        x = out.reshape(B, n, out.shape[-1])
        x = torch.stack([x[b, self.perm[b]] for b in range(B)])
        return x.reshape(out.shape)

    def remove(self) -> None:
        self.handle.remove()


def grid_stage(model, arch: Arch, recipe: Recipe, rng: np.random.Generator, words: tuple[str, ...],
               progress: bool) -> dict:
    """Train the parameters that require grad on the grid task (see the module docstring)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = _optimiser(params, recipe.lr, recipe.warmup, recipe.max_steps)
    shuffle = _TokenShuffle(arch, model) if recipe.shuffle_image_tokens else None
    render = shapes.Renderer()
    probs = data.cell_probs(recipe.cell_weights)
    fill = None if recipe.fill_weights is None else np.asarray(recipe.fill_weights, float) / max(recipe.fill_weights)
    run_acc: dict[str, float | None] = {k: None for k in recipe.kinds}
    run_loss = None
    t0, step = time.perf_counter(), 0
    first_only = recipe.first_kind_until is not None  # curriculum: kinds[0] alone first
    first_steps = 0
    bar = tqdm(range(recipe.max_steps), desc=recipe.name, disable=not progress)
    for step in bar:
        if first_only and run_acc[recipe.kinds[0]] is not None and step >= recipe.min_steps \
                and run_acc[recipe.kinds[0]] >= recipe.first_kind_until:
            first_only, first_steps = False, step
        kind = recipe.kinds[0] if first_only else recipe.kinds[(step - first_steps) % len(recipe.kinds)]
        inputs, y = data.grid_batch(arch, render, rng, recipe.batch, probs, words, kind, fill)
        if recipe.bapa_train:
            inputs["position_ids"] = arch.bapa_position_ids(inputs, words)
        if shuffle:
            shuffle.perm = torch.from_numpy(np.stack([rng.permutation(data.N_CELLS) for _ in range(len(y))]))
        logits = model(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1]
        loss = F.cross_entropy(logits, y)
        _step(opt, sched, params, loss)
        run_loss = _running(run_loss, loss.item())
        run_acc[kind] = _running(run_acc[kind], (logits.argmax(-1) == y).float().mean().item())
        bar.set_postfix(loss=f"{run_loss:.3f}", acc="/".join(f"{a:.3f}" for a in run_acc.values() if a is not None),
                        refresh=False)
        if (recipe.stop_acc is not None and step >= recipe.min_steps
                and all(a is not None and a >= recipe.stop_acc for a in run_acc.values())):
            break
    bar.close()
    if shuffle:
        shuffle.remove()
    reached = recipe.stop_acc is not None and all(a is not None and a >= recipe.stop_acc for a in run_acc.values())
    out = {"steps": step + 1, "running_acc": run_acc if len(run_acc) > 1 else run_acc[recipe.kinds[0]],
           "running_loss": run_loss, "stopped_by": "stop_acc" if reached else "max_steps",
           "seconds": time.perf_counter() - t0}
    if recipe.first_kind_until is not None:
        out["first_kind_steps"] = first_steps if not first_only else step + 1
    return out


def _load(path: Path):
    import transformers
    cls = json.loads((path / "config.json").read_text())["architectures"][0]
    return getattr(transformers, cls).from_pretrained(path, local_files_only=True)


def _start(recipe: Recipe, arch: Arch, seed: int, words: tuple[str, ...], deps: dict[str, Path]):
    """The model the run starts from: fresh, or the base recipe's checkpoint (same seed)."""
    if recipe.base is None:
        model = arch.model(seed, words).train()
        if recipe.vision_pos_std is not None:  # continues the torch RNG stream of the initialisation
            torch.nn.init.normal_(arch.vision_position_embedding(model).weight, std=recipe.vision_pos_std)
        if arch.position_blind:
            torch.nn.init.zeros_(arch.vision_position_embedding(model).weight)
        return model
    return _load(deps["base"]).train()


def _copy_vision(model, arch: Arch, path: Path) -> str:
    """Load the vision tower of the checkpoint at ``path`` into ``model``; returns that
    checkpoint's weights' sha256."""
    arch.vision_module(model).load_state_dict(arch.vision_module(_load(path)).state_dict())
    return sha256(path / "model.safetensors")


def train(recipe: Recipe, seed: int = 0, threads: int = 1, progress: bool = True,
          deps: dict[str, Path] | None = None):
    """Train ``recipe`` from its start. ``deps``: the checkpoint folders of its ``base`` and
    ``vision_from`` recipes (same seed), needed when it has them; :func:`zoo.train_recipe` finds
    or trains them first. Returns (model in eval mode — LoRA already merged —, processor, record
    dict, the unmerged peft model for LoRA recipes else None)."""
    deps = dict(deps or {})
    missing = [k for k in ("base", "vision_from") if getattr(recipe, k) and k not in deps]
    if missing:
        raise SpatialBiasError(f"recipe {recipe.name} starts from the {' and '.join(missing)} checkpoint; "
                               "train it with analyses.organisms.zoo.train_recipe, which finds that first")
    torch.set_num_threads(threads)
    t0, cpu0, load0 = time.perf_counter(), time.process_time(), os.getloadavg()
    arch = ARCHS[recipe.arch]
    words = arch.words(recipe.extra_words)
    rng = np.random.default_rng(seed)
    model = _start(recipe, arch, seed, words, deps)
    record: dict = {"recipe": recipe.name, "seed": seed, "config": recipe.training_config(),
                    "fingerprint": recipe.fingerprint(), "description": recipe.description,
                    "expected": recipe.expected}
    if recipe.base:
        record["base_sha256"] = sha256(deps["base"] / "model.safetensors")
    if recipe.vision_from:
        record["vision_from_sha256"] = _copy_vision(model, arch, deps["vision_from"])
    if recipe.text_stage:
        record["text_stage"] = text_stage(model, recipe, rng, words, progress)
    peft_model = None
    if recipe.lora:
        from analyses.organisms.lora import wrap
        peft_model = wrap(model, arch, recipe.lora, seed)
        trainer_model = peft_model
    else:
        parts = arch.parts(model)
        for name, ps in parts.items():
            for p in ps:
                p.requires_grad_(name in recipe.train_parts)
        if arch.position_blind:
            arch.vision_position_embedding(model).weight.requires_grad_(False)
        trainer_model = model
    grid = grid_stage(trainer_model, arch, recipe, rng, words, progress)
    if peft_model is not None:
        peft_model = copy.deepcopy(peft_model)  # keeps the unmerged adapter for save()
        model = trainer_model.merge_and_unload()
    if "first_kind_steps" in grid:
        record["first_kind_steps"] = grid["first_kind_steps"]
    record.update({"steps": grid["steps"], "running_acc": grid["running_acc"], "running_loss": grid["running_loss"],
                   "stopped_by": grid["stopped_by"],
                   "stop_rule": (f"running accuracy (EMA {EMA}) of every question kind >= {recipe.stop_acc} after "
                                 f"{recipe.min_steps} steps, else {recipe.max_steps} steps")
                   if recipe.stop_acc is not None else f"fixed {recipe.max_steps} steps",
                   "grid_seconds": grid["seconds"], "train_seconds": time.perf_counter() - t0,
                   "train_cpu_seconds": time.process_time() - cpu0,
                   "loadavg_start": list(load0), "loadavg_end": list(os.getloadavg()), **environment(threads)})
    for p in model.parameters():
        p.requires_grad_(True)
    return model.eval(), arch.processor(words), record, peft_model


def save(model, processor, record: dict, out: str | Path, peft_model=None) -> Path:
    """``save_pretrained`` (safetensors) + processor + ``training.json`` with the weights' sha256;
    a LoRA run also writes its adapter to ``out/adapter``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    record = dict(record, sha256=sha256(out / "model.safetensors"))
    if peft_model is not None:
        peft_model.save_pretrained(out / "adapter")
        (out / "adapter" / "README.md").unlink(missing_ok=True)  # peft's empty model card
        cfg_file = out / "adapter" / "adapter_config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg["base_model_name_or_path"] = f"zoo:{record['config']['base']} seed {record['seed']}"  # not a local path
        atomic_write_text(cfg_file, json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        record["adapter_sha256"] = sha256(out / "adapter" / "adapter_model.safetensors")
    atomic_write_text(out / "training.json", json.dumps(record, indent=1) + "\n")
    return out


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
