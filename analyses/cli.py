"""``spatialbias``: the command line. Bad input prints one ``error:`` line and exits 2."""
from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Optional

import typer

from interp.errors import SpatialBiasError

TRUST_HELP = ("Let the checkpoint run its own Python code (transformers' trust_remote_code). Off by default: "
              "only do this for checkpoints whose code you have read.")


app = typer.Typer(help="Find, trace and mitigate spatial bias in vision-language models.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
probe_app = typer.Typer(help="Build grid probes.", no_args_is_help=True)
organism_app = typer.Typer(help="The bundled model organism.", no_args_is_help=True)
app.add_typer(probe_app, name="probe")
app.add_typer(organism_app, name="organism")


@app.callback()
def _setup():
    """Find, trace and mitigate spatial bias in vision-language models."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # the toolkit shows its own progress; keeps error output to one line


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


@app.command()
@clean_errors
def report(model: str = typer.Option("organism", help="'organism', a local checkpoint folder, or a cached hub id "
                                     "(e.g. llava-hf/llava-1.5-7b-hf)."),
           out: Path = typer.Option(Path("out/demo"), help="Output folder."),
           probe: Optional[Path] = typer.Option(None, help="A probe folder (probe.jsonl + images); default: build "
                                                "a shapes probe in OUT/probe."),
           n_items: int = typer.Option(300, help="Items in the built probe (each at all 9 positions)."),
           lambdas: str = typer.Option("0.25,0.5,1,2", help="AGCI λ values, comma separated."),
           seed: int = typer.Option(0, help="Seed of the built probe and of the bootstrap."),
           batch_size: int = typer.Option(64, help="Rows per forward."),
           device: Optional[str] = typer.Option(None, help="torch device, e.g. cuda."),
           trust_remote_code: bool = typer.Option(False, help=TRUST_HELP),
           progress: bool = typer.Option(True, help="Show progress bars."),
           causal: bool = typer.Option(True, help="Add the causal analyses (patching, position-id patching, "
                                       "attention flow, knockout, attribution patching)."),
           causal_items: int = typer.Option(100, help="Items used by the causal analyses."),
           from_dir: Optional[Path] = typer.Option(None, "--from", help="A sweep's output folder (results.parquet): "
                                                   "write its HTML report to FROM/report/index.html instead of "
                                                   "running a model; the other options are ignored.")):
    """Evaluate baseline, BaPA and AGCI(λ) on a 3×3 grid probe, localise where the position-dependent
    difference arises; write summary.json, tables, figures and index.html. With --from DIR: report
    a sweep's results table instead."""
    if from_dir is not None:
        from analyses import sweep_report
        typer.echo(f"wrote {sweep_report.build(from_dir)}")
        return
    from analyses import report as rep
    s = rep.run(model, out, probe, n_items=n_items, lambdas=_floats(lambdas), seed=seed, batch_size=batch_size,
                device=device, progress=progress, causal=causal, causal_items=causal_items,
                trust_remote_code=trust_remote_code)
    typer.echo(rep.conclusion(s))
    if causal:
        typer.echo(rep.causal_conclusion(s))
    typer.echo(f"wrote {out / 'index.html'}, {out / 'summary.json'}, {out / 'figures'}")


def _conditions(specs: list[str]) -> dict:
    """'baseline', 'bapa', 'bapa:keep_hw', 'agci:0.5', 'agci-pooled:0.5' → {name: [interventions]}."""
    import interp
    out = {}
    for spec in specs:
        kind, _, arg = spec.partition(":")
        try:
            if kind == "baseline":
                out["baseline"] = []
            elif kind == "bapa":
                out[spec] = [interp.BaPA(variant=arg or "reference")]
            elif kind in ("agci", "agci-pooled"):
                out[spec] = [interp.AGCI(lam=float(arg or 0.5), pooled=kind == "agci-pooled")]
            else:
                raise ValueError
        except ValueError:
            raise SpatialBiasError(f"--condition {spec!r} is not understood; use baseline, bapa, bapa:keep_hw, "
                                   "agci:LAMBDA or agci-pooled:LAMBDA") from None
    return out


@app.command("eval")
def evaluate(model: str = typer.Option(..., help="'organism', a local checkpoint folder, or a cached hub id."),
             probe: Path = typer.Option(..., help="A probe folder (probe.jsonl + images)."),
             out: Path = typer.Option(..., help="Output folder (results.parquet|csv, summary.json)."),
             condition: list[str] = typer.Option(["baseline", "bapa", "agci:0.5"], help="Conditions to score "
                                                 "(repeat): baseline, bapa, bapa:keep_hw, agci:λ, agci-pooled:λ."),
             skip_bad: bool = typer.Option(False, help="Score the good rows and list the bad ones in the results "
                                           "instead of stopping."),
             string_rule: bool = typer.Option(False, help="Also generate text and score it by the paper's prefix rule "
                                              "and a robust rule (pred_text, correct_prefix, correct_robust)."),
             max_new_tokens: int = typer.Option(4, help="Tokens generated per row with --string-rule."),
             similarity: bool = typer.Option(False, help="Also write the similarity score (caption vs image tokens, max "
                                             "and mean pooling) per row: similarity.parquet|csv."),
             occlusion_steps: int = typer.Option(0, help="Also run the occlusion probe with an N×N grid of white "
                                                 "squares (0: off; the paper uses 20): occlusion.parquet|csv."),
             occlusion_square: Optional[int] = typer.Option(None, help="Occluder side in pixels (default: image side "
                                                            "/ steps)."),
             batch_size: int = typer.Option(64, help="Rows per forward."),
             seed: int = typer.Option(0, help="Seed of the bootstrap intervals (recorded)."),
             device: Optional[str] = typer.Option(None, help="torch device, e.g. cuda."),
             trust_remote_code: bool = typer.Option(False, help=TRUST_HELP),
             progress: bool = typer.Option(True, help="Show progress bars.")):
    """Score a probe: the whole probe is validated first; every bad row is reported at once
    (file, line, reason) and nothing is written, unless --skip-bad. Per-cell metrics use the
    probe's grid; shift probes also get an accuracy curve against position."""
    import json

    import interp
    from analyses import figures
    from analyses.evaluate import check_probe, score_probe
    from analyses.metrics import cell_metrics, shift_curve
    from analyses.report import _write_table
    from probes.format import atomic_write_text
    try:
        conds = _conditions(condition)
        if max_new_tokens < 1:
            raise SpatialBiasError(f"--max-new-tokens {max_new_tokens}: use at least 1")
        if occlusion_steps < 0 or (occlusion_square is not None and occlusion_square < 1):
            raise SpatialBiasError("--occlusion-steps must be >= 0 and --occlusion-square >= 1")
        good, problems = check_probe(probe)
    except SpatialBiasError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    if problems and not skip_bad:
        for p in problems:
            typer.echo(f"error: {p}", err=True)
        typer.echo(f"error: {len(problems)} bad row(s) in {probe}; fix them or pass --skip-bad", err=True)
        raise typer.Exit(2)
    if not good:
        typer.echo(f"error: {probe}: no usable rows", err=True)
        raise typer.Exit(2)
    rows = [r for _, r in good]
    line_of = dict(enumerate(n for n, _ in good))
    try:
        lvlm = interp.load(model, device=device, trust_remote_code=trust_remote_code)
        df = score_probe(lvlm, probe, conds, batch_size=batch_size, progress=progress, rows=rows,
                         string_rule=string_rule, max_new_tokens=max_new_tokens)
        summary = {"model": model, "probe": str(probe), "seed": seed, "conditions":
                   {c: cell_metrics(df[df.condition == c], seed=seed) for c in conds},
                   "skipped": [str(p) for p in problems]}
        if string_rule:
            summary["string_rule"] = {c: {"accuracy_prefix": float(d.correct_prefix.mean()),
                                          "accuracy_robust": float(d.correct_robust.mean()),
                                          "accuracy_logits": float(d.correct.mean())}
                                      for c, d in df.groupby("condition", sort=False)}
        figs = {"cell_accuracy": figures.cell_heatmaps(summary["conditions"], title="accuracy per grid cell")}
        if "offset" in df.columns and df["offset"].notna().any():
            curves = {c: shift_curve(df[df.condition == c], seed=seed) for c in conds}
            summary["shift_curve"] = {c: v.to_dict("records") for c, v in curves.items()}
            figs["shift_accuracy"] = figures.shift_curves(curves)
        if similarity:
            from analyses.similarity import similarity_scores, similarity_summary
            sim = similarity_scores(lvlm, probe, rows=rows, batch_size=batch_size, progress=progress)
            sim["line"] = sim["row"].map(line_of)
            _write_table(sim, out, "similarity")
            summary["similarity"] = similarity_summary(sim)
            figs["similarity"] = figures.cell_heatmaps(summary["similarity"], key="cell_sim_image",
                                                       title="cosine(caption, image tokens) per target cell")
        if occlusion_steps:
            from analyses import occlusion as occ
            oc = occ.occlusion_scores(lvlm, probe, conds, rows=rows, steps=occlusion_steps, square=occlusion_square,
                                      batch_size=batch_size, progress=progress)
            oc["line"] = oc["row"].map(line_of)
            _write_table(oc, out, "occlusion")
            summary["occlusion"] = {c: occ.region_table(oc[oc.condition == c]).to_dict("records") for c in conds}
            grid = tuple(summary["conditions"][next(iter(conds))]["grid"])
            for c in conds:
                figs[f"occlusion_{_stem(c)}"] = figures.occlusion_maps(occ.position_maps(oc, c), grid,
                                                                       title=f"occlusion maps ({c})")
    except SpatialBiasError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    df["line"] = df["row"].map(line_of)
    _write_table(df, out)
    for stem, fig in figs.items():
        figures.save(fig, out / "figures", stem)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    typer.echo(f"scored {len(good)} rows ({len(problems)} skipped); wrote {out / 'summary.json'}")


def _stem(name: str) -> str:
    """A file-name-safe form of a condition name ('agci:0.5' → 'agci_0.5')."""
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)


