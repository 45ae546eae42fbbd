"""Execute notebooks in place so the committed notebooks carry their outputs (``make notebooks``),
deterministically: run from this folder (work files go to ./out/, ignored by git), one kernel per
notebook, no timing metadata, execution counts from 1, memory addresses masked.

    cd notebooks && ../.venv/bin/python execute.py *.ipynb

``tests/test_notebooks.py`` runs the same :func:`execute` and checks that the committed outputs
are current (text and tables equal; every figure the notebook draws present as an image output).
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).parent
_ADDR = re.compile(r" at 0x[0-9a-f]+")


def execute(path: str | Path, timeout: int = 600):
    """The notebook at ``path`` executed top to bottom in :data:`HERE`; returns the notebook."""
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                   resources={"metadata": {"path": str(HERE)}}).execute()
    for k, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        cell.execution_count = k + 1
        cell.metadata.pop("execution", None)
        for out in cell.get("outputs", []):
            if "execution_count" in out:
                out["execution_count"] = k + 1
            for key in ("text/plain", "text/html"):
                if key in out.get("data", {}):
                    out["data"][key] = _ADDR.sub(" at 0x…", "".join(out["data"][key]))
            if out.get("output_type") == "stream":
                out["text"] = _ADDR.sub(" at 0x…", "".join(out["text"]))
    return nb


def main(paths: list[str]) -> None:
    for p in paths:
        nb = execute(p)
        nbformat.write(nb, p)
        print(f"executed {p}")


if __name__ == "__main__":
    main(sys.argv[1:])
