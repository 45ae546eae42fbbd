"""``spatialbias probe build``: grid probes (:mod:`probes.build`)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from analyses.cli.base import THREADS_HELP, _threads, clean_errors, probe_app
from spatialbias.errors import SpatialBiasError


@probe_app.command("build")
@clean_errors
def probe_build(out: Path = typer.Option(..., help="Output folder."),
                source: str = typer.Option("shapes", help="'shapes' (the organism's task), 'skimage' (the photographs "
                                           "scikit-image ships, with hand-written captions; no download) or a folder of "
                                           "images with captions.jsonl / captions.csv (image, caption)."),
                kind: str = typer.Option("grid", help="Caption sources: grid (target among distractors, the paper's), "
                                         "similarity (target alone in cell k), shift (target slid in pixel steps along "
                                         "the middle row/column), irregular (random non-overlapping boxes)."),
                grid: str = typer.Option("3x3", help="Grid as ROWSxCOLS, e.g. 2x2, 3x3, 4x4 (caption sources)."),
                n: int = typer.Option(300, help="Number of items."),
                seed: int = typer.Option(0, help="Random seed."),
                layout: str = typer.Option("replace", help="replace (minimal pairs) or insert (the paper's); grid kind."),
                negatives: bool = typer.Option(False, help="Add a No item per item (caption of an absent image)."),
                canvas: int = typer.Option(840, help="Canvas side in pixels for caption sources."),
                path: str = typer.Option("horizontal", help="Shift kind: horizontal (middle row) or vertical "
                                         "(middle column)."),
                step: Optional[int] = typer.Option(None, help="Shift kind: step in pixels (default a quarter cell)."),
                boxes: Optional[int] = typer.Option(None, help="Irregular kind: boxes per canvas (default: the grid's "
                                                    "cell count)."),
                cell_px: int = typer.Option(16, help="Shapes only: cell size in pixels (16: the organism's 48 px)."),
                progress: bool = typer.Option(True, help="Show a progress bar."),
        threads: Optional[int] = typer.Option(None, help=THREADS_HELP)):
    """Build a grid probe: every item at every position (rows in the paper's JSONL format;
    other grids, shift and irregular rows add grid, box and canvas keys; docs/probes.md)."""
    _threads(threads)
    from probes.build import KINDS, caption_probe, shapes_probe
    from probes.format import parse_grid
    if n < 1:
        raise SpatialBiasError(f"--n {n}: need at least one item")
    if layout not in ("replace", "insert"):
        raise SpatialBiasError(f"--layout {layout!r}: use replace or insert")
    if kind not in KINDS:
        raise SpatialBiasError(f"--kind {kind!r}: use one of {', '.join(KINDS)}")
    if path not in ("horizontal", "vertical"):
        raise SpatialBiasError(f"--path {path!r}: use horizontal or vertical")
    if step is not None and step < 1:
        raise SpatialBiasError(f"--step {step}: use a positive number of pixels")
    g = parse_grid(grid, "--grid")
    if source == "shapes":
        if layout != "replace" or negatives or kind != "grid" or g != (3, 3):
            raise SpatialBiasError("the shapes source supports only --kind grid --grid 3x3 --layout replace without "
                                   "--negatives; use --source skimage or a folder for the other probes")
        typer.echo(f"wrote {shapes_probe(out, n_items=n, seed=seed, cell_px=cell_px, progress=progress)}")
        return
    typer.echo(f"wrote {caption_probe(source, out, n_items=n, seed=seed, layout=layout, negatives=negatives, size=canvas, progress=progress, grid=g, kind=kind, path=path, step=step, n_boxes=boxes)}")
