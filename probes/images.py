"""Opening probe images safely: PIL's decompression-bomb limit stays on; truncated and
non-image files, and images too small for the grid, are refused with one line; grayscale,
palette, RGBA (composited on white), CMYK and 16-bit images are converted to 8-bit RGB."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from probes.format import ProbeError

MIN_CELL_PX = 4
"""The smallest cell side, in pixels, an image may give each grid cell."""


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode (16/32-bit integer and float images are rescaled to 0..255)."""
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(a)
        return Image.fromarray(a.astype(np.uint8)).convert("RGB")
    return im.convert("RGB")


def load_rgb(path: Path, where: str, grid: tuple[int, int] = (3, 3)) -> Image.Image:
    """Open, fully decode and convert an image; :class:`ProbeError` (naming ``where`` and the
    file) for anything unusable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                rgb = to_rgb(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ProbeError(f"{where}: image {path} is too large to open safely ({e}); downscale it") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ProbeError(f"{where}: image {path} cannot be read ({type(e).__name__}: {e}); "
                         "replace the file or rebuild the probe") from None
    w, h = rgb.size
    if w < MIN_CELL_PX * grid[1] or h < MIN_CELL_PX * grid[0]:
        raise ProbeError(f"{where}: image {path} is {w}×{h} px, too small for a {grid[0]}×{grid[1]} grid "
                         f"(at least {MIN_CELL_PX * grid[1]}×{MIN_CELL_PX * grid[0]}); use a larger image")
    return rgb
