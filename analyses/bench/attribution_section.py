"""The attribution section of ``spatialbias bench`` alone, at any number of organism items
(the full bench takes 100; ``--quick`` 40):

    .venv/bin/python -m analyses.bench.attribution_section --items 100 --out docs/bench_cpu_attribution_100.json

Writes {machine, items, attribution: analyses.bench.ratios.attribution_vs_exact(...)} and prints one line
per granularity × estimator.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from analyses.bench import common, ratios
from interp import patching


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=100)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    m, pairs = common.organism_pairs(Path(tempfile.mkdtemp()), args.items)
    r = ratios.attribution_vs_exact(m, pairs.corrupt, pairs.clean, patching.default_patches(m), pairs.correct,
                                    pairs.candidates, pairs.targets)
    Path(args.out).write_text(json.dumps({"machine": common.machine(), "items": args.items, "attribution": r},
                                         indent=1) + "\n")
    for g in ("patches", "positions"):
        for k, v in r[g]["methods"].items():
            nn = v["spearman_nonnegligible"]
            print(f"{r[g]['n']:4d} {g:9s} {k:14s} {v['s']:.3f} s (exact {r[g]['exact_s']:.3f} s) "
                  f"{v['speedup']:5.1f}x  Spearman {v['spearman']:.2f}  |exact|>=0.05: "
                  f"{'-' if nn is None else f'{nn:.2f}'} (n={v['n_nonnegligible']})  top-10 {v['top10_overlap']}/10")


if __name__ == "__main__":
    main()
