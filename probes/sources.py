"""Image sources for caption probes.

* :func:`folder_source`: a folder of images with a captions file (what users have, e.g. a LAION
  or COCO subset). ``captions.jsonl`` rows ``{"image": "a.jpg", "caption": "..."}`` or
  ``captions.csv`` with columns ``image,caption``; paths are relative to the folder.
* :func:`skimage_source`: the photographs scikit-image ships in ``skimage/data`` (no download),
  with the short hand-written captions of :data:`SKIMAGE_CAPTIONS`.

:func:`get_source` picks one from a CLI ``--source`` value.
"""
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


SKIMAGE_CAPTIONS = {
    "astronaut.png": "an astronaut in an orange spacesuit",
    "brick.png": "a wall of grey bricks",
    "camera.png": "a man looking through a camera on a tripod",
    "cell.png": "a single round cell under a microscope",
    "chelsea.png": "the face of a tabby cat",
    "clock_motion.png": "a motion-blurred wall clock",
    "coffee.png": "a cup of coffee on a red saucer",
    "coins.png": "rows of old coins",
    "grass.png": "a close-up of grass",
    "gravel.png": "a close-up of gravel",
    "horse.png": "the black silhouette of a horse",
    "hubble_deep_field.jpg": "galaxies in deep space",
    "ihc.png": "stained tissue under a microscope",
    "moon.png": "the cratered surface of the moon",
    "motorcycle_left.png": "a red motorcycle in a garage",
    "page.png": "a printed page of text",
    "retina.jpg": "a photograph of the back of an eye",
    "rocket.jpg": "a rocket on a launch pad at night",
    "text.png": "handwritten numbers and symbols",
}
"""scikit-image's bundled pictures (``skimage/data``) with one hand-written caption each; the
captions name different things so that a caption matches only its own picture. Left out:
synthetic images (chessboards, colour wheel, logo, phantom), ``motorcycle_right`` (the same
scene as ``motorcycle_left``) and ``microaneurysms`` (a crop of a retina). All are photographs
except ``horse`` (a silhouette)."""


def skimage_source() -> list[Captioned]:
    """The 19 pictures of :data:`SKIMAGE_CAPTIONS` from the installed scikit-image (read from
    its package folder; nothing is downloaded)."""
    try:
        import skimage
    except ImportError:
        raise ProbeError("--source skimage needs scikit-image (pip install scikit-image==0.26.0)") from None
    folder = Path(skimage.__file__).parent / "data"
    missing = [n for n in SKIMAGE_CAPTIONS if not (folder / n).is_file()]
    if missing:
        raise ProbeError(f"{folder}: scikit-image {skimage.__version__} lacks {', '.join(missing)}; "
                         "install scikit-image 0.26.0 or use a folder source")
    return [Captioned(folder / n, c) for n, c in SKIMAGE_CAPTIONS.items()]


def get_source(source: str | Path) -> tuple[str, list[Captioned]]:
    """``"skimage"`` or a folder → (a label for probe.json, the captioned images)."""
    if str(source) == "skimage":
        return "skimage", skimage_source()
    if not Path(source).is_dir():
        raise ProbeError(f"--source {str(source)!r} is neither 'shapes', 'skimage' nor a folder of images with "
                         "captions.jsonl / captions.csv")
    return str(source), folder_source(source)


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
    if len(out) < 3:
        raise ProbeError(f"{folder}: {len(out)} captioned images; a probe needs at least 3 (a 3×3 item with the "
                         "replace layout needs 11: target, absent caption, 9 distractors)")
    return out


def _item(folder: Path, image, caption, where: str) -> Captioned:
    if not isinstance(image, str) or not isinstance(caption, str) or not caption.strip():
        raise ProbeError(f"{where}: 'image' and 'caption' must be non-empty strings")
    row = ProbeRow(id="-", image=image, position="center", answer="Yes", caption=caption)
    return Captioned(resolve_image(folder, row, where), caption)
