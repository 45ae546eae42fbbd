"""The committed notebooks execute top to bottom against the bundled organism, and carry their
current outputs: every text and table output equals a fresh run's — its words exactly, its numbers
as numbers, within a tolerance that another CPU feature level or thread count cannot cross (one
unit of the last printed digit plus 1e-3 relative) — and every figure a cell draws is in the
committed notebook as an image (``make notebooks`` refreshes them)."""
import importlib.util
import re
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


NUMBER = re.compile(r"(?<![\w.])[-−]?\d+(?:\.(\d+))?(?:[eE]([-+]?\d+))?(?![\w])")
"""A printed number standing alone (not part of a hash or a name): sign, digits, decimals, exponent."""
REL = 1e-3


def _numbers(text: str) -> tuple[list[str], list[tuple[float, float]]]:
    """(the words between the numbers, [(value, one unit of its last printed digit, None for an integer)])."""
    words, nums, last = [], [], 0
    for m in NUMBER.finditer(text):
        words.append(text[last:m.start()])
        if m.group(1) is None and m.group(2) is None:  # an integer (a count, a cell, a layer): exact
            nums.append((float(m.group(0).replace("−", "-")), None))
        else:
            unit = 10.0 ** (int(m.group(2) or 0) - len(m.group(1) or ""))
            nums.append((float(m.group(0).replace("−", "-")), unit))
        last = m.end()
    words.append(text[last:])
    return words, nums


def same_output(fresh: str, committed: str) -> bool:
    """The same words, and every number equal to within one unit of its last printed digit plus
    :data:`REL` of its size: a float rounding the other way on another CPU passes, a changed
    result does not."""
    (w1, n1), (w0, n0) = _numbers(fresh), _numbers(committed)
    return w1 == w0 and len(n1) == len(n0) and all(
        a == b if ua is None or ub is None else abs(a - b) <= max(ua, ub) + REL * max(abs(a), abs(b))
        for (a, ua), (b, ub) in zip(n1, n0))


def test_outputs_compare_as_numbers_within_a_printed_digit():
    assert same_output("logit −3.811046 at cell 4", "logit −3.811047 at cell 4")  # the newcomer's CPU
    assert same_output("p = 1.2e-05", "p = 1.3e-05") and same_output("acc 0.74", "acc 0.75")
    assert not same_output("acc 0.74", "acc 0.77")  # a real change of a two-digit number
    assert not same_output("logit −3.811046", "logit −3.821046")
    assert not same_output("logit −3.811046", "logit 3.811046")  # a sign
    assert not same_output("cell 4 best", "cell 5 best") and not same_output("range 0.28", "mean 0.28")
    assert not same_output("a 1 b 2", "a 1 b")  # a number missing
    assert same_output("id e932d0503dfa", "id e932d0503dfa") and not same_output("id e932d0503dfa",
                                                                                "id e932d0503dfb")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_and_its_committed_outputs_are_current(path):
    fresh = execute.execute(path)
    committed = nbformat.read(path, as_version=4)
    got, want = _outputs(fresh), _outputs(committed)
    assert not any(t.startswith("ERROR") for texts, _ in got for t in texts), "a cell raised"
    assert len(got) == len(want), "the committed notebook has other cells: run `make notebooks`"
    for k, ((t1, img1), (t0, img0)) in enumerate(zip(got, want)):
        assert len(t1) == len(t0) and all(same_output(a, b) for a, b in zip(t1, t0)), \
            f"cell {k + 1}: outputs changed; run `make notebooks` and commit"
        assert img1 == img0, f"cell {k + 1}: a figure is missing from the committed notebook; run `make notebooks`"
    if any(img for _, img in got):  # notebooks that draw show their figures inline
        assert any(img for _, img in want)


def test_make_lab_starts_a_jupyterlab_server_from_the_venv():
    """`make lab` starts JupyterLab on notebooks/ (a short start-and-stop: the server answers with
    the lab page listing, then it is stopped)."""
    import os
    import signal
    import socket
    import subprocess
    import time
    import urllib.request
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = DIR.parent
    proc = subprocess.Popen(["make", "lab", f"LAB_ARGS=--no-browser --port={port} --ServerApp.ip=127.0.0.1 "
                             "--IdentityProvider.token=spatialbias-test"], cwd=root, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline, body = time.time() + 600, None  # generous: a busy machine starts it slowly
        while time.time() < deadline and body is None:
            if proc.poll() is not None:
                pytest.fail(f"make lab exited: {proc.stdout.read().decode()[-1500:]}")
            try:
                url = f"http://127.0.0.1:{port}/api/contents?token=spatialbias-test"
                with urllib.request.urlopen(url, timeout=10) as r:
                    body = r.read().decode()
            except OSError:
                time.sleep(0.5)
        assert body is not None, "the server did not answer"
        assert "quickstart.ipynb" in body  # it serves the notebooks folder
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/lab?token=spatialbias-test", timeout=30) as r:
            assert r.status == 200 and "JupyterLab" in r.read().decode()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
