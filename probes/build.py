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


def caption_probe(source: str | Path, out: str | Path, n_items: int = 100, seed: int = 0, layout: str = "replace",
                  negatives: bool = False, size: int = 840, progress: bool = True) -> Path:
    """The paper's caption-matching probe from a folder source (``probes.sources.folder_source``).

    Each item: a target image and distractors drawn without replacement, rendered at all 9
    positions (``layout`` replace or insert), rows with the target's caption and answer Yes.
    With ``negatives``, each item also gets a negative item on the same canvases whose caption
    belongs to an image that is on none of them (answer No): an always-Yes model scores 50 %.
    """
    from probes import compose
    from probes.images import load_rgb
    from probes.sources import folder_source
    pool = folder_source(source)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_d = 9 if layout == "replace" else 8
    rows = []
    for i in tqdm(range(n_items), desc="probe", disable=not progress):
        pick = rng.choice(len(pool), size=n_d + 2, replace=False)
        target, absent = pool[pick[0]], pool[pick[1]]
        dis = [load_rgb(pool[j].path, str(pool[j].path)) for j in pick[2:]]
        item = f"cap{seed}-{i:05d}"
        imgs = compose.variants(load_rgb(target.path, str(target.path)), dis, layout=layout, size=size)
        neg = []
        for k, img in enumerate(imgs):
            name = f"images/{item}_{k}.jpg"
            img.save(out / name, quality=95)
            rows.append(ProbeRow(id=item, image=name, position=POSITIONS[k], answer="Yes", caption=target.caption))
            neg.append(ProbeRow(id=f"{item}-neg", image=name, position=POSITIONS[k], answer="No",
                                caption=absent.caption))
        if negatives:
            rows += neg
    meta = {"source": str(source), "layout": layout, "grid": [3, 3], "n_items": n_items, "seed": seed,
            "canvas": size, "negatives": negatives, "answers": ["Yes", "No"]}
    return write_rows(out, rows, meta)
