"""``spatialbias report``, ``eval`` and ``causal``: a plan of one model and probe, run by the
runner and rendered by the report (:func:`analyses.cli.base._run_and_report`)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from analyses.cli.base import (DEVICE_MAP_HELP, DRY_RUN_CANVAS, MAX_MEMORY_HELP, OFFLOAD_HELP, THREADS_HELP, TRUST_HELP,
                                _floats, _run_and_report, _settings, _threads, app, clean_errors)
from spatialbias.errors import SpatialBiasError


@app.command()
@clean_errors
def report(model: str = typer.Option("organism", help="'organism', a local checkpoint folder, or a cached hub id "
                                     "(e.g. llava-hf/llava-1.5-7b-hf)."),
           out: Path = typer.Option(Path("out/demo"), help="Output folder."),
           probe: Optional[Path] = typer.Option(None, help="A probe: a folder holding probe.jsonl, or the paper's "
                                                "single .json/.jsonl rows file beside images/; or the rows file itself. "
                                                "Default: build a shapes probe in OUT/probes/shapes."),
           n_items: int = typer.Option(300, help="Items in the built probe (each at all 9 positions)."),
           lambdas: str = typer.Option("0.25,0.5,1,2", help="AGCI λ values, comma separated."),
           seed: int = typer.Option(0, help="Seed of the built probe and of the bootstrap."),
           batch_size: int = typer.Option(64, help="Rows per forward."),
           device: Optional[str] = typer.Option(None, help="torch device, e.g. cuda."),
           dtype: Optional[str] = typer.Option(None, help="float32 (default), bfloat16 or float16."),
           device_map: Optional[str] = typer.Option(None, help=DEVICE_MAP_HELP),
           max_memory: Optional[str] = typer.Option(None, help=MAX_MEMORY_HELP),
           offload_folder: Optional[Path] = typer.Option(None, help=OFFLOAD_HELP),
           trust_remote_code: bool = typer.Option(False, help=TRUST_HELP),
           progress: bool = typer.Option(True, help="Show progress bars."),
           threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
           causal: bool = typer.Option(True, help="Add the causal analyses (patching, position-id patching, "
                                       "attention flow, knockout, attribution patching)."),
           causal_items: int = typer.Option(100, help="Items used by the causal analyses."),
           dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and its cost; run nothing."),
           from_dir: Optional[Path] = typer.Option(None, "--from", help="A run's output folder (results.parquet): "
                                                   "write its report (index.html, summary.json, figures) again "
                                                   "instead of running a model; the other options are ignored.")):
    """Evaluate baseline, BaPA and AGCI(λ) on a grid probe, localise where the position-dependent
    difference arises; write summary.json, tables, figures and index.html. This runs the built-in
    plan analyses/sweeps/demo.toml (resumable like any sweep). With --from DIR: report a run folder."""
    from analyses import plan as pl, report as rep
    _threads(threads)
    if from_dir is not None:
        typer.echo(f"wrote {rep.build(from_dir)}")
        return
    from interp.load import probe_canvas
    canvas = None
    if probe is None:
        try:
            canvas = probe_canvas(model, trust_remote_code)
        except SpatialBiasError as e:
            if not dry_run:
                raise
            canvas = DRY_RUN_CANVAS  # a dry run of a hub id not in the cache: plan with the paper's size
            typer.echo(f"note: {e}; the dry run plans a {canvas} px probe")
    if causal and probe is not None:
        from analyses.causal import probe_grid
        from probes.format import find_probe, read_rows
        p = find_probe(probe)
        rows = read_rows(p)  # a bad probe is one error line here, before anything runs
        try:
            probe_grid(rows, p.rows_file)
        except SpatialBiasError as e:  # shift / irregular probes: no cells to patch between
            typer.echo(f"note: causal analyses skipped: {e}")
            causal = False
    cfg = pl.demo(model, probe, n_items=n_items, lambdas=_floats(lambdas), seed=seed, causal=causal,
                  causal_items=causal_items, settings=_settings(batch_size, device, dtype, trust_remote_code, device_map,
                                                                      max_memory, offload_folder),
                  canvas=canvas)
    s = _run_and_report(cfg, out, "spatialbias report", progress, dry_run)
    if s is None:
        return
    for run in s["runs"]:  # the page's top: the verdict and the diagnosis; the rest is in the report
        typer.echo(run["verdict"])
        if run.get("diagnosis"):
            typer.echo(run["diagnosis"]["text"])
    typer.echo(f"wrote {out / 'index.html'} (verdict, figures, then the numbers in detail), {out / 'summary.json'}, "
               f"{out / 'figures'}")


@app.command("eval")
def evaluate(model: str = typer.Option(..., help="'organism', a local checkpoint folder, or a cached hub id."),
             probe: Path = typer.Option(..., help="A probe: a folder holding probe.jsonl, or the paper's single "
                                        ".json/.jsonl rows file beside images/; or the rows file itself."),
             out: Path = typer.Option(..., help="Output folder (results, tables, summary.json, index.html)."),
             condition: list[str] = typer.Option(["baseline", "bapa", "agci:0.5"], help="Conditions to score "
                                                 "(repeat): baseline, bapa, bapa:keep_hw, agci:λ, agci-pooled:λ, "
                                                 "agci-adaptive:RULE:SCALE, positions:reverse|shuffle."),
             skip_bad: bool = typer.Option(False, help="Score the good rows and list the bad ones instead of "
                                           "stopping."),
             string_rule: bool = typer.Option(False, help="Also generate text and score it by the paper's prefix rule "
                                              "and a robust rule (pred_text, correct_prefix, correct_robust)."),
             max_new_tokens: int = typer.Option(4, help="Tokens generated per row with --string-rule."),
             similarity: bool = typer.Option(False, help="Also the similarity score (caption vs image tokens, max "
                                             "and mean pooling) per row: tables/similarity.parquet|csv."),
             occlusion_steps: int = typer.Option(0, help="Also the occlusion probe with an N×N grid of white "
                                                 "squares (0: off; the paper uses 20): tables/occlusion.parquet|csv."),
             occlusion_square: Optional[int] = typer.Option(None, help="Occluder side in pixels (default: image side "
                                                            "/ steps)."),
             batch_size: int = typer.Option(64, help="Rows per forward."),
             seed: int = typer.Option(0, help="Seed of the bootstrap intervals (recorded)."),
             device: Optional[str] = typer.Option(None, help="torch device, e.g. cuda."),
             dtype: Optional[str] = typer.Option(None, help="float32 (default), bfloat16 or float16."),
             device_map: Optional[str] = typer.Option(None, help=DEVICE_MAP_HELP),
             max_memory: Optional[str] = typer.Option(None, help=MAX_MEMORY_HELP),
             offload_folder: Optional[Path] = typer.Option(None, help=OFFLOAD_HELP),
             trust_remote_code: bool = typer.Option(False, help=TRUST_HELP),
             threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
             dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and its cost; run nothing."),
             progress: bool = typer.Option(True, help="Show progress bars.")):
    """Score a probe: the whole probe is validated first; every bad row is reported at once
    (file, line, reason) and nothing is written, unless --skip-bad. Per-cell metrics use the
    probe's grid; shift probes also get an accuracy curve against position."""
    from analyses import plan as pl, vocabulary
    from analyses.evaluate import check_probe
    try:
        _threads(threads)
        specs = [vocabulary.parse(c, seed) for c in condition]
        if max_new_tokens < 1:
            raise SpatialBiasError(f"--max-new-tokens {max_new_tokens}: use at least 1")
        if occlusion_steps < 0 or (occlusion_square is not None and occlusion_square < 1):
            raise SpatialBiasError("--occlusion-steps must be >= 0 and --occlusion-square >= 1")
        good, problems = check_probe(probe)
    except SpatialBiasError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    if problems and (not skip_bad or not good):
        for p in problems:
            typer.echo(f"error: {p}", err=True)
        if good:
            typer.echo(f"error: {len(problems)} bad row(s) in {probe}; fix them or pass --skip-bad", err=True)
        else:
            typer.echo(f"error: {probe}: no usable rows; fix the probe (every row above is bad, or it has none)",
                       err=True)
        raise typer.Exit(2)
    analyses = {"eval": {"string_rule": string_rule, "max_new_tokens": max_new_tokens, "skip_bad": skip_bad}}
    if similarity:
        analyses["similarity"] = {"interventions": [specs[0].label]}
    if occlusion_steps:
        analyses["occlusion"] = {"steps": occlusion_steps, **({"square": occlusion_square} if occlusion_square else {})}
    try:
        cfg = pl.command(model, probe, [s.label for s in specs], analyses, seed,
                         _settings(batch_size, device, dtype, trust_remote_code, device_map, max_memory,
                                   offload_folder))
        if _run_and_report(cfg, out, "spatialbias eval", progress, dry_run) is None:
            return
    except SpatialBiasError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    for p in problems:
        typer.echo(f"skipped: {p}")
    typer.echo(f"scored {len(good)} rows ({len(problems)} skipped); wrote {out / 'summary.json'}")


