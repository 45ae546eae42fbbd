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
