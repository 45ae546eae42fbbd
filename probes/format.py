"""The paper's probe format: JSON Lines rows, one per (item, position).

A row holds ``id`` (the item), ``image`` (a file name relative to the probe folder,
``{id}_{k}.png|jpg``), ``position`` (one of :data:`POSITIONS` for a 3×3 grid), ``answer``,
and either ``caption`` (the paper's Yes/No matching task) or ``question`` (an open question
whose answer is one word, as in the model organism's task). The 9 variants of an item are
consecutive rows. Extra keys are kept in :attr:`ProbeRow.extra`.

Beyond the paper (docs/probes.md): a row may carry ``grid`` (``"4x4"``; absent means the
paper's 3×3), ``box`` (the target's ``[x0, y0, x1, y1]`` in canvas pixels, x1/y1 exclusive)
and ``canvas`` (the canvas side in pixels). Position names: the paper's 9 names for 3×3,
``r{row}c{col}`` for other n×m grids (:func:`grid_positions`), and any name (``shift_0140``,
``box3``) for rows with a ``box``, whose cell is the grid cell holding the box's centre.

This is the only module that knows the file layout: ``DIR/probe.jsonl`` plus the images
beside it, and an optional ``DIR/probe.json`` with probe-level metadata (grid shape, the
answer vocabulary, how the probe was made).
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from interp.errors import SpatialBiasError

POSITIONS = ("top_left", "top_center", "top_right", "left", "center", "right",
             "bottom_left", "bottom_center", "bottom_right")
"""Position names of the 3×3 grid, row-major (method.md §2)."""

MAX_GRID = 16
"""The largest number of rows or columns a probe grid may have."""

PROBE_FILE = "probe.jsonl"
META_FILE = "probe.json"


class ProbeError(SpatialBiasError):
    """A probe file or row is unusable; the message names the file and line."""


def grid_positions(n: int, m: int) -> tuple[str, ...]:
    """Position names of an n×m grid, row-major: the paper's 9 names for 3×3, else
    ``r{row}c{col}`` (``r0c0`` … ``r{n-1}c{m-1}``)."""
    if (n, m) == (3, 3):
        return POSITIONS
    return tuple(f"r{r}c{c}" for r in range(n) for c in range(m))


def grid_name(grid: tuple[int, int]) -> str:
    """``(4, 4)`` → ``"4x4"`` (the form rows and the CLI use)."""
    return f"{grid[0]}x{grid[1]}"


def parse_grid(value: Any, where: str = "grid") -> tuple[int, int]:
    """``"4x4"``, ``"2X3"``, ``[4, 4]`` or ``(4, 4)`` → (rows, cols), each 1..:data:`MAX_GRID`;
    :class:`ProbeError` naming ``where`` otherwise."""
    if isinstance(value, str):
        mt = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", value)
        nm = (int(mt.group(1)), int(mt.group(2))) if mt else None
    elif isinstance(value, (list, tuple)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        nm = (int(value[0]), int(value[1]))
    else:
        nm = None
    if nm is None or not (1 <= nm[0] <= MAX_GRID and 1 <= nm[1] <= MAX_GRID) or nm == (1, 1):
        raise ProbeError(f"{where}: grid {value!r} is not understood; write rows x cols, e.g. 3x3 or 4x4 "
                         f"(each 1..{MAX_GRID}, at least two cells)")
    return nm


def cell_of_point(x: float, y: float, size: int, grid: tuple[int, int]) -> int:
    """Row-major cell of an n×m grid over a ``size``×``size`` canvas that holds pixel (x, y)."""
    n, m = grid
    r = min(n - 1, max(0, int(y * n // size)))
    c = min(m - 1, max(0, int(x * m // size)))
    return r * m + c


@dataclass(frozen=True)
class ProbeRow:
    id: str
    image: str
    position: str
    answer: str
    caption: str | None = None
    question: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of the row's grid: its ``grid`` key, else the paper's (3, 3)."""
        g = self.extra.get("grid")
        return (3, 3) if g is None else parse_grid(g, f"row id={self.id}")

    @property
    def n_cells(self) -> int:
        n, m = self.grid
        return n * m

    @property
    def box(self) -> tuple[int, int, int, int] | None:
        """The target's box ``(x0, y0, x1, y1)`` in canvas pixels, when the row carries one."""
        b = self.extra.get("box")
        return None if b is None else tuple(int(v) for v in b)  # type: ignore[return-value]

    @property
    def cell(self) -> int:
        """Row-major index of the target's cell in the row's grid (0..n·m−1): the named
        position (paper names for 3×3, ``r{i}c{j}`` otherwise), else the cell holding the
        centre of :attr:`box`."""
        n, m = self.grid
        names = grid_positions(n, m)
        if self.position in names:
            return names.index(self.position)
        b = self.box
        if b is None:
            raise ProbeError(f"row id={self.id}: position {self.position!r} is not a cell of a {n}x{m} grid "
                             "and the row has no 'box'")
        return cell_of_point((b[0] + b[2]) / 2, (b[1] + b[3]) / 2, int(self.extra["canvas"]), (n, m))

    @property
    def text(self) -> str:
        """The caption or the question, whichever the row has."""
        return self.caption if self.caption is not None else self.question  # type: ignore[return-value]

    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "extra" and v is not None}
        d.update(self.extra)
        return d


