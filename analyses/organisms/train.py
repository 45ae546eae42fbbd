"""Train the model organism: a tiny LLaVA whose spatial bias is planted on purpose.

How the bias is planted (stated in every report that uses the organism):
  * skewed training positions: the target's cell is drawn with weights 1², 2², …, 9² from
    top-left to bottom-right (row-major): 0.35% of training targets are top-left, 28% are
    bottom-right (81× more);
  * under-training: training stops as soon as the running training accuracy (EMA 0.95)
    reaches 0.80, before the rare cells are learned as well as the common ones.
Nothing else about the model is position-specific. Its bias is a fact about this training
recipe, not about pretrained LVLMs.

Determinism: for a fixed seed and thread count (default 1) on the same machine and torch
build, the saved ``model.safetensors`` is identical bit for bit.
"""
from __future__ import annotations

import hashlib
import json
import math
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from analyses.organisms import build
from probes import shapes
from probes.format import atomic_write_text

SKEW = tuple(float(k * k) for k in range(1, 10))


@dataclass
class TrainConfig:
    seed: int = 0
    threads: int = 1
    batch: int = 128
    lr: float = 2e-3
    max_steps: int = 3000
    warmup: int = 100
    stop_acc: float = 0.80
    min_steps: int = 50
    cell_weights: tuple[float, ...] = SKEW


def _running(prev: float | None, x: float) -> float:
    return x if prev is None else 0.95 * prev + 0.05 * x


def train(cfg: TrainConfig, progress: bool = True):
    """Train from scratch. Returns (model, processor, record dict)."""
    torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    model = build.model(cfg.seed).train()
    render = shapes.Renderer()
    w = np.asarray(cfg.cell_weights, float)
    probs = w / w.sum()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.max_steps) / cfg.max_steps)))
    mask = torch.ones(cfg.batch, build.input_ids(np.zeros(1, int)).shape[1], dtype=torch.long)
    run_loss = run_acc = None
    bar = tqdm(range(cfg.max_steps), desc="organism", disable=not progress)
    step = 0
    for step in bar:
        imgs, shp, col, _ = render.sample(rng, cfg.batch, probs)
        y = torch.tensor([build.WORDS.index(shapes.COLOURS[c]) for c in col])
        logits = model(input_ids=build.input_ids(shp), pixel_values=build.pixel_values(imgs),
                       attention_mask=mask, use_cache=False, logits_to_keep=1).logits[:, -1]
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        run_loss = _running(run_loss, loss.item())
        run_acc = _running(run_acc, (logits.argmax(-1) == y).float().mean().item())
        bar.set_postfix(loss=f"{run_loss:.3f}", acc=f"{run_acc:.3f}", refresh=False)
        if step >= cfg.min_steps and run_acc >= cfg.stop_acc:
            break
    bar.close()
    record = dict(config=asdict(cfg), steps=step + 1, running_acc=run_acc, running_loss=run_loss,
                  stopped_by="stop_acc" if run_acc >= cfg.stop_acc else "max_steps",
                  torch=torch.__version__, machine=platform.machine(), python=platform.python_version(),
                  bias_planted=PLANTED)
    return model.eval(), build.processor(), record


PLANTED = ("planted on purpose: training targets were placed with cell weights 1, 4, 9, ..., 81 "
           "(k squared, row-major from top-left to bottom-right) and training stopped at 80% running "
           "training accuracy; "
           "the organism's bias says nothing about pretrained LVLMs")


def save(model, processor, record: dict, out: str | Path) -> Path:
    """``save_pretrained`` (safetensors) + processor + ``training.json`` with the weights' sha256."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    record = dict(record, sha256=sha256(out / "model.safetensors"))
    atomic_write_text(out / "training.json", json.dumps(record, indent=1) + "\n")
    return out


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
