"""``spatialbias``: the command line. Bad input prints one ``error:`` line and exits 2."""
from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Optional

import typer

from spatialbias.errors import SpatialBiasError

TRUST_HELP = ("Let the checkpoint run its own Python code (transformers' trust_remote_code). Off by default: "
              "only do this for checkpoints whose code you have read.")


app = typer.Typer(help="Find, trace and mitigate spatial bias in vision-language models.", rich_markup_mode=None,
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
probe_app = typer.Typer(help="Build grid probes.", no_args_is_help=True, rich_markup_mode=None)
organism_app = typer.Typer(help="The bundled model organism.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(probe_app, name="probe")
app.add_typer(organism_app, name="organism")


def _version(value: bool):
    if value:
        from spatialbias import __version__
        typer.echo(f"spatialbias {__version__}")
        raise typer.Exit()


@app.callback()
def _setup(version: bool = typer.Option(False, "--version", is_eager=True, callback=_version,
                                        help="Print the version and exit.")):
    """Find, trace and mitigate spatial bias in vision-language models."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # the toolkit shows its own progress; keeps error output to one line


THREADS_HELP = ("torch CPU threads (default: the cores not busy now, i.e. CPU count minus the load "
                "average, at least 1; also $SPATIALBIAS_THREADS).")


def _threads(n: Optional[int]) -> None:
    from analyses.runner import choose_threads
    if n is not None and n < 1:
        raise SpatialBiasError(f"--threads {n}: use 1 or more")
    choose_threads(n)


def clean_errors(fn):
    """Turn the toolkit's own errors into one line on stderr and exit code 2."""
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except SpatialBiasError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)
    return wrapper


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SpatialBiasError(f"--lambdas {text!r} is not a comma-separated list of numbers, e.g. 0.25,0.5,1") from None


DEVICE_MAP_HELP = ("Split the model across devices and disk with accelerate: auto, balanced, sequential "
                   "(needs --offload-folder when weights go to disk). Results equal the unsplit model's.")
MAX_MEMORY_HELP = ("Memory per device, e.g. 40GiB or 0=40GiB,1=40GiB,cpu=100GiB: bounds the weights placed by "
                   "--device-map and the rows per forward (default: what the device has free).")
OFFLOAD_HELP = "Folder for weights --device-map puts on disk (memory-mapped)."


def _settings(batch_size: int, device: str | None, dtype: str | None, trust_remote_code: bool = False,
              device_map: str | None = None, max_memory: str | None = None,
              offload_folder: Path | None = None) -> dict:
    """Run settings into the plan: dtype enters every condition id (it changes numbers);
    device_map / max_memory / offload_folder are placement settings outside the ids (dispatched
    and chunked runs equal undispatched, unchunked ones: tests/test_dispatch.py, test_memory.py)."""
    out = {"batch_size": batch_size, "device": device, "dtype": dtype, "device_map": device_map,
           "max_memory": max_memory, "offload_folder": None if offload_folder is None else str(offload_folder)}
    if device_map is not None and device is not None:
        raise SpatialBiasError(f"--device {device} and --device-map {device_map} were both given: use --device for "
                               "one device, --device-map to split the model across devices and disk")
    if trust_remote_code:
        out["trust_remote_code"] = True
    return out


DRY_RUN_CANVAS = 336
"""Probe side a dry run plans with when the model's files are not here to size it (the paper's)."""


def _run_and_report(cfg: dict, out: Path, where: str, progress: bool, dry_run: bool = False) -> dict | None:
    """Plan → runner → report, the one data path every command takes. Returns the summary (None
    for a dry run, which prints the plan and its cost instead)."""
    import json

    from analyses import plan as pl, report as rep, runner
    p = pl.from_mapping(cfg, Path.cwd(), out, where)
    if dry_run:
        _print_estimate(p, out)
        return None
    res = runner.run(p, out, progress=progress)
    for cid, err in res["failed"]:
        typer.echo(f"error: condition {cid}: {err}", err=True)
    if res["failed"]:
        raise typer.Exit(1)
    rep.build(out)
    return json.loads((out / "summary.json").read_text())


def _print_estimate(p, out: Path) -> None:
    from analyses.estimate import estimate
    est = estimate(p, out)
    with __import__("pandas").option_context("display.width", 200, "display.max_rows", 500):
        typer.echo(est.drop(columns=["est_seconds"]).to_string(index=False))
    peak = est.groupby("analysis", sort=False).peak_GiB.max()
    if peak.notna().any():
        what = "activations" if p.settings.get("device_map") else "weights + activations"
        typer.echo(f"predicted peak ({what}, GiB) per analysis: "
                   + ", ".join(f"{a} {v:.2f}" for a, v in peak.items() if v == v))
    for note in est.attrs.get("memory_notes", []):
        typer.echo(f"memory: {note}")
    pend = est[est.status == "pending"]
    known = pend.est_seconds.notna()
    eta = (f"; about {pend.est_seconds[known].sum():.0f} s for the {int(known.sum())} with timings from earlier "
           "runs in OUT" if known.any() else "; no earlier timings in OUT to estimate seconds from")
    typer.echo(f"{len(est)} conditions, {len(est) - len(pend)} done, {len(pend)} pending: "
               f"{int(pend.forward_rows.sum())} forward rows{eta}")


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


@app.command()
@clean_errors
def bench(out: Path = typer.Option(Path("out/bench"), help="Output folder (bench.json, bench.md)."),
          quick: bool = typer.Option(False, help="Fewer items and repeats, no demo run."),
          device: str = typer.Option("cpu", help="torch device, e.g. cuda."),
          real_layers: int = typer.Option(2, help="LM layers of the real-shape LLaVA-1.5-7B / Qwen2.5-VL-7B "
                                          "(random weights); 0 skips them."),
          threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
          only: Optional[str] = typer.Option(None, help="Run only these scale sections, comma separated: memory, "
                                             "speed, sharding, screen (bench.json + bench.md in OUT).")):
    """Benchmarks as ratios measured in one run: tracing overhead, batched vs looped patching,
    attribution vs exact patching, scaling with image tokens and sites, demo phases."""
    from analyses.bench import ratios as b
    _threads(threads)
    if only is not None:
        import json

        from analyses.bench import scale as bs
        from spatialbias.files import atomic_write_text
        names = tuple(x.strip() for x in only.split(",") if x.strip())
        bad = [x for x in names if x not in bs.SECTIONS]
        if bad or not names:
            raise SpatialBiasError(f"--only {only!r}: use sections from {', '.join(bs.SECTIONS)}")
        out.mkdir(parents=True, exist_ok=True)
        res = bs.run(out, names)
        atomic_write_text(out / "bench.json", json.dumps(res, indent=1, default=str) + "\n")
        atomic_write_text(out / "bench.md", bs.markdown(res))
        typer.echo(bs.markdown(res))
        return
    res = b.run(out, quick=quick, device=device, real_layers=real_layers)
    typer.echo(b.markdown(res))


@app.command()
@clean_errors
def sweep(config: Path = typer.Argument(..., help="The sweep file (TOML): models, probes, interventions, analyses, "
                                        "seeds; see docs/sweeps.md."),
          out: Path = typer.Option(..., help="Output folder: results.parquet, parts/, details/, conditions.jsonl."),
          executor: str = typer.Option("local", help="local (one process) or ray (one task per model)."),
          address: Optional[str] = typer.Option(None, help="Ray cluster address (default: start a local one)."),
          dry_run: bool = typer.Option(False, "--dry-run", help="List the conditions, what is done and the "
                                       "estimated cost; run nothing."),
          only: list[str] = typer.Option([], help="Run only this condition id (repeat), again if it is done."),
          report: bool = typer.Option(True, help="Write the report (index.html, summary.json, figures) at the end."),
          threads: Optional[int] = typer.Option(None, help=THREADS_HELP),
          progress: bool = typer.Option(True, help="Show progress bars.")):
    """Run (or resume) a sweep: the cross product of the file's models, probes, interventions,
    analyses and seeds. Finished conditions are kept; re-running the command computes only what is missing."""
    from analyses import plan as pl, report as rep, runner
    _threads(threads)
    p = pl.load(config, out)
    if dry_run:
        _print_estimate(p, out)
        return
    res = runner.run(p, out, executor=executor, address=address, only=only, progress=progress)
    for cid, err in res["failed"]:
        typer.echo(f"error: condition {cid}: {err}", err=True)
    if report and res["rows"]:
        rep.build(out)
    typer.echo(f"{res['done']}/{res['total']} conditions done ({res['ran']} run now, {len(res['failed'])} failed); "
               f"wrote {res['results']}")
    if res["failed"]:
        raise typer.Exit(1)


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


@organism_app.command("train")
@clean_errors
def organism_train(out: Path = typer.Option(..., help="Output checkpoint folder."),
                   recipe: str = typer.Option("planted-lm", help="Zoo recipe (analyses/organisms/recipes.py); "
                                              "planted-lm is the shipped organism."),
                   seed: int = typer.Option(0, help="Seed (the shipped checkpoint used 0 with 1 thread)."),
                   threads: int = typer.Option(1, help="torch threads; bit-for-bit reproduction needs the same count."),
                   max_steps: Optional[int] = typer.Option(None, help="Upper bound on steps (default: the recipe's; "
                                                           "most recipes stop at 80% running accuracy).")):
    """Train an organism of the zoo from scratch (planted-lm: about a minute on one CPU thread)."""
    from analyses.organisms import train as tr
    from analyses.organisms.recipes import RECIPES
    from analyses.organisms.zoo import train_recipe
    if recipe not in RECIPES:
        raise SpatialBiasError(f"unknown recipe {recipe!r}; the zoo has {', '.join(RECIPES)}")
    rec = RECIPES[recipe] if max_steps is None else RECIPES[recipe].with_(max_steps=max_steps)
    model, proc, record, peft_model = train_recipe(rec, seed=seed, threads=threads)
    path = tr.save(model, proc, record, out, peft_model)
    typer.echo(f"wrote {path} after {record['steps']} steps (running accuracy {json_acc(record['running_acc'])}); "
               f"sha256 {tr.sha256(path / 'model.safetensors')}")


def json_acc(acc) -> str:
    """A running accuracy, or one per question kind."""
    return ", ".join(f"{k} {v:.3f}" for k, v in acc.items()) if isinstance(acc, dict) else f"{acc:.3f}"


@app.command("zoo")
@clean_errors
def zoo(out: Path = typer.Option(..., help="Run folder (resumable): results.parquet, zoo.parquet/.csv/.md, "
                                 "summary.json, figures/zoo_diagnosis.png/.svg."),
        recipes: str = typer.Option("all", help="Comma-separated organisms (analyses/organisms/recipes.py) or 'all'."),
        seeds: str = typer.Option("0,1,2", help="Comma-separated training seeds of each organism."),
        items: int = typer.Option(200, help="Probe items (each at all 9 cells) of the eval conditions."),
        causal_items: int = typer.Option(50, help="Items of the patching analysis (cells 8 → 0)."),
        lambdas: str = typer.Option("0.25,0.5,1,2", help="AGCI λ values."),
        executor: str = typer.Option("local", help="'local' or 'ray'."),
        cache: Optional[Path] = typer.Option(None, help="Cache folder for trained organisms "
                                             "(default $SPATIALBIAS_CACHE or ~/.cache/spatialbias)."),
        threads: Optional[int] = typer.Option(None, help=THREADS_HELP)):
    """Organism zoo: train or load each organism, run eval (baseline, BaPA, AGCI) and patching
    (activation, position-id, vision-side) through the sweep runner, and score the automatic
    diagnosis against where each bias was planted."""
    _threads(threads)
    from analyses.organisms.recipes import RECIPES
    from analyses.organisms.zoo_table import markdown, run
    names = list(RECIPES) if recipes == "all" else [r.strip() for r in recipes.split(",") if r.strip()]
    try:
        seed_list = [int(x) for x in seeds.split(",") if x.strip()]
        lams = [float(x) for x in lambdas.split(",") if x.strip()]
    except ValueError:
        raise SpatialBiasError(f"--seeds {seeds!r} / --lambdas {lambdas!r}: give comma-separated numbers") from None
    tab = run(out, names, seed_list, items=items, causal_items=causal_items, lambdas=lams, executor=executor,
              cache_dir=cache, log=typer.echo)
    typer.echo(markdown(tab))


@app.command("finetune")
@clean_errors
def finetune(out: Path = typer.Option(..., help="Output folder: lora/ and lora-bapa/ checkpoints (with adapter/), "
                                      "results, report, finetune.parquet/.csv/.md."),
             seed: int = typer.Option(0, help="Seed of the planted-lm organism and of the fine-tuning."),
             steps: int = typer.Option(300, help="LoRA steps (300: the zoo's cached lora / lora-bapa recipes)."),
             items: int = typer.Option(200, help="Probe items (each at all 9 cells)."),
             cache: Optional[Path] = typer.Option(None, help="Cache folder for trained organisms "
                                                  "(default $SPATIALBIAS_CACHE or ~/.cache/spatialbias)."),
        threads: Optional[int] = typer.Option(None, help=THREADS_HELP)):
    """Lightweight fine-tuning of the planted-lm organism on uniform target cells: no fine-tuning
    vs LoRA vs LoRA with BaPA active, accuracy and range with 95% intervals under baseline and BaPA."""
    _threads(threads)
    from analyses.organisms.finetune import markdown, run
    tab = run(out, seed=seed, steps=steps, items=items, cache_dir=cache)
    typer.echo(markdown(tab, seed, steps))


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
