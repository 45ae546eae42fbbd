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

This is the only module that knows the file layout (:func:`find_probe`, :class:`Probe`). Two
layouts open the same way, from the folder or from the rows file itself:

* ours: ``DIR/probe.jsonl`` plus the images (``image: images/x.png``), and an optional
  ``DIR/probe.json`` with probe-level metadata (grid shape, the answer vocabulary, how the
  probe was made);
* the paper's as published: one rows file with any name (``DIR/spatial_probe.json``, ``.json``
  or ``.jsonl``, JSON Lines) beside ``DIR/images/``, bare file names in ``image``; no metadata.

A row's ``image`` is looked up beside the rows file, then under ``images/`` beside it
(:func:`resolve_image`); the probe folder, which every image must stay inside, is the rows
file's parent.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from spatialbias.errors import SpatialBiasError
from spatialbias.files import atomic_write_text

POSITIONS = ("top_left", "top_center", "top_right", "left", "center", "right",
             "bottom_left", "bottom_center", "bottom_right")
"""Position names of the 3×3 grid, row-major (method.md §2)."""

MAX_GRID = 16
"""The largest number of rows or columns a probe grid may have."""

PROBE_FILE = "probe.jsonl"
"""Our rows file (what :func:`write_rows` writes); a folder holding it is our layout."""
META_FILE = "probe.json"
"""Probe-level metadata beside :data:`PROBE_FILE` (our layout only)."""
ROWS_SUFFIXES = (".json", ".jsonl")
"""Suffixes of the paper's rows file, looked for when a folder has no :data:`PROBE_FILE`."""
IMAGES_DIR = "images"
"""The folder beside the rows file where a row's image is looked for second."""


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


