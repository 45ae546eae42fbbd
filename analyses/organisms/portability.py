"""Does an organism's training give the same bytes under different CPU kernel selections?

Each setting trains one recipe in a fresh subprocess (``spatialbias organism train``; the
environment variables must be set before torch is imported) and the weights' sha256 are
compared. Settings:

* ``machine``: torch's own choice (``torch.backends.cpu.get_cpu_capability()``);
* ``aten_default`` / ``aten_avx2``: ``ATEN_CPU_CAPABILITY`` forces ATen's vectorised kernels to
  the baseline (no SIMD dispatch) or AVX2 code;
* ``portable``: ``ATEN_CPU_CAPABILITY=default`` + ``MKL_CBWR=COMPATIBLE`` (MKL's conditional
  numerical reproducibility: one code path on every x86 CPU) + ``ONEDNN_MAX_CPU_ISA=SSE41``;
* ``portable_avx2``: the same but ATen at AVX2 (does MKL's mode alone suffice?).

Run: ``python -m analyses.organisms.portability --recipe planted-lm --max-steps 100 --out F.json``.
One machine can only show which settings change the bytes here; whether ``portable`` gives the
same bytes on another CPU must be checked there (run this module and compare the hashes).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS: dict[str, dict[str, str]] = {
    "machine": {},
    "aten_default": {"ATEN_CPU_CAPABILITY": "default"},
    "aten_avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "portable": {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "SSE41"},
    "portable_avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "SSE41"},
}
CONTROLLED = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def train_hash(setting: str, recipe: str, seed: int, max_steps: int | None, out: Path) -> dict:
    """Train in a subprocess under ``SETTINGS[setting]``; returns the record's key facts."""
    env = {k: v for k, v in os.environ.items() if k not in CONTROLLED}
    env.update(SETTINGS[setting])
    cmd = [sys.executable, "-m", "analyses.cli", "organism", "train", "--recipe", recipe, "--seed", str(seed),
           "--threads", "1", "--out", str(out)]
    if max_steps is not None:
        cmd += ["--max-steps", str(max_steps)]
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    rec = json.loads((out / "training.json").read_text())
    return {"setting": setting, "env": SETTINGS[setting], "sha256": rec["sha256"], "steps": rec["steps"],
            "cpu_capability": rec["cpu_capability"], "cpu_model": rec["cpu_model"],
            "seconds": round(time.perf_counter() - t0, 1), "loadavg_start": rec["loadavg_start"]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default="planted-lm")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--keep", type=Path, default=None, help="keep the checkpoints in KEEP/<setting>")
    a = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = a.keep or Path(tmp)
        for s in a.settings.split(","):
            rows.append(train_hash(s, a.recipe, a.seed, a.max_steps, root / s))
            print(json.dumps(rows[-1]), flush=True)
    a.out.write_text(json.dumps({"recipe": a.recipe, "seed": a.seed, "max_steps": a.max_steps, "runs": rows},
                                indent=1) + "\n")


if __name__ == "__main__":
    main()
