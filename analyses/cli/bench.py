"""``spatialbias bench``: the benchmarks of :mod:`analyses.bench`."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from analyses.cli.base import THREADS_HELP, _threads, app, clean_errors
from spatialbias.errors import SpatialBiasError


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
