"""Probe geometry, the row format, and bad probe input."""
import json

import numpy as np
import pytest
from PIL import Image

from probes import shapes
from probes.build import shapes_probe
from probes.format import POSITIONS, ProbeError, ProbeRow, read_meta, read_rows, resolve_image, write_rows


def test_rows_follow_the_paper_format(small_probe):
    rows = read_rows(small_probe)
    assert len(rows) == 6 * 9
    for i in range(0, len(rows), 9):  # the 9 variants of an item are consecutive, row-major
        item = rows[i:i + 9]
        assert {r.id for r in item} == {item[0].id}
        assert [r.position for r in item] == list(POSITIONS)
        assert [r.image for r in item] == [f"images/{item[0].id}_{k}.png" for k in range(9)]
        assert len({(r.question, r.answer) for r in item}) == 1
    line = json.loads((small_probe / "probe.jsonl").read_text().splitlines()[0])
    assert set(line) == {"id", "image", "question", "position", "answer"}
    assert read_meta(small_probe)["answers"] == list(shapes.COLOURS)


def test_variants_differ_only_inside_the_two_cells(small_probe):
    rows = read_rows(small_probe)[:9]
    imgs = [np.asarray(Image.open(small_probe / r.image)).astype(int) for r in rows]
    cell = imgs[0].shape[0] // 3
    for a in range(9):
        for b in range(a + 1, 9):
            diff = np.abs(imgs[a] - imgs[b]).sum(-1) > 0
            outside = diff.copy()
            for k in (a, b):
                r, c = divmod(k, 3)
                outside[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell] = False
            assert not outside.any(), (a, b)
            assert diff.any()


def test_target_shape_occurs_once_per_image():
    render = shapes.Renderer()
    rng = np.random.default_rng(0)
    shape, _, _ = render.item(rng)
    rng = np.random.default_rng(0)
    # re-draw the item's cells to check the distractors never repeat the target shape
    rng.integers(0, 4), rng.integers(0, 5)
    render.random_cell(rng, shape, 0)
    assert all(render.distractor(rng, shape).shape != shape for _ in range(200))


def test_build_is_deterministic_and_rerunnable(tmp_path):
    a = shapes_probe(tmp_path / "a", n_items=2, seed=7, progress=False).read_text()
    shapes_probe(tmp_path / "a", n_items=2, seed=7, progress=False)  # a re-run overwrites, never appends
    b = shapes_probe(tmp_path / "b", n_items=2, seed=7, progress=False).read_text()
    assert a == b == (tmp_path / "a" / "probe.jsonl").read_text()
    assert (Image.open(tmp_path / "a/images/shapes7-00001_4.png").tobytes()
            == Image.open(tmp_path / "b/images/shapes7-00001_4.png").tobytes())


def test_format_round_trip_keeps_extra_fields(tmp_path):
    rows = [ProbeRow(id="x", image="x_0.jpg", position="center", answer="Yes", caption="a <b>cat</b>",
                     extra={"source": "laion"})]
    write_rows(tmp_path, rows)
    assert read_rows(tmp_path) == rows


@pytest.mark.parametrize("line,match", [
    ("{not json", "not valid JSON"),
    ('["a"]', "must be a JSON object"),
    ('{"id": 1, "image": "a.png", "position": "center", "answer": "Yes"}', "caption or question"),
    ('{"id": 1, "image": "a.png", "position": "middle", "answer": "Yes", "caption": "c"}', "unknown position"),
    ('{"id": 1, "image": 3, "position": "center", "answer": "Yes", "caption": "c"}', "'image' must be a string"),
])
def test_malformed_rows_name_file_and_line(tmp_path, line, match):
    good = '{"id": 0, "image": "a.png", "position": "center", "answer": "Yes", "caption": "c"}'
    (tmp_path / "probe.jsonl").write_text(good + "\n" + line + "\n")
    with pytest.raises(ProbeError, match=match) as e:
        read_rows(tmp_path)
    assert f"{tmp_path / 'probe.jsonl'}:2:" in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_probe_and_image_paths(tmp_path):
    with pytest.raises(ProbeError, match="probe file not found"):
        read_rows(tmp_path)
    row = ProbeRow(id="1", image="nope.png", position="center", answer="Yes", caption="c")
    with pytest.raises(ProbeError, match="is missing"):
        resolve_image(tmp_path, row)
    escape = ProbeRow(id="1", image="../outside.png", position="center", answer="Yes", caption="c")
    with pytest.raises(ProbeError, match="contains '..'"):
        resolve_image(tmp_path, escape)
