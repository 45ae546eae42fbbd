"""What every command shares: the ``spatialbias`` typer app and its ``probe`` and ``organism``
groups, option help texts, thread and error handling, run settings, and the one data path
(plan → runner → report) with its dry run."""
from __future__ import annotations

import functools
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
        what = ("weights + activations on the execution device" if p.settings.get("device_map")
                else "weights + activations")
        typer.echo(f"predicted peak ({what}, GiB) per analysis: "
                   + ", ".join(f"{a} {v:.2f}" for a, v in peak.items() if v == v))
    devices = est.attrs.get("devices") or []
    if devices:
        typer.echo("predicted placement per device (accelerate's, from config.json; peak = weights + activations of "
                   "the largest step there, GiB):")
        table = __import__("pandas").DataFrame(devices)
        typer.echo(table.to_string(index=False))
    for note in est.attrs.get("memory_notes", []):
        typer.echo(f"memory: {note}")
    pend = est[est.status == "pending"]
    known = pend.est_seconds.notna()
    eta = (f"; about {pend.est_seconds[known].sum():.0f} s for the {int(known.sum())} with timings from earlier "
           "runs in OUT" if known.any() else "; no earlier timings in OUT to estimate seconds from")
    typer.echo(f"{len(est)} conditions, {len(est) - len(pend)} done, {len(pend)} pending: "
               f"{int(pend.forward_rows.sum())} forward rows{eta}")