@app.command()
@clean_errors
def causal(model: str = typer.Option("organism", help="'organism', a local checkpoint folder, or a cached hub id."),
           probe: Path = typer.Option(..., help="A grid probe (every item at both cells)."),
           out: Path = typer.Option(Path("out/causal"), help="Output folder."),
           clean_cell: int = typer.Option(8, help="Cell of the clean placement (row-major, 0 = top left)."),
           corrupt_cell: int = typer.Option(0, help="Cell of the corrupt placement."),
           n_items: int = typer.Option(100, help="Items to use."),
           screen: Optional[int] = typer.Option(None, help="Patching: rank every patch by attribution and patch "
                                                "only the top K exactly (default: all exactly); the rest are "
                                                "written as screen_estimate_* rows, not restoration_*."),
           lam: float = typer.Option(0.5, help="AGCI λ of the AGCI condition."),
           batch_size: int = typer.Option(64, help="Rows per forward."),
           device: Optional[str] = typer.Option(None, help="torch device, e.g. cuda."),
           dtype: Optional[str] = typer.Option(None, help="float32 (default), bfloat16 or float16."),
           device_map: Optional[str] = typer.Option(None, help=DEVICE_MAP_HELP),
           max_memory: Optional[str] = typer.Option(None, help=MAX_MEMORY_HELP),
           offload_folder: Optional[Path] = typer.Option(None, help=OFFLOAD_HELP),
           threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
           dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and its cost; run nothing."),
           progress: bool = typer.Option(True, help="Show progress bars.")):
    """Where does the difference between two placements arise? Activation patching, position-id
    patching, attention flow, knockout and attribution patching for baseline, BaPA and AGCI."""
    from analyses import plan as pl, registry, vocabulary
    from analyses.causal import probe_grid
    from probes.format import find_probe, read_rows
    _threads(threads)
    agci = vocabulary.parse(f"agci:{lam}", where="--lam").label
    p = find_probe(probe)
    n, m = probe_grid(read_rows(p), p.rows_file)
    for name, c in (("--clean-cell", clean_cell), ("--corrupt-cell", corrupt_cell)):
        if not 0 <= c < n * m:
            raise SpatialBiasError(f"{name} {c}: the probe's {n}×{m} grid has cells 0..{n * m - 1} (row-major)")
    if n_items < 1:
        raise SpatialBiasError(f"--n-items {n_items}: use at least 1")
    cells = [clean_cell, corrupt_cell]
    given = {"items": n_items, "cells": cells, **({"screen": screen} if screen is not None else {})}
    analyses = {a.name: {k: min(v, a.items_cap or v) if k == "items" else v for k, v in given.items() if k in a.options}
                for a in registry.analyses().values() if a.causal}
    cfg = pl.command(model, probe, ["baseline", "bapa", agci], analyses, settings=_settings(batch_size, device, dtype, False, device_map, max_memory,
                                                        offload_folder))
    s = _run_and_report(cfg, out, "spatialbias causal", progress, dry_run)
    if s is None:
        return
    for run in s["runs"]:
        typer.echo(run["causal_conclusion"])
    typer.echo(f"wrote {out / 'summary.json'}, {out / 'tables'}, {out / 'figures'}, {out / 'index.html'}")
