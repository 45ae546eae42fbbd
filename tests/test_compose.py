"""Caption probes from a folder of images: canvas geometry, the two layouts, balanced negatives."""
import csv

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from analyses.cli import app
from probes import compose
from probes.format import ProbeError, read_meta, read_rows
from probes.sources import folder_source

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (200, 30, 200), (30, 200, 200),
           (120, 60, 0), (0, 60, 120), (90, 90, 90), (250, 150, 50), (50, 150, 250), (150, 250, 50)]


def solid(c, w=60, h=40):
    return Image.new("RGB", (w, h), c)


def cell_colour(img, k, size=840):
    r, c = divmod(k, 3)
    s = size // 3
    return tuple(np.asarray(img)[r * s + s // 2, c * s + s // 2])


def test_canvas_fits_and_centres():
    im = compose.canvas([Image.new("RGB", (100, 50), (255, 0, 0))] + [None] * 8)
    a = np.asarray(im)
    red = np.argwhere((a[..., 0] == 255) & (a[..., 1] == 0))
    (y0, x0), (y1, x1) = red.min(0), red.max(0)
    assert (x0, x1) == (0, 279) and (y0, y1) == (70, 209)  # 280×140, centred vertically in its cell
    assert (a[:70, :280] == 255).all()


def test_replace_variants_differ_only_in_two_cells():
    target = solid((0, 0, 0))
    vs = compose.variants(target, [solid(c) for c in COLOURS[:9]], "replace")
    a, b = np.asarray(vs[0]).astype(int), np.asarray(vs[8]).astype(int)
    diff = np.abs(a - b).sum(-1) > 0
    diff[:280, :280] = False
    diff[560:, 560:] = False
    assert not diff.any()


def test_insert_keeps_the_distractor_order():
    target = solid((0, 0, 0))
    dis = COLOURS[:8]
    for k, v in enumerate(compose.variants(target, [solid(c) for c in dis], "insert")):
        seen = [cell_colour(v, j) for j in range(9)]
        assert seen[k] == (0, 0, 0)
        assert [s for j, s in enumerate(seen) if j != k] == list(dis)


@pytest.fixture
def folder(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "captions.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "caption"])
        for i, c in enumerate(COLOURS):
            solid(c, 50 + 5 * i, 40).save(src / f"{i}.png")
            w.writerow([f"{i}.png", f"a picture of colour {i}"])
    return src


def test_caption_probe_with_negatives_is_balanced(tmp_path, folder):
    out = tmp_path / "probe"
    r = CliRunner().invoke(app, ["probe", "build", "--source", str(folder), "--out", str(out), "--n", "3",
                                 "--negatives", "--layout", "insert", "--canvas", "210"])
    assert r.exit_code == 0, r.output
    rows = read_rows(out)
    assert len(rows) == 3 * 9 * 2
    assert sum(r.answer == "Yes" for r in rows) == sum(r.answer == "No" for r in rows)  # always-Yes scores 50 %
    for i in range(0, len(rows), 9):
        block = rows[i:i + 9]
        assert len({r.id for r in block}) == 1 and [r.cell for r in block] == list(range(9))
    assert read_meta(out)["layout"] == "insert" and Image.open(out / rows[0].image).size == (210, 210)
    pos = {r.id: r.caption for r in rows if r.answer == "Yes"}
    for r in rows:
        if r.answer == "No":
            assert r.caption != pos[r.id[:-4]]


def test_folder_source_errors(tmp_path, folder):
    with pytest.raises(ProbeError, match="no captions.jsonl or captions.csv"):
        folder_source(tmp_path)
    (folder / "captions.csv").write_text("image,caption\n../x.png,escape\n")
    with pytest.raises(ProbeError, match="captions.csv:2"):
        folder_source(folder)
