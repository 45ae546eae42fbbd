"""Sizes and device maps as the command line and sweep files spell them (``40GiB``,
``0=20GiB,cpu=60GiB``): pure Python, shared by ``interp.load`` and ``analyses.plan``."""
from __future__ import annotations

import re

from spatialbias.errors import SpatialBiasError

MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.I)
_UNITS = {"b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_size(text: str | int | float, what: str = "size") -> int:
    """Bytes of ``"40GiB"``, ``"512MB"``, ``"1.5TiB"`` or a plain number of bytes; one error line otherwise."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return int(text)
    m = _SIZE.match(str(text))
    if not m:
        raise SpatialBiasError(f"{what} {text!r} is not a size; write e.g. 40GiB, 512MiB or 20GB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").lower()])


def parse_max_memory(text: str) -> dict:
    """``"0=20GiB,1=20GiB,cpu=60GiB"`` → {0: bytes, 1: bytes, "cpu": bytes} (accelerate's
    ``max_memory``; device keys are GPU indices, ``cpu`` or ``disk``). A single size without
    ``=`` means every GPU and the CPU (``{"all": bytes}``, expanded by the caller)."""
    out: dict = {}
    for part in [p for p in str(text).split(",") if p.strip()]:
        if "=" not in part:
            out["all"] = parse_size(part, "--max-memory")
            continue
        dev, size = (x.strip() for x in part.split("=", 1))
        key = int(dev) if dev.isdigit() else dev.removeprefix("cuda:") if dev.startswith("cuda:") else dev
        key = int(key) if isinstance(key, str) and key.isdigit() else key
        if not (isinstance(key, int) or key in ("cpu", "disk", "mps")):
            raise SpatialBiasError(f"--max-memory device {dev!r}: use a GPU index (0, 1, …), cpu or disk")
        out[key] = parse_size(size, f"--max-memory {dev}")
    if not out:
        raise SpatialBiasError(f"--max-memory {text!r}: give a size (40GiB) or per device (0=20GiB,cpu=60GiB)")
    return out