@app.command()
@clean_errors
def causal(model: str = typer.Option("organism", help="'organism', a local checkpoint folder, or a cached hub id."),
           probe: Path = typer.Option(..., help="A grid probe folder (every item at both cells)."),
           out: Path = typer.Option(Path("out/causal"), help="Output folder."),
           clean_cell: int = typer.Option(8, min=0, max=8, help="Cell of the clean placement (row-major 0..8)."),
           corrupt_cell: int = typer.Option(0, min=0, max=8, help="Cell of the corrupt placement."),
           n_items: int = typer.Option(100, help="Items to use."),
           lam: float = typer.Option(0.5, help="AGCI λ of the AGCI condition."),
           batch_size: int = typer.Option(64, help="Rows per forward."),
           device: Optional[str] = typer.Option(None, help="torch device, e.g. cuda."),
           progress: bool = typer.Option(True, help="Show progress bars.")):
    """Where does the difference between two placements arise? Activation patching, position-id
    patching, attention flow, knockout and attribution patching for baseline, BaPA and AGCI."""
    import json

    import interp
    from analyses import figures, report as rep
    from analyses.evaluate import validate_probe
    from probes.format import atomic_write_text
    validate_probe(probe)
    interp.AGCI(lam=lam)
    lvlm = interp.load(model, device=device)
    block, figs = rep.causal_section(lvlm, probe, None, [lam], out, n_items, batch_size, progress,
                                     cells=(clean_cell, corrupt_cell))
    for stem, fig in figs.items():
        figures.save(fig, out / "figures", stem)
    atomic_write_text(out / "attribution.json", json.dumps(block, indent=1, default=float) + "\n")
    typer.echo(rep.causal_conclusion({"attribution": block}))
    typer.echo(f"wrote {out / 'attribution.json'}, {out / 'causal'}, {out / 'figures'}")


