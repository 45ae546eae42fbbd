"""``spatialbias sweep FILE``: a sweep file's plan, run and reported."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from analyses.cli.base import THREADS_HELP, _print_estimate, _threads, app, clean_errors


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
