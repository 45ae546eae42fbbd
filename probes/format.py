"""The paper's probe format: JSON Lines rows, one per (item, position).

A row holds ``id`` (the item), ``image`` (a file name relative to the probe folder,
``{id}_{k}.png|jpg``), ``position`` (one of :data:`POSITIONS` for a 3×3 grid), ``answer``,
and either ``caption`` (the paper's Yes/No matching task) or ``question`` (an open question
whose answer is one word, as in the model organism's task). The 9 variants of an item are
consecutive rows. Extra keys are kept in :attr:`ProbeRow.extra`.

This is the only module that knows the file layout: ``DIR/probe.jsonl`` plus the images
beside it, and an optional ``DIR/probe.json`` with probe-level metadata (grid shape, the
answer vocabulary, how the probe was made).
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from interp.errors import SpatialBiasError

POSITIONS = ("top_left", "top_center", "top_right", "left", "center", "right",
             "bottom_left", "bottom_center", "bottom_right")
"""Position names of the 3×3 grid, row-major (method.md §2)."""

PROBE_FILE = "probe.jsonl"
META_FILE = "probe.json"


class ProbeError(SpatialBiasError):
    """A probe file or row is unusable; the message names the file and line."""


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
    def cell(self) -> int:
        """Row-major index of :attr:`position` in the 3×3 grid (0..8)."""
        return POSITIONS.index(self.position)

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
    if obj["position"] not in POSITIONS:
        raise ProbeError(f"{where}: unknown position {obj['position']!r}; use one of {', '.join(POSITIONS)}")
    if not obj["image"].strip():
        raise ProbeError(f"{where}: field 'image' is empty; give the image file name relative to the probe folder")
    if "\x00" in obj["image"]:
        raise ProbeError(f"{where}: field 'image' contains a NUL character; give a plain relative file name")
    return ProbeRow(id=str(obj["id"]), image=obj["image"], position=obj["position"], answer=obj["answer"],
                    caption=obj.get("caption"), question=obj.get("question"),
                    extra={k: v for k, v in obj.items() if k not in _KNOWN})


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