@app.command()
@clean_errors
def bench(out: Path = typer.Option(Path("out/bench"), help="Output folder (bench.json, bench.md)."),
          quick: bool = typer.Option(False, help="Fewer items and repeats, no demo run."),
          device: str = typer.Option("cpu", help="torch device, e.g. cuda."),
          real_layers: int = typer.Option(2, help="LM layers of the real-shape LLaVA-1.5-7B / Qwen2.5-VL-7B "
                                          "(random weights); 0 skips them.")):
    """Benchmarks as ratios measured in one run: tracing overhead, batched vs looped patching,
    attribution vs exact patching, scaling with image tokens and sites, demo phases."""
    from analyses import bench as b
    res = b.run(out, quick=quick, device=device, real_layers=real_layers)
    typer.echo(b.markdown(res))


@app.command()
@clean_errors
def sweep(config: Path = typer.Argument(..., help="The sweep file (TOML): models, probes, interventions, analyses, "
                                        "seeds; see docs/sweeps.md."),
          out: Path = typer.Option(..., help="Output folder: results.parquet, parts/, conditions.jsonl, probes/."),
          executor: str = typer.Option("local", help="local (one process) or ray (one task per model)."),
          address: Optional[str] = typer.Option(None, help="Ray cluster address (default: start a local one)."),
          dry_run: bool = typer.Option(False, "--dry-run", help="List the conditions, what is done and the "
                                       "estimated cost; run nothing."),
          only: list[str] = typer.Option([], help="Run only this condition id (repeat), again if it is done."),
          progress: bool = typer.Option(True, help="Show progress bars.")):
    """Run (or resume) a sweep: the cross product of the file's models, probes, interventions,
    analyses and seeds. Finished conditions are kept; re-running the command computes only what is missing."""
    from analyses import sweep as sw
    if dry_run:
        plan = sw.load_sweep(config, out)
        est = sw.estimate(plan, out)
        with __import__("pandas").option_context("display.width", 200, "display.max_rows", 500):
            typer.echo(est.drop(columns=["est_seconds"]).to_string(index=False))
        pend = est[est.status == "pending"]
        known = pend.est_seconds.notna()
        eta = (f"; about {pend.est_seconds[known].sum():.0f} s for the {int(known.sum())} with timings from earlier "
               "runs in OUT" if known.any() else "; no earlier timings in OUT to estimate seconds from")
        typer.echo(f"{len(est)} conditions, {len(est) - len(pend)} done, {len(pend)} pending: "
                   f"{int(pend.forward_rows.sum())} forward rows{eta}")
        return
    res = sw.run_sweep(config, out, executor=executor, address=address, only=only, progress=progress)
    for cid, err in res["failed"]:
        typer.echo(f"error: condition {cid}: {err}", err=True)
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
                progress: bool = typer.Option(True, help="Show a progress bar.")):
    """Build a grid probe: every item at every position (rows in the paper's JSONL format;
    other grids, shift and irregular rows add grid, box and canvas keys; docs/probes.md)."""
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
    if recipe not in RECIPES:
        raise SpatialBiasError(f"unknown recipe {recipe!r}; the zoo has {', '.join(RECIPES)}")
    rec = RECIPES[recipe] if max_steps is None else RECIPES[recipe].with_(max_steps=max_steps)
    model, proc, record, peft_model = tr.train(rec, seed=seed, threads=threads)
    path = tr.save(model, proc, record, out, peft_model)
    typer.echo(f"wrote {path} after {record['steps']} steps (running accuracy {json_acc(record['running_acc'])}); "
               f"sha256 {tr.sha256(path / 'model.safetensors')}")


