"""Image sources for caption probes: a folder of images with a captions file (what users have,
e.g. a LAION or COCO subset). ``captions.jsonl`` rows ``{"image": "a.jpg", "caption": "..."}``
or ``captions.csv`` with columns ``image,caption``; paths are relative to the folder."""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from probes.format import ProbeError, ProbeRow, resolve_image


@dataclass(frozen=True)
class Captioned:
    path: Path
    caption: str


def folder_source(folder: str | Path) -> list[Captioned]:
    """Every (image, caption) of ``folder``; bad rows raise :class:`ProbeError` naming file and line."""
    folder = Path(folder)
    out = []
    jl, cv = folder / "captions.jsonl", folder / "captions.csv"
    if jl.is_file():
        for n, line in enumerate(jl.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                img, cap = obj["image"], obj["caption"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ProbeError(f"{jl}:{n}: need a JSON object with 'image' and 'caption'") from None
            out.append(_item(folder, img, cap, f"{jl}:{n}"))
    elif cv.is_file():
        with open(cv, newline="", encoding="utf-8") as fh:
            for n, rec in enumerate(csv.DictReader(fh), 2):
                if not rec.get("image") or not rec.get("caption"):
                    raise ProbeError(f"{cv}:{n}: need columns 'image' and 'caption'")
                out.append(_item(folder, rec["image"], rec["caption"], f"{cv}:{n}"))
    else:
        raise ProbeError(f"{folder}: no captions.jsonl or captions.csv; add one with 'image' and 'caption' per row")
    if len(out) < 10:
        raise ProbeError(f"{folder}: {len(out)} captioned images; a 3×3 probe item needs at least 10")
    return out


def _item(folder: Path, image, caption, where: str) -> Captioned:
    if not isinstance(image, str) or not isinstance(caption, str) or not caption.strip():
        raise ProbeError(f"{where}: 'image' and 'caption' must be non-empty strings")
    row = ProbeRow(id="-", image=image, position="center", answer="Yes", caption=caption)
    return Captioned(resolve_image(folder, row, where), caption)