_KNOWN = {"id", "image", "position", "answer", "caption", "question"}


def parse_row(obj: Any, where: str) -> ProbeRow:
    """Validate one decoded JSON object; ``where`` ("file:line") goes into every error."""
    if not isinstance(obj, dict):
        raise ProbeError(f"{where}: a row must be a JSON object, got {type(obj).__name__}; "
                         "write one object per line with id, image, position, answer and caption or question")
    missing = [k for k in ("id", "image", "position", "answer") if k not in obj]
    if "caption" not in obj and "question" not in obj:
        missing.append("caption or question")
    if missing:
        raise ProbeError(f"{where}: missing field(s) {', '.join(missing)}; every row needs id, image, "
                         "position, answer and caption or question")
    for k in ("image", "position", "answer", "caption", "question"):
        if k in obj and not isinstance(obj[k], str):
            raise ProbeError(f"{where}: field '{k}' must be a string, got {type(obj[k]).__name__}")
    if not isinstance(obj["id"], (str, int)) or isinstance(obj["id"], bool):
        raise ProbeError(f"{where}: field 'id' must be a string or an integer")
    _check_position(obj, where)
    if not obj["image"].strip():
        raise ProbeError(f"{where}: field 'image' is empty; give the image file name relative to the probe folder")
    if "\x00" in obj["image"]:
        raise ProbeError(f"{where}: field 'image' contains a NUL character; give a plain relative file name")
    return ProbeRow(id=str(obj["id"]), image=obj["image"], position=obj["position"], answer=obj["answer"],
                    caption=obj.get("caption"), question=obj.get("question"),
                    extra={k: v for k, v in obj.items() if k not in _KNOWN})


def _check_position(obj: dict, where: str) -> None:
    """The position must name a cell of the row's grid (3×3 without a ``grid`` key), or the
    row must carry a valid ``box`` inside its ``canvas``."""
    grid = parse_grid(obj["grid"], f"{where}: field 'grid'") if "grid" in obj else (3, 3)
    if "box" in obj or "canvas" in obj:
        b, size = obj.get("box"), obj.get("canvas")
        ok = (isinstance(b, list) and len(b) == 4 and all(isinstance(v, int) and not isinstance(v, bool) for v in b)
              and isinstance(size, int) and not isinstance(size, bool) and size > 0
              and 0 <= b[0] < b[2] <= size and 0 <= b[1] < b[3] <= size)
        if not ok:
            raise ProbeError(f"{where}: 'box' must be [x0, y0, x1, y1] integers with 0 <= x0 < x1 <= canvas and "
                             f"0 <= y0 < y1 <= canvas, and 'canvas' a positive integer; got box={b!r}, canvas={size!r}")
        if not obj["position"].strip():
            raise ProbeError(f"{where}: field 'position' is empty; name the target's position")
        return
    names = grid_positions(*grid)
    if obj["position"] not in names:
        shown = ", ".join(names) if len(names) <= 9 else f"{names[0]} … {names[-1]}"
        raise ProbeError(f"{where}: unknown position {obj['position']!r} for a {grid_name(grid)} grid; use one of "
                         f"{shown}, or give the row a 'box' and 'canvas'")


