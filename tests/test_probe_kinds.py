"""Probes beyond the paper's 3×3 grid: other grids, similarity, shift and irregular layouts,
the row format with boxes, the skimage source, balanced negatives and resumable builds."""
import csv
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from analyses.cli import app
from probes import build, compose
from probes.build import caption_probe
from probes.format import (POSITIONS, ProbeError, ProbeRow, grid_positions, parse_grid, read_meta, read_rows,
                           write_rows)
from probes.images import load_rgb
from probes.sources import SKIMAGE_CAPTIONS, skimage_source

COLOURS = [(int(r), int(g), int(b)) for r, g, b in
           np.random.default_rng(0).integers(20, 235, (20, 3))]


def solid(c, w=60, h=40):
    return Image.new("RGB", (w, h), c)


def changed(a, b):
    return np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).sum(-1) > 0


def outside(mask, boxes):
    m = mask.copy()
    for x0, y0, x1, y1 in boxes:
        m[y0:y1, x0:x1] = False
    return m


@pytest.mark.parametrize("grid", [(2, 2), (4, 4), (2, 3)])
def test_replace_variants_differ_only_inside_the_two_cells(grid):
    n = grid[0] * grid[1]
    vs = compose.variants(solid((0, 0, 0)), [solid(c) for c in COLOURS[:n]], "replace", grid=grid, size=120)
    for a in range(n):
        for b in range(a + 1, n):
            d = changed(vs[a], vs[b])
            assert d.any()
            assert not outside(d, [compose.cell_box(a, grid, 120), compose.cell_box(b, grid, 120)]).any(), (a, b)


