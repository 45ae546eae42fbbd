"""Build grid probes on disk in the paper's row format.

``shapes_probe`` renders the model organism's task: ``n_items`` items, each at all 9
positions over the same background (``replace`` layout: variant k replaces cell k's
distractor by the target, so any two variants differ only inside two cells).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from probes import shapes
from probes.format import POSITIONS, ProbeRow, write_rows


def shapes_probe(out: str | Path, n_items: int = 300, seed: int = 0, cell_px: int = 16,
                 progress: bool = True) -> Path:
    """Write ``out/probe.jsonl``, ``out/probe.json`` and ``out/images/{id}_{k}.png``.

    Images are lossless PNG (the organism is trained on exactly these pixels). Deterministic
    for a given ``seed``; re-running overwrites the same files, so an interrupted build
    completes on a re-run without duplicates.
    """
    if n_items < 1:
        raise ValueError("n_items must be ≥ 1")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    render = shapes.Renderer(cell_px=cell_px)
    rows = []
    for i in tqdm(range(n_items), desc="probe", disable=not progress):
        shape, colour, variants = render.item(rng)
        item_id = f"shapes{seed}-{i:05d}"
        for k, img in enumerate(variants):
            name = f"images/{item_id}_{k}.png"
            Image.fromarray(img).save(out / name)
            rows.append(ProbeRow(id=item_id, image=name, position=POSITIONS[k], answer=shapes.COLOURS[colour],
                                 question=shapes.question(shapes.SHAPES[shape])))
    meta = {"source": "shapes", "layout": "replace", "grid": [3, 3], "n_items": n_items, "seed": seed,
            "cell_px": cell_px, "answers": list(shapes.COLOURS)}
    return write_rows(out, rows, meta)
