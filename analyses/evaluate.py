"""Score a probe under a set of conditions (baseline and interventions) in one pass.

Each batch of probe rows is loaded and preprocessed once and run once per condition, so the
conditions see identical inputs. Output: a tidy table, one row per (probe row, condition).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from analyses.scoring import AnswerSet, prompt_text
from interp.interventions import Intervention
from interp.model import LVLM
from probes.format import ProbeError, ProbeRow, read_meta, read_rows, resolve_image, scan_rows
from probes.images import load_rgb

Conditions = dict[str, Sequence[Intervention]]


def load_image(folder: Path, row: ProbeRow, where: str) -> Image.Image:
    """Open a row's image as RGB (:func:`probes.images.load_rgb`); bad files raise ProbeError."""
    return load_rgb(resolve_image(folder, row, where), where)


def answer_set(lvlm: LVLM, rows: list[ProbeRow], meta: dict) -> AnswerSet:
    """Candidates: ``probe.json``'s ``answers``; Yes/No for caption probes; else the answers seen."""
    if meta.get("answers"):
        return AnswerSet.build(lvlm.tokenizer, meta["answers"])
    if all(r.caption is not None for r in rows):
        return AnswerSet.build(lvlm.tokenizer, ["Yes", "No"])
    return AnswerSet.build(lvlm.tokenizer, sorted({r.answer for r in rows}))


def validate_probe(probe_dir: str | Path) -> list[ProbeRow]:
    """Read every row and check every image path before any compute; returns the rows
    (raises the first problem)."""
    folder = Path(probe_dir)
    rows = read_rows(folder)
    for i, r in enumerate(rows):
        resolve_image(folder, r, f"{folder / 'probe.jsonl'} row {i + 1} (id={r.id})")
    return rows


def check_probe(probe_dir: str | Path, images: bool = True) -> tuple[list[tuple[int, ProbeRow]], list[ProbeError]]:
    """Every problem of a probe at once: rows that do not parse, image paths that are missing or
    leave the folder, and (``images``) files that cannot be decoded or are too small. Returns
    (the good rows with their line numbers, the problems)."""
    folder = Path(probe_dir)
    rows, problems = scan_rows(folder)
    good = []
    for n, r in rows:
        where = f"{folder / 'probe.jsonl'}:{n} (id={r.id})"
        try:
            path = resolve_image(folder, r, where)
            if images:
                load_rgb(path, where)
        except ProbeError as e:
            problems.append(e)
            continue
        good.append((n, r))
    return good, problems


def score_probe(lvlm: LVLM, probe_dir: str | Path, conditions: Conditions, batch_size: int = 64,
                progress: bool = True, rows: list[ProbeRow] | None = None) -> pd.DataFrame:
    """Run every condition over every probe row (or over ``rows``, a validated subset).

    Returns columns: ``row`` (order in the rows scored), ``id``, ``position``, ``cell``,
    ``answer``, ``condition``, ``pred``, ``correct``, ``p_correct``, ``logit_diff``.
    """
    folder = Path(probe_dir)
    if rows is None:
        rows = validate_probe(folder)
    cands = answer_set(lvlm, rows, read_meta(folder))
    probe_file = folder / "probe.jsonl"
    out = []
    bar = tqdm(total=len(rows) * len(conditions), desc="evaluate", unit="row", disable=not progress)
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        images = [load_image(folder, r, f"{probe_file} row {start + j + 1} (id={r.id})") for j, r in enumerate(batch)]
        inputs = lvlm.inputs(images, [lvlm.prompt(prompt_text(r)) for r in batch])
        answers = [r.answer for r in batch]
        for name, ivs in conditions.items():
            with torch.inference_mode():
                logits = lvlm.run(inputs, ivs, last_only=True)[:, -1]
            s = {k: v.cpu().numpy() for k, v in cands.score(logits, answers).items()}
            for j, r in enumerate(batch):
                out.append({"row": start + j, "id": r.id, "position": r.position, "cell": r.cell,
                            "answer": r.answer, "condition": name, "pred": cands.answers[int(s["pred"][j])],
                            "correct": bool(s["correct"][j]), "p_correct": float(s["p_correct"][j]),
                            "logit_diff": float(s["logit_diff"][j])})
            bar.update(len(batch))
    bar.close()
    return pd.DataFrame(out)