@pytest.mark.parametrize("grid", [(2, 2), (4, 4)])
def test_insert_keeps_the_distractor_order(grid):
    n = grid[0] * grid[1]
    dis = COLOURS[:n - 1]
    for k, v in enumerate(compose.variants(solid((0, 0, 0)), [solid(c) for c in dis], "insert", grid=grid, size=160)):
        seen = []
        for j in range(n):
            x0, y0, x1, y1 = compose.cell_box(j, grid, 160)
            seen.append(tuple(int(v) for v in np.asarray(v)[(y0 + y1) // 2, (x0 + x1) // 2]))
        assert seen[k] == (0, 0, 0)
        assert [s for j, s in enumerate(seen) if j != k] == list(dis)


def folder_of(tmp_path, n=20):
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "captions.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "caption"])
        for i, c in enumerate(COLOURS[:n]):
            solid(c, 40 + 3 * i, 30).save(src / f"{i}.png")
            w.writerow([f"{i}.png", f"colour {i}"])
    return src


def test_grid_rows_carry_grid_box_and_canvas(tmp_path):
    out = tmp_path / "p"
    caption_probe(folder_of(tmp_path), out, n_items=2, grid=(4, 4), size=160, progress=False)
    rows = read_rows(out)
    assert len(rows) == 2 * 16
    assert [r.position for r in rows[:16]] == [f"r{i}c{j}" for i in range(4) for j in range(4)]
    assert [r.cell for r in rows[:16]] == list(range(16))
    assert rows[5].extra == {"grid": "4x4", "box": [40, 40, 80, 80], "canvas": 160}
    assert read_meta(out)["grid"] == [4, 4]
    a, b = (Image.open(out / rows[k].image) for k in (0, 15))
    d = changed(a, b)  # jpeg noise stays near the changed cells; far cells are identical up to compression
    far = outside(d, [(0, 0, 48, 48), (112, 112, 160, 160)])
    assert far.mean() < 0.02


def test_similarity_probe_puts_the_target_alone_in_cell_k(tmp_path):
    out = tmp_path / "p"
    caption_probe(folder_of(tmp_path), out, n_items=1, kind="similarity", grid=(2, 2), size=100, progress=False)
    rows = read_rows(out)
    assert len(rows) == 4 and read_meta(out)["kind"] == "similarity"
    for k, r in enumerate(rows):
        a = np.asarray(Image.open(out / r.image)).astype(int)
        nonwhite = (np.abs(a - 255).sum(-1) > 30)
        assert not outside(nonwhite, [compose.cell_box(k, (2, 2), 100)]).any()
        assert nonwhite.any()


def test_shift_probe_slides_the_target_along_the_middle_row(tmp_path):
    out = tmp_path / "p"
    caption_probe(folder_of(tmp_path), out, n_items=1, kind="shift", grid=(3, 3), size=120, step=10, progress=False)
    rows = read_rows(out)
    offs = [r.extra["offset"] for r in rows]
    assert offs == list(range(0, 81, 10)) and [r.position for r in rows] == [f"shift_{o:04d}" for o in offs]
    assert all(r.box == (o, 40, o + 40, 80) for r, o in zip(rows, offs))
    assert [r.cell for r in rows] == [3, 3, 4, 4, 4, 4, 5, 5, 5]  # the cell holding the box centre
    imgs = [Image.open(out / r.image) for r in rows]
    for a in range(len(rows)):
        d = changed(imgs[0], imgs[a])
        assert outside(d, [(0, 36, 120, 84)]).mean() < 0.002  # only the middle band changes (jpeg aside)
    band = [3, 4, 5]
    assert compose.band_cells((3, 3), "horizontal") == band
    boxes, offsets = compose.shift_boxes((4, 4), 160, "vertical", step=15)
    assert offsets[-1] == 120 and boxes[0] == (80, 0, 120, 40)


def test_irregular_boxes_do_not_overlap_and_variants_differ_in_two_boxes():
    rng = np.random.default_rng(1)
    boxes = compose.random_boxes(rng, 9, 300, *build._box_fracs(9))
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
    dis = [solid(c) for c in COLOURS[:9]]
    vs = [compose.place([(solid((0, 0, 0)) if j == k else d, b) for j, (d, b) in enumerate(zip(dis, boxes))], 300)
          for k in range(9)]
    assert not outside(changed(vs[2], vs[7]), [boxes[2], boxes[7]]).any()
    with pytest.raises(ValueError, match="could not place"):
        compose.random_boxes(rng, 50, 100, 0.3, 0.4, tries=200)


def test_irregular_rows(tmp_path):
    out = tmp_path / "p"
    caption_probe(folder_of(tmp_path), out, n_items=1, kind="irregular", size=200, progress=False)
    rows = read_rows(out)
    assert [r.position for r in rows] == [f"box{k}" for k in range(9)]
    for r in rows:
        x0, y0, x1, y1 = r.box
        assert r.cell == int((y0 + y1) / 2 * 3 // 200) * 3 + int((x0 + x1) / 2 * 3 // 200)


def test_position_names_and_cells():
    assert grid_positions(3, 3) == POSITIONS
    assert grid_positions(2, 2) == ("r0c0", "r0c1", "r1c0", "r1c1")
    assert parse_grid("4x4") == (4, 4) and parse_grid([2, 3]) == (2, 3)
    for bad in ("4", "0x3", "1x1", "17x2", [3], "axb"):
        with pytest.raises(ProbeError, match="not understood"):
            parse_grid(bad)
    r = ProbeRow(id="a", image="a.jpg", position="r2c1", answer="Yes", caption="c", extra={"grid": "4x4"})
    assert r.cell == 9 and r.grid == (4, 4) and r.n_cells == 16
    paper = ProbeRow(id="a", image="a.jpg", position="bottom_center", answer="Yes", caption="c")
    assert paper.cell == 7 and paper.grid == (3, 3)


@pytest.mark.parametrize("row,match", [
    ({"position": "r0c0"}, "unknown position 'r0c0' for a 3x3 grid"),
    ({"position": "top_left", "grid": "4x4"}, "for a 4x4 grid"),
    ({"position": "r4c0", "grid": "4x4"}, "unknown position"),
    ({"position": "shift_0010", "grid": "3x3", "box": [10, 0, 5, 8], "canvas": 30}, "'box' must be"),
    ({"position": "shift_0010", "grid": "3x3", "box": [10, 0, 20, 8]}, "'box' must be"),
    ({"position": "center", "grid": "3by3"}, "field 'grid'"),
])
def test_bad_grid_rows_name_file_and_line(tmp_path, row, match):
    base = {"id": 0, "image": "a.jpg", "answer": "Yes", "caption": "c"}
    (tmp_path / "probe.jsonl").write_text(json.dumps({**base, "position": "center"}) + "\n"
                                          + json.dumps({**base, **row}) + "\n")
    with pytest.raises(ProbeError, match=match) as e:
        read_rows(tmp_path)
    assert f"{tmp_path / 'probe.jsonl'}:2:" in str(e.value) and "\n" not in str(e.value)


def test_round_trip_of_box_rows(tmp_path):
    rows = [ProbeRow(id="x", image="x_0.jpg", position="shift_0040", answer="No", caption="a cat",
                     extra={"grid": "3x3", "box": [40, 280, 320, 560], "canvas": 840, "offset": 40,
                            "path": "horizontal"})]
    write_rows(tmp_path, rows)
    back = read_rows(tmp_path)
    assert back == rows and back[0].cell == 3


def test_image_too_small_for_the_grid_is_grid_aware(tmp_path):
    p = tmp_path / "small.png"
    solid((1, 2, 3), 20, 20).save(p)
    assert load_rgb(p, "row 3", grid=(3, 3)).size == (20, 20)
    with pytest.raises(ProbeError, match=r"row 3: image .*small.png is 20×20 px, too small for a 8×8 grid"):
        load_rgb(p, "row 3", grid=(8, 8))
    with pytest.raises(ProbeError, match="too small for a 8x8 grid"):
        caption_probe(folder_of(tmp_path), tmp_path / "o", n_items=1, grid=(8, 8), size=24, progress=False)


def test_pool_too_small_for_the_grid(tmp_path):
    with pytest.raises(ProbeError, match="needs 18 different ones"):
        caption_probe(folder_of(tmp_path, n=12), tmp_path / "o", n_items=1, grid=(4, 4), progress=False)


def test_skimage_source_and_balanced_negatives(tmp_path):
    pool = skimage_source()
    assert len(pool) == len(SKIMAGE_CAPTIONS) == 19 and all(p.path.is_file() for p in pool)
    assert len({p.caption for p in pool}) == 19
    out = tmp_path / "sk"
    r = CliRunner().invoke(app, ["probe", "build", "--source", "skimage", "--out", str(out), "--n", "2",
                                 "--negatives", "--canvas", "96", "--grid", "2x2", "--no-progress"])
    assert r.exit_code == 0, r.output
    rows = read_rows(out)
    assert len(rows) == 2 * 4 * 2 and read_meta(out)["source"] == "skimage"
    assert sum(r.answer == "Yes" for r in rows) == sum(r.answer == "No" for r in rows)
    pos = {r.id: r.caption for r in rows if r.answer == "Yes"}
    for r in rows:
        assert r.caption in SKIMAGE_CAPTIONS.values()
        if r.answer == "No":
            assert r.caption != pos[r.id[:-4]]
    for i in range(0, len(rows), 4):  # the variants of an item are consecutive and share a caption
        block = rows[i:i + 4]
        assert len({(r.id, r.caption) for r in block}) == 1 and [r.cell for r in block] == [0, 1, 2, 3]


def test_negative_caption_is_on_no_image(tmp_path):
    out = tmp_path / "p"
    src = folder_of(tmp_path)
    caption_probe(src, out, n_items=3, negatives=True, size=150, progress=False)
    rows = read_rows(out)
    colour_of = {f"colour {i}": c for i, c in enumerate(COLOURS)}
    for r in rows:
        if r.answer != "No":
            continue
        a = np.asarray(Image.open(out / r.image)).astype(int)
        centres = [a[(y0 + y1) // 2, (x0 + x1) // 2] for x0, y0, x1, y1 in
                   (compose.cell_box(k, (3, 3), 150) for k in range(9))]
        assert min(np.abs(c - np.array(colour_of[r.caption])).max() for c in centres) > 6


@pytest.mark.parametrize("source", ["folder", "skimage"])
def test_interrupted_build_completes_on_rerun(tmp_path, monkeypatch, source):
    src = folder_of(tmp_path) if source == "folder" else "skimage"
    kw = dict(n_items=4, size=96, negatives=True, progress=False)
    ref = caption_probe(src, tmp_path / "ref", **kw)
    real, calls = compose.variants, {"n": 0}

    def dies_on_third(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(compose, "variants", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        caption_probe(src, tmp_path / "run", **kw)
    assert not (tmp_path / "run" / "probe.jsonl").exists()  # no half-written probe
    assert not list((tmp_path / "run" / "images").glob(".*.tmp"))
    monkeypatch.setattr(compose, "variants", real)
    got = caption_probe(src, tmp_path / "run", **kw)
    assert got.read_text() == ref.read_text()
    rows = read_rows(got)
    assert len({(r.id, r.position) for r in rows}) == len(rows) == 4 * 9 * 2
    for r in rows[::7]:
        assert (tmp_path / "run" / r.image).read_bytes() == (tmp_path / "ref" / r.image).read_bytes()


def test_cli_build_errors_are_one_line(tmp_path):
    runner = CliRunner()
    for args, match in ((["--source", "shapes", "--grid", "4x4"], "shapes source supports only"),
                        (["--source", "skimage", "--grid", "4"], "--grid: grid '4' is not understood"),
                        (["--source", "skimage", "--kind", "mosaic"], "--kind 'mosaic'"),
                        (["--source", "skimage", "--kind", "shift", "--layout", "insert"], "applies to --kind grid"),
                        (["--source", str(tmp_path / "nope")], "neither 'shapes', 'skimage' nor a folder")):
        r = runner.invoke(app, ["probe", "build", "--out", str(tmp_path / "o"), "--n", "1", *args])
        assert r.exit_code == 2, r.output
        lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], r.output
