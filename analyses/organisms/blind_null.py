"""The paired test's false-positive rate on a real checkpoint with no position effect: the blind
organism (invariant to permuting the grid's cells by construction, tests/test_blind.py) scored on
many freshly built shapes probes; one JSON line per probe (its mean accuracy, paired and χ² p,
raw and debiased range and the range's 95 % interval), then the rates.

    python -m analyses.organisms.blind_null --probes 200 --items 120 --out docs/blind_null.jsonl
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def run(n_probes: int, n_items: int, out: Path, first_seed: int = 1000) -> dict:
    """Score ``n_probes`` probes (seeds ``first_seed`` …) of ``n_items`` items; returns the rates."""
    import torch

    import interp
    from analyses.evaluate import score_probe
    from analyses.metrics import cell_metrics
    from analyses.organisms import zoo
    from probes.build import shapes_probe
    torch.set_num_threads(1)
    lvlm = interp.load(str(zoo.get("blind", 0)))
    rows, t0 = [], time.time()
    with tempfile.TemporaryDirectory() as tmp, open(out, "w") as f:
        for s in range(n_probes):
            probe = shapes_probe(Path(tmp) / f"p{s}", n_items=n_items, seed=first_seed + s, progress=False)
            folder = probe.parent if probe.is_file() else probe
            m = cell_metrics(score_probe(lvlm, folder, {"baseline": []}, progress=False), seed=s)
            rows.append({"seed": first_seed + s, "acc": float(np.mean(m["cell_accuracy"])), "p": float(m["paired_p"]),
                         "chi2_p": float(m["chi2_p"]), "range": float(m["range"]),
                         "range_debiased": float(m["range_debiased"]), "ci": [float(x) for x in m["range_ci"]]})
            f.write(json.dumps(rows[-1]) + "\n")
    p, c = np.array([r["p"] for r in rows]), np.array([r["chi2_p"] for r in rows])
    return {"probes": n_probes, "items": n_items, "paired_fpr_05": float((p < 0.05).mean()),
            "paired_fpr_01": float((p < 0.01).mean()), "chi2_fpr_05": float((c < 0.05).mean()),
            "range_ci_contains_0": float(np.mean([r["ci"][0] <= 0 for r in rows])), "seconds": time.time() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--probes", type=int, default=200)
    ap.add_argument("--items", type=int, default=120)
    ap.add_argument("--out", type=Path, default=Path("blind_null.jsonl"))
    a = ap.parse_args()
    print(json.dumps(run(a.probes, a.items, a.out)))


if __name__ == "__main__":
    main()
