"""Build grid probes on disk in the paper's row format.

``caption_probe`` builds the paper's caption probe (and its similarity, shift and irregular
variants, on any n×m grid) from captioned images; ``shapes_probe`` renders the model organism's task: ``n_items`` items, each at all 9
positions over the same background (``replace`` layout: variant k replaces cell k's
distractor by the target, so any two variants differ only inside two cells).
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from probes import shapes
from probes.format import POSITIONS, ProbeError, ProbeRow, grid_name, grid_positions, write_rows
from spatialbias.files import atomic_write_bytes


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
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            atomic_write_bytes(out / name, buf.getvalue())
            rows.append(ProbeRow(id=item_id, image=name, position=POSITIONS[k], answer=shapes.COLOURS[colour],
                                 question=shapes.question(shapes.SHAPES[shape])))
    meta = {"source": "shapes", "layout": "replace", "grid": [3, 3], "n_items": n_items, "seed": seed,
            "cell_px": cell_px, "answers": list(shapes.COLOURS)}
    return write_rows(out, rows, meta)


KINDS = ("grid", "similarity", "shift", "irregular")
"""Caption probe kinds: ``grid`` (the paper's: target among distractors in every cell),
``similarity`` (the target alone in cell k), ``shift`` (the target slid in pixel steps along
the middle row or column, distractors in the other cells), ``irregular`` (random
non-overlapping boxes, the target in box k)."""


def caption_probe(source: str | Path, out: str | Path, n_items: int = 100, seed: int = 0, layout: str = "replace",
                  negatives: bool = False, size: int = 840, progress: bool = True, grid: tuple[int, int] = (3, 3),
                  kind: str = "grid", path: str = "horizontal", step: int | None = None,
                  n_boxes: int | None = None) -> Path:
    """The paper's caption-matching probe and its extensions, from a folder of captioned
    images or ``"skimage"`` (:func:`probes.sources.get_source`).

    Each item: a target image and distractors drawn without replacement, rendered at every
    placement of ``kind`` (:data:`KINDS`; ``layout`` replace or insert for ``grid``), rows
    with the target's caption and answer Yes, the placements of an item consecutive and their
    images ``images/{id}_{k}.jpg``. With ``negatives``, each item also gets a negative item on
    the same canvases whose caption belongs to an image that is on none of them (answer No):
    an always-Yes model scores 50 %.

    3×3 ``grid`` and ``similarity`` rows have exactly the paper's keys; other grids, ``shift``
    and ``irregular`` rows add ``grid``, ``box`` and ``canvas`` (shift rows also ``offset``
    and ``path``). The build is deterministic for a given ``seed``; rows are written once at
    the end and images atomically, so an interrupted build re-run completes with the same
    files and no duplicates.
    """
    from probes import compose
    from probes.images import MIN_CELL_PX, load_rgb
    from probes.sources import get_source
    if kind not in KINDS:
        raise ProbeError(f"unknown probe kind {kind!r}; use one of {', '.join(KINDS)}")
    if layout not in ("replace", "insert"):
        raise ProbeError(f"unknown layout {layout!r}; use replace or insert")
    if layout == "insert" and kind != "grid":
        raise ProbeError(f"--layout insert applies to --kind grid only; {kind} probes use a fixed background")
    if n_items < 1:
        raise ProbeError(f"n_items={n_items}: need at least one item")
    n, m = grid
    cells = n * m
    if size < MIN_CELL_PX * max(n, m):
        raise ProbeError(f"canvas {size} px is too small for a {grid_name(grid)} grid (at least {MIN_CELL_PX} px per "
                         f"cell: {MIN_CELL_PX * max(n, m)} px); use a larger --canvas")
    label, pool = get_source(source)
    if kind == "grid":
        places = [compose.cell_box(k, grid, size) for k in range(cells)]
        n_d = cells if layout == "replace" else cells - 1
    elif kind == "similarity":
        places, n_d = [compose.cell_box(k, grid, size) for k in range(cells)], 0
    elif kind == "shift":
        try:
            places, offsets = compose.shift_boxes(grid, size, path, step)
        except ValueError as e:
            raise ProbeError(f"shift probe: {e}") from None
        band = compose.band_cells(grid, path)
        fixed = [compose.cell_box(k, grid, size) for k in range(cells) if k not in band]
        n_d = len(fixed)
    else:
        n_d = cells if n_boxes is None else n_boxes
        if n_d < 2:
            raise ProbeError(f"--boxes {n_d}: an irregular layout needs at least 2 boxes")
    if len(pool) < n_d + 2:
        raise ProbeError(f"{label}: {len(pool)} captioned images, but a {kind} item on a {grid_name(grid)} grid needs "
                         f"{n_d + 2} different ones (target, absent caption, {n_d} distractors); use a smaller grid, "
                         "--layout insert, or more images")
    extra_keys = kind in ("shift", "irregular") or grid != (3, 3)
    names = grid_positions(n, m)
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    decoded: dict[Path, Image.Image] = {}

    def img(c) -> Image.Image:
        if c.path not in decoded:
            decoded[c.path] = load_rgb(c.path, str(c.path))
        return decoded[c.path]

    for i in tqdm(range(n_items), desc="probe", disable=not progress):
        pick = rng.choice(len(pool), size=n_d + 2, replace=False)
        target, absent = pool[pick[0]], pool[pick[1]]
        placed = [pool[j] for j in pick[2:]]
        if negatives and absent.caption in {target.caption, *(p.caption for p in placed)}:
            raise ProbeError(f"{label}: two images share the caption {absent.caption!r}; a negative caption must "
                             "match no image on the canvas, so give every image its own caption")
        t_img, dis = img(target), [img(p) for p in placed]
        if kind == "grid":
            imgs = compose.variants(t_img, dis, layout=layout, grid=grid, size=size)
        elif kind == "similarity":
            imgs = [compose.place([(t_img, b)], size) for b in places]
        elif kind == "shift":
            imgs = [compose.place(list(zip(dis, fixed)) + [(t_img, b)], size) for b in places]
        else:
            try:
                places = compose.random_boxes(rng, n_d, size, *_box_fracs(n_d))
            except ValueError as e:
                raise ProbeError(f"irregular probe: {e}") from None
            imgs = [compose.place([(t_img if j == k else d, b) for j, (d, b) in enumerate(zip(dis, places))], size)
                    for k in range(n_d)]
        item = f"cap{seed}-{i:05d}"
        neg = []
        for k, canvas in enumerate(imgs):
            name = f"images/{item}_{k}.jpg"
            buf = io.BytesIO()
            canvas.save(buf, format="JPEG", quality=95)
            atomic_write_bytes(out / name, buf.getvalue())
            if kind == "shift":
                pos = f"shift_{offsets[k]:04d}"
                extra = {"grid": grid_name(grid), "box": list(places[k]), "canvas": size, "offset": offsets[k],
                         "path": path}
            elif kind == "irregular":
                pos, extra = f"box{k}", {"grid": grid_name(grid), "box": list(places[k]), "canvas": size}
            else:
                pos = names[k]
                extra = {"grid": grid_name(grid), "box": list(places[k]), "canvas": size} if extra_keys else {}
            rows.append(ProbeRow(id=item, image=name, position=pos, answer="Yes", caption=target.caption, extra=extra))
            neg.append(ProbeRow(id=f"{item}-neg", image=name, position=pos, answer="No", caption=absent.caption,
                                extra=extra))
        if negatives:
            rows += neg
    meta = {"source": label, "kind": kind,
            "layout": layout if kind == "grid" else ("alone" if kind == "similarity" else "replace"), "grid": [n, m],
            "n_items": n_items, "seed": seed, "canvas": size, "negatives": negatives, "answers": ["Yes", "No"]}
    if kind == "shift":
        meta.update(path=path, offsets=offsets, step=offsets[1] - offsets[0] if len(offsets) > 1 else 0)
    if kind == "irregular":
        meta["boxes"] = n_d
    return write_rows(out, rows, meta)


def _box_fracs(k: int) -> tuple[float, float]:
    """Side range (fractions of the canvas) of irregular boxes: about k of them fill half the canvas."""
    side = (0.5 / k) ** 0.5
    return 0.6 * side, 1.2 * side