@dataclass(frozen=True)
class Probe:
    """Where a probe's files are: ``rows_file`` (JSON Lines, one row per line) and, for our
    layout, ``meta_file`` (``probe.json``; None for the paper's files). ``folder`` is the rows
    file's parent: every image must stay inside it. Build one with :func:`find_probe`."""
    rows_file: Path
    meta_file: Path | None = None

    @property
    def folder(self) -> Path:
        return self.rows_file.parent

    @property
    def meta(self) -> dict[str, Any]:
        """Probe-level metadata from ``probe.json``; ``{}`` when the probe has none (paper's files)."""
        if self.meta_file is None or not self.meta_file.is_file():
            return {}
        try:
            return json.loads(self.meta_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ProbeError(f"{self.meta_file}: not valid JSON ({e.msg}); fix or delete the file") from None
        except UnicodeDecodeError as e:
            raise ProbeError(f"{self.meta_file}: not UTF-8 text (byte {e.start}); save the file as UTF-8") from None

    def where(self, line: int, row: ProbeRow | None = None) -> str:
        """``"FILE:LINE (id=…)"``: how every message names a row (``line`` 1-based in the rows file)."""
        return f"{self.rows_file}:{line}" + (f" (id={row.id})" if row is not None else "")

    def image_path(self, row: ProbeRow, where: str = "") -> Path:
        """The row's image (:func:`resolve_image` in :attr:`folder`: beside the rows file, then
        under ``images/``); :class:`ProbeError` naming ``where`` when it is unsafe or missing."""
        return resolve_image(self.folder, row, where)


def find_probe(path: str | os.PathLike | Probe) -> Probe:
    """The probe at ``path``: a folder holding ``probe.jsonl`` (ours; it wins over any other
    file), a folder holding exactly one ``*.json``/``*.jsonl`` rows file (the paper's), or a rows
    file itself. A :class:`Probe` is returned as it is. Raises :class:`ProbeError` (one line)
    when there is no rows file, or when a folder holds several candidates (it lists them)."""
    if isinstance(path, Probe):
        return path
    path = Path(path)
    hint = (f"give (--probe) a folder holding {PROBE_FILE} or the paper's single .json/.jsonl rows file beside "
            "images/, or the rows file itself; build one with 'spatialbias probe build'")
    if path.is_dir():
        if (path / PROBE_FILE).is_file():
            rows = path / PROBE_FILE
        else:
            cands = sorted(p for p in path.iterdir() if p.suffix.lower() in ROWS_SUFFIXES
                           and not p.name.startswith(".") and p.is_file())
            if not cands:
                raise ProbeError(f"{path}: probe file not found (no {PROBE_FILE} and no .json/.jsonl rows file "
                                 f"in the folder); {hint}")
            if len(cands) > 1:
                raise ProbeError(f"{path}: {len(cands)} candidate probe rows files ({', '.join(p.name for p in cands)})"
                                 f" and no {PROBE_FILE}; give (--probe) the rows file to use, e.g. {cands[0]}")
            rows = cands[0]
    elif path.is_file():
        rows = path
    else:
        raise ProbeError(f"{path}: probe file not found; {hint}")
    meta = rows.parent / META_FILE if rows.name == PROBE_FILE else None
    return Probe(rows, meta)


def probe_file(path: str | os.PathLike | Probe) -> Path:
    """The rows file of the probe at ``path`` (:func:`find_probe`)."""
    return find_probe(path).rows_file


def is_built(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a probe in our layout (the rows file :func:`write_rows` writes
    last, so an interrupted build has none)."""
    return (Path(folder) / PROBE_FILE).is_file()


def scan_rows(path: str | os.PathLike | Probe) -> tuple[list[tuple[int, ProbeRow]], list[ProbeError]]:
    """Read every line of the probe at ``path`` (:func:`find_probe`); never stops at a bad one.
    Returns ([(line number, row)], [errors]), each error one line naming the file and line."""
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


def read_rows(path: str | os.PathLike | Probe) -> list[ProbeRow]:
    """Read the rows of the probe at ``path`` (a folder or a rows file, :func:`find_probe`).
    Blank lines are skipped.

    Raises :class:`ProbeError` naming the file and 1-based line of the first bad row.
    """
    rows, problems = scan_rows(path)
    if problems:
        raise problems[0]
    return [r for _, r in rows]


def read_meta(path: str | os.PathLike | Probe) -> dict[str, Any]:
    """Probe-level metadata (:attr:`Probe.meta`) of the probe at ``path``; ``{}`` when it has
    none (the paper's files)."""
    return find_probe(path).meta


def write_rows(folder: str | os.PathLike, rows: Iterable[ProbeRow], meta: dict[str, Any] | None = None) -> Path:
    """Write ``folder/probe.jsonl`` (and ``probe.json`` when ``meta`` is given) atomically."""
    folder = Path(folder)
    text = "".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in rows)
    atomic_write_text(folder / PROBE_FILE, text)
    if meta is not None:
        atomic_write_text(folder / META_FILE, json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return folder / PROBE_FILE


def resolve_image(folder: str | os.PathLike, row: ProbeRow, where: str = "") -> Path:
    """The row's image path, which must lie inside the probe ``folder`` (the rows file's parent).

    Looked up as the authors' scripts do: ``folder/IMAGE`` first (ours: ``images/x.png``; the
    paper's images beside the file), then ``folder/images/IMAGE`` (the paper's bare names); the
    first that exists wins. Absolute paths, ``..`` segments and links that leave the folder are
    refused, whichever candidate they come from.
    """
    root = Path(folder).resolve()
    label = where or f"row id={row.id} position={row.position}"
    if Path(row.image).is_absolute() or ".." in Path(row.image).parts:
        raise ProbeError(f"{label}: image {row.image!r} is absolute or contains '..'; image paths must be "
                         "relative to the probe folder and stay inside it")
    tried = []
    for base in (root, root / IMAGES_DIR):
        p = (base / row.image).resolve()
        if root != p and root not in p.parents:
            raise ProbeError(f"{label}: image {row.image!r} points outside the probe folder {root} (through a "
                             "link); image paths must stay inside it")
        if p.is_file():
            return p
        tried.append(p)
    raise ProbeError(f"{label}: image file {tried[0]} is missing (also looked for {tried[1]}); rebuild the probe "
                     "or fix the row's 'image'")