def probe_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / PROBE_FILE
    if not path.is_file():
        raise ProbeError(f"{path}: probe file not found; build one with 'spatialbias probe build' "
                         f"or point --probe at a folder holding {PROBE_FILE}")
    return path


def scan_rows(path: str | os.PathLike) -> tuple[list[tuple[int, ProbeRow]], list[ProbeError]]:
    """Read every line; never stops at a bad one. Returns ([(line number, row)], [errors]),
    each error one line naming the file and line."""
    path = probe_file(path)
    rows, problems = [], []
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                problems.append(ProbeError(f"{where}: not UTF-8 text (byte {e.start}); save the file as UTF-8"))
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, RecursionError, ValueError) as e:
                msg = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else type(e).__name__
                problems.append(ProbeError(f"{where}: not valid JSON ({msg}); each line must be one JSON object"))
                continue
            try:
                rows.append((n, parse_row(obj, where)))
            except ProbeError as e:
                problems.append(e)
    if not rows and not problems:
        problems.append(ProbeError(f"{path}: the probe has no rows"))
    return rows, problems


def read_rows(path: str | os.PathLike) -> list[ProbeRow]:
    """Read ``probe.jsonl`` (or a folder holding one). Blank lines are skipped.

    Raises :class:`ProbeError` naming the file and 1-based line of the first bad row.
    """
    rows, problems = scan_rows(path)
    if problems:
        raise problems[0]
    return [r for _, r in rows]


def read_meta(folder: str | os.PathLike) -> dict[str, Any]:
    """Probe-level metadata from ``probe.json``; ``{}`` when the probe has none (paper's files)."""
    p = Path(folder) / META_FILE
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ProbeError(f"{p}: not valid JSON ({e.msg}); fix or delete the file") from None


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file + rename: readers never see half a file."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_rows(folder: str | os.PathLike, rows: Iterable[ProbeRow], meta: dict[str, Any] | None = None) -> Path:
    """Write ``folder/probe.jsonl`` (and ``probe.json`` when ``meta`` is given) atomically."""
    folder = Path(folder)
    text = "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in rows)
    atomic_write_text(folder / PROBE_FILE, text)
    if meta is not None:
        atomic_write_text(folder / META_FILE, json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return folder / PROBE_FILE


def resolve_image(folder: str | os.PathLike, row: ProbeRow, where: str = "") -> Path:
    """The row's image path, which must lie inside the probe folder: absolute paths, ``..``
    segments and links that leave the folder are refused."""
    root = Path(folder).resolve()
    label = where or f"row id={row.id} position={row.position}"
    if Path(row.image).is_absolute() or ".." in Path(row.image).parts:
        raise ProbeError(f"{label}: image {row.image!r} is absolute or contains '..'; image paths must be "
                         "relative to the probe folder and stay inside it")
    p = (root / row.image).resolve()
    if root != p and root not in p.parents:
        raise ProbeError(f"{label}: image {row.image!r} points outside the probe folder {root} (through a link); "
                         "image paths must stay inside it")
    if not p.is_file():
        raise ProbeError(f"{label}: image file {p} is missing; rebuild the probe or fix the row's 'image'")
    return p
