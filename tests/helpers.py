"""Test helpers shared by several test files (importable because pytest puts tests/ on the path)."""
import contextlib
import json

import numpy as np
from PIL import Image

from probes.format import POSITIONS


def paper_probe(folder, n_items: int = 2, size: int = 60, ext: str = "jpg"):
    """A probe written by hand exactly as the paper publishes it: integer ids, only
    id/image/caption/position/answer, every answer Yes, random images {id}_{k}.{ext} beside the
    rows file ``probe.jsonl``."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n_items):
        for k, pos in enumerate(POSITIONS):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}_{k}.{ext}")
            lines.append(json.dumps({"id": i, "image": f"{i}_{k}.{ext}", "caption": f"a cat {i}", "position": pos,
                                     "answer": "Yes"}))
    (folder / "probe.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def mirrored_pair(m, n: int = 3, size: int = 48, questions=None):
    """Two placements of ``n`` tiny images for a loaded model ``m``: as drawn (clean) and mirrored
    on both axes (corrupt, so each item's content moves to the opposite cell), with the same
    prompts (``questions``, default "what is this ?" for every row); answer candidates cat/dog/red
    and each row's correct one (cycling). Returns (clean, corrupt, correct (n,), candidates)."""
    import torch

    from interp import tiny
    imgs = [tiny.image(size, size, seed=s) for s in range(n)]
    qs = list(questions) if questions is not None else [m.prompt("what is this ?")] * n
    clean = m.inputs(imgs, qs)
    corrupt = m.inputs([im.transpose(0).transpose(1) for im in imgs], qs)
    cands = [m.tokenizer.convert_tokens_to_ids(w) for w in ("cat", "dog", "red")]
    return clean, corrupt, torch.tensor([cands[i % 3] for i in range(n)]), cands


def bf16_sdpa_forced_off() -> bool:
    """True where torch 2.13's bf16 SDPA kernel for CPU cannot run: ``ATEN_CPU_CAPABILITY=default``
    forced on a CPU that has AVX-512 (the kernel checks the CPU, its build is the forced level, and
    it fails inside torch: "pack_vnni2 is only supported when avx512 is supported")."""
    import torch
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        flags = ""
    return torch.backends.cpu.get_cpu_capability() == "DEFAULT" and "avx512" in flags


def dry_run_peaks(folder, out) -> list[float]:
    """``spatialbias report --dry-run`` (bf16, an 80 GiB budget) on a config-only ``folder``, in a
    subprocess: the predicted peak (GiB) of each analysis, from its summary line."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "analyses.cli", "report", "--model", str(folder), "--dry-run",
                        "--dtype", "bfloat16", "--max-memory", "80GiB", "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    peaks = next(ln for ln in r.stdout.splitlines() if ln.startswith("predicted peak (weights + activations"))
    return [float(x.split()[-1]) for x in peaks.split(":", 1)[1].split(",")]


@contextlib.contextmanager
def stand_in_timm():
    """Within it a saved tiny Gemma3n loads where timm is missing: HF builds the stand-in tower
    (:func:`interp.tiny.gemma3n.stand_in_tower`) where it would build timm's, and the adapter's
    timm requirement is lifted. The rest of :func:`interp.load` is the real path. Other
    architectures are unaffected."""
    from interp.adapters.gemma3n import Gemma3nAdapter
    from interp.tiny.gemma3n import stand_in_tower
    real = Gemma3nAdapter.load_requirements
    Gemma3nAdapter.load_requirements = lambda self: None
    try:
        with stand_in_tower():
            yield
    finally:
        Gemma3nAdapter.load_requirements = real