def json_acc(acc) -> str:
    """A running accuracy, or one per question kind."""
    return ", ".join(f"{k} {v:.3f}" for k, v in acc.items()) if isinstance(acc, dict) else f"{acc:.3f}"


@organism_app.command("zoo")
@clean_errors
def organism_zoo(out: Path = typer.Option(..., help="JSON file of run records (rewritten after each run)."),
                 recipes: str = typer.Option("all", help="Comma-separated recipe names, 'all', or 'none' (only "
                                             "print the table of the runs already in --out)."),
                 seeds: str = typer.Option("0,1,2", help="Comma-separated seeds."),
                 items: int = typer.Option(200, help="Held-out probe items (each at all 9 cells)."),
                 probe_seed: int = typer.Option(12345, help="Seed of the held-out probe."),
                 cache: Optional[Path] = typer.Option(None, help="Cache folder for trained organisms "
                                                      "(default $SPATIALBIAS_CACHE or ~/.cache/spatialbias).")):
    """Train (once, cached) and measure zoo organisms: per-cell accuracy, range, chi-square, BaPA."""
    from analyses.organisms.recipes import RECIPES
    from analyses.organisms.runs import campaign, markdown_table
    names = list(RECIPES) if recipes == "all" else [] if recipes == "none" else \
        [r.strip() for r in recipes.split(",") if r.strip()]
    bad = [n for n in names if n not in RECIPES]
    if bad:
        raise SpatialBiasError(f"unknown recipe(s) {', '.join(bad)}; the zoo has {', '.join(RECIPES)}")
    try:
        seed_list = [int(x) for x in seeds.split(",") if x.strip()]
    except ValueError:
        raise SpatialBiasError(f"--seeds {seeds!r} is not a comma-separated list of integers") from None
    records = campaign(names, seed_list, out, cache, items, probe_seed, log=typer.echo)
    typer.echo(markdown_table(records))


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
