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

from analyses.scoring import AnswerSet, prefix_answer, prompt_text, robust_answer
from interp.interventions import Intervention
from interp.model import LVLM
from probes.format import Probe, ProbeError, ProbeRow, find_probe, grid_name, scan_rows
from probes.images import load_rgb

Conditions = dict[str, Sequence[Intervention]]


def load_image(probe: str | Path | Probe, row: ProbeRow, where: str) -> Image.Image:
    """Open a row's image of ``probe`` (a folder, a rows file or a :class:`probes.format.Probe`)
    as RGB (:func:`probes.images.load_rgb`); bad files raise ProbeError naming ``where``."""
    return load_rgb(find_probe(probe).image_path(row, where), where, grid=row.grid)


def answer_set(lvlm: LVLM, rows: list[ProbeRow], meta: dict) -> AnswerSet:
    """Candidates: ``probe.json``'s ``answers``; Yes/No for caption probes; else the answers seen.
    Each answer's token is the one the model emits first after these rows' prompts."""
    texts = [prompt_text(r) for r in rows]
    if meta.get("answers"):
        return AnswerSet.build(lvlm, meta["answers"], texts)
    if all(r.caption is not None for r in rows):
        return AnswerSet.build(lvlm, ["Yes", "No"], texts)
    return AnswerSet.build(lvlm, sorted({r.answer for r in rows}), texts)


def open_probe(lvlm: LVLM, probe_dir: str | Path | Probe, rows: list[ProbeRow] | None = None
               ) -> tuple[Probe, list[ProbeRow], AnswerSet]:
    """(the probe, rows — validated unless given —, the answer candidates) of a probe to score;
    ``probe_dir``: a folder, a rows file or a :class:`probes.format.Probe`."""
    probe = find_probe(probe_dir)
    if rows is None:
        rows = validate_probe(probe)
    return probe, rows, answer_set(lvlm, rows, probe.meta)


def probe_batches(lvlm: LVLM, probe: str | Path | Probe, rows: list[ProbeRow], batch_size: int):
    """Yields (start, rows, images, inputs): ``rows`` in batches as the model sees them when they
    are scored (images loaded safely, the prompt of :meth:`interp.model.LVLM.prompt`)."""
    probe = find_probe(probe)
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        images = [load_image(probe, r, f"{probe.rows_file} row {start + j + 1} (id={r.id})")
                  for j, r in enumerate(batch)]
        yield start, batch, images, lvlm.inputs(images, [lvlm.prompt(prompt_text(r)) for r in batch])


def validate_probe(probe_dir: str | Path | Probe, images: bool = False) -> list[ProbeRow]:
    """Read every row and check every image path (and, with ``images``, decode every image)
    before any compute; returns the rows, or raises the first problem (:func:`check_probe`'s
    wording: ``file:line (id=…): reason``). ``probe_dir``: a folder, a rows file or a Probe."""
    good, problems = check_probe(probe_dir, images=images)
    if problems:
        raise problems[0]
    return [r for _, r in good]


def check_probe(probe_dir: str | Path | Probe, images: bool = True
                ) -> tuple[list[tuple[int, ProbeRow]], list[ProbeError]]:
    """Every problem of a probe at once: rows that do not parse, image paths that are missing or
    leave the folder, and (``images``) files that cannot be decoded or are too small. Returns
    (the good rows with their line numbers, the problems). A probe that cannot be found at all
    (no rows file, several candidates) raises :class:`ProbeError`."""
    probe = find_probe(probe_dir)
    rows, problems = scan_rows(probe)
    good = []
    for n, r in rows:
        where = probe.where(n, r)
        try:
            r.cell  # a box row's cell needs its canvas
            path = probe.image_path(r, where)
            if images:
                load_rgb(path, where, grid=r.grid)
        except ProbeError as e:
            problems.append(e)
            continue
        good.append((n, r))
    return good, problems


def row_columns(r: ProbeRow) -> dict:
    """The placement columns of a scored row: ``position``, ``cell``, ``grid`` ("3x3"),
    ``n_cells``, and for rows with a box ``x0, y0, x1, y1`` (and ``offset`` for shift rows)."""
    d = {"position": r.position, "cell": r.cell, "grid": grid_name(r.grid), "n_cells": r.n_cells}
    if r.box is not None:
        d.update(zip(("x0", "y0", "x1", "y1"), r.box))
    if "offset" in r.extra:
        d["offset"] = int(r.extra["offset"])
    return d


def score_probe(lvlm: LVLM, probe_dir: str | Path | Probe, conditions: Conditions, batch_size: int = 64,
                progress: bool = True, rows: list[ProbeRow] | None = None, string_rule: bool = False,
                max_new_tokens: int = 4) -> pd.DataFrame:
    """Run every condition over every probe row (or over ``rows``, a validated subset).
    ``probe_dir``: a probe folder (ours or the paper's), a rows file or a Probe.

    Returns columns: ``row`` (order in the rows scored), ``id``, ``position``, ``cell``,
    ``grid``, ``n_cells`` (plus ``x0, y0, x1, y1`` / ``offset`` for rows that carry a box /
    an offset), ``answer``, ``condition``, ``pred``, ``correct``, ``p_correct``,
    ``logit_diff`` — read from the logits at the answer position. With ``string_rule`` each
    condition also decodes greedily (:meth:`interp.model.LVLM.generate`, ``max_new_tokens``)
    and adds ``pred_text`` (the decoded text), ``correct_prefix`` (the paper's case-sensitive
    prefix rule, :func:`analyses.scoring.prefix_answer`) and ``correct_robust``
    (:func:`analyses.scoring.robust_answer`).
    """
    probe, rows, cands = open_probe(lvlm, probe_dir, rows)
    out = []
    bar = tqdm(total=len(rows) * len(conditions), desc="evaluate", unit="row", disable=not progress)
    for start, batch, _, inputs in probe_batches(lvlm, probe, rows, batch_size):
        answers = [r.answer for r in batch]
        for name, ivs in conditions.items():
            with torch.inference_mode():
                logits = lvlm.run(inputs, ivs, last_only=True)[:, -1]
            s = {k: v.cpu().numpy() for k, v in cands.score(logits, answers).items()}
            texts = None
            if string_rule:
                with torch.inference_mode():
                    new = lvlm.generate(inputs, ivs, max_new_tokens=max_new_tokens)
                texts = lvlm.tokenizer.batch_decode(new.cpu(), skip_special_tokens=True)
            for j, r in enumerate(batch):
                rec = {"row": start + j, "id": r.id, **row_columns(r), "answer": r.answer, "condition": name,
                       "pred": cands.answers[int(s["pred"][j])], "correct": bool(s["correct"][j]),
                       "p_correct": float(s["p_correct"][j]), "logit_diff": float(s["logit_diff"][j])}
                if texts is not None:
                    rec.update(pred_text=texts[j], correct_prefix=prefix_answer(texts[j], cands.answers) == r.answer,
                               correct_robust=robust_answer(texts[j], cands.answers) == r.answer)
                out.append(rec)
            bar.update(len(batch))
    bar.close()
    return pd.DataFrame(out)
