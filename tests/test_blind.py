"""The ``blind`` organism: the planted-lm data on an architecture that cannot see position — the
null checkpoint. Shipped at analyses/organisms/checkpoints/blind-seed0 (its training record says
how it was made); diagnosed as a user's checkpoint would be, through ``spatialbias report`` on the
folder with the training record removed."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner


@pytest.fixture(scope="module")
def blind():
    import interp
    from analyses.organisms import zoo
    path = zoo.shipped("blind", 0)
    assert path is not None, "the blind organism is shipped (analyses/organisms/checkpoints/blind-seed0)"
    return path, interp.load(str(path))


def _cells(img: np.ndarray, perm) -> np.ndarray:
    """The 48 px canvas with its 3×3 cells of 16 px rearranged: cell k gets the old cell perm[k]."""
    out = img.copy()
    for k, src in enumerate(perm):
        r, c, sr, sc = k // 3, k % 3, src // 3, src % 3
        out[16 * r:16 * r + 16, 16 * c:16 * c + 16] = img[16 * sr:16 * sr + 16, 16 * sc:16 * sc + 16]
    return out


def test_permuting_the_cells_leaves_the_answer_unchanged(blind):
    """Invariance by construction (zero, frozen CLIP position embeddings; one attention layer with
    no rotation): any permutation of the cells gives the same logits — while the planted-lm
    organism, same data, ordinary architecture, changes them."""
    from PIL import Image

    import interp
    from analyses.organisms import zoo
    path, lvlm = blind
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (48, 48, 3), dtype=np.uint8) for _ in range(3)]
    perms = [rng.permutation(9) for _ in range(4)]
    prompt = lvlm.prompt("what colour is the circle ?")
    for model in (lvlm, interp.load(str(zoo.get("planted-lm", 0)))):
        outs = []
        for perm in [np.arange(9)] + perms:
            inputs = model.inputs([Image.fromarray(_cells(x, perm)) for x in imgs], [prompt] * 3)
            with torch.no_grad():
                outs.append(model.run(inputs, last_only=True)[:, -1])
        diff = max(float((o - outs[0]).abs().max()) for o in outs[1:])
        if model is lvlm:
            assert diff < 1e-4, f"the blind organism's logits moved by {diff} when its cells were permuted"
        else:
            assert diff > 1e-2  # the test can see a position effect where there is one
    emb = lvlm.model.model.vision_tower.embeddings.position_embedding.weight.detach()
    assert float(emb.abs().max()) == 0.0
    rec = json.loads((path / "training.json").read_text())
    assert rec["recipe"] == "blind" and rec["config"]["cell_weights"] == [float(k * k) for k in range(1, 10)]


def test_report_on_the_folder_finds_no_bias(blind, tmp_path):
    """The null through the main job: a copy of the checkpoint without its training record, the
    command's default probe (300 items, seed 0), and ``spatialbias report``: no significant bias,
    nothing decomposed, and BaPA — which cannot change an order-blind model — gives the same
    numbers. (At 120 items the same probe seed gave p = 0.005: one of the ~1 % false alarms the
    paired test makes at α = 0.01 by design (docs/diagnosis.md measures the rate on this model);
    the diagnosis then refused to decompose it: "bias not decomposed", no component named.)"""
    from analyses.cli import app
    path, _ = blind
    ckpt = tmp_path / "ckpt"
    shutil.copytree(path, ckpt)
    (ckpt / "training.json").unlink()
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["report", "--model", str(ckpt), "--out", str(out), "--lambdas", "0.5",
                                 "--causal-items", "20", "--no-progress", "--threads", "1"])
    assert r.exit_code == 0, r.output
    run, = json.loads((out / "summary.json").read_text())["runs"]
    assert "organism" not in run  # diagnosed as any user's checkpoint
    d = run["diagnosis"]
    assert d["label"] == "no significant spatial bias" and d["p"] >= 0.01 and not d["present"], d
    base, bapa = run["conditions"]["baseline"], run["conditions"]["bapa"]
    np.testing.assert_allclose(base["cell_accuracy"], bapa["cell_accuracy"], atol=1e-9)
    assert r.output.splitlines()[0].startswith("No significant spatial bias")
