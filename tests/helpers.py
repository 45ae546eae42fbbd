"""Test helpers shared by several test files (importable because pytest puts tests/ on the path)."""
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
