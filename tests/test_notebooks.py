"""The committed notebooks execute top to bottom against the bundled organism, and carry their
current outputs: every text and table output equals a fresh run's, and every figure a cell draws
is in the committed notebook as an image (``make notebooks`` refreshes them)."""
import importlib.util
from pathlib import Path

import nbformat
import pytest

DIR = Path(__file__).parent.parent / "notebooks"
NOTEBOOKS = sorted(DIR.glob("*.ipynb"))
_spec = importlib.util.spec_from_file_location("execute", DIR / "execute.py")
execute = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(execute)


def _outputs(nb):
    """Per code cell: (sorted output kinds, the text and HTML of its outputs, whether it shows an image)."""
    cells = []
    for c in nb.cells:
        if c.cell_type != "code":
            continue
        texts, image = [], False
        for o in c.get("outputs", []):
            if o.output_type == "error":
                texts.append(f"ERROR {o.ename}: {o.evalue}")
            elif o.output_type == "stream":
                texts.append("".join(o.text))
            else:
                d = o.get("data", {})
                image |= "image/png" in d
                texts += ["".join(d[k]) for k in ("text/html", "text/plain") if k in d]
        cells.append((texts, image))
    return cells


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_and_its_committed_outputs_are_current(path):
    fresh = execute.execute(path)
    committed = nbformat.read(path, as_version=4)
    got, want = _outputs(fresh), _outputs(committed)
    assert not any(t.startswith("ERROR") for texts, _ in got for t in texts), "a cell raised"
    assert len(got) == len(want), "the committed notebook has other cells: run `make notebooks`"
    for k, ((t1, img1), (t0, img0)) in enumerate(zip(got, want)):
        assert t1 == t0, f"cell {k + 1}: outputs changed; run `make notebooks` and commit"
        assert img1 == img0, f"cell {k + 1}: a figure is missing from the committed notebook; run `make notebooks`"
    if any(img for _, img in got):  # notebooks that draw show their figures inline
        assert any(img for _, img in want)
