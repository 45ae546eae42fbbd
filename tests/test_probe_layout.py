"""The paper's published probe layout: one JSON-lines rows file with any name (``.json`` or
``.jsonl``) beside an ``images/`` folder, bare file names in each row's ``image``. It must open
everywhere a probe is opened (Python API and ``--probe``), the folder or the file itself, and
score exactly like the same probe in our layout (``probe.jsonl``, ``image: images/x.png``)."""
import json
import os
import shutil

import pandas as pd
import pytest
from typer.testing import CliRunner

from analyses.causal import placement_pairs
from analyses.cli import app
from analyses.evaluate import check_probe, score_probe, validate_probe
from probes.build import shapes_probe
from probes.format import ProbeError, ProbeRow, find_probe, read_meta, read_rows, resolve_image, write_rows

runner = CliRunner()


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """(ours, paper, paper rows file): the same small shapes probe in both layouts. Neither has a
    probe.json (the paper's files have none), so both score against the answers they contain."""
    base = tmp_path_factory.mktemp("layouts")
    built = shapes_probe(base / "built", n_items=3, seed=3, progress=False).parent
    rows = read_rows(built)
    ours = base / "ours"
    shutil.copytree(built / "images", ours / "images")
    write_rows(ours, rows)  # no meta
    paper = base / "paper"
    (paper / "images").mkdir(parents=True)
    lines = []
    for r in rows:
        name = os.path.basename(r.image)
        shutil.copy(built / r.image, paper / "images" / name)
        lines.append(json.dumps({"id": r.id, "image": name, "question": r.question, "position": r.position,
                                 "answer": r.answer}))
    rows_file = paper / "spatial_probe.json"
    rows_file.write_text("\n".join(lines) + "\n")
    return ours, paper, rows_file


def test_paper_layout_is_found_from_the_folder_or_the_file(layouts):
    ours, paper, rows_file = layouts
    for arg in (paper, rows_file, str(rows_file)):
        p = find_probe(arg)
        assert p.rows_file == rows_file and p.folder == paper and p.meta == {}
    assert find_probe(ours).rows_file == ours / "probe.jsonl"
    assert find_probe(ours / "probe.jsonl").folder == ours
    assert read_rows(paper) == [ProbeRow(**{**r.to_json(), "image": os.path.basename(r.image)})
                                for r in read_rows(ours)]
    assert read_meta(rows_file) == {}
    row = read_rows(paper)[0]
    assert find_probe(paper).image_path(row) == (paper / "images" / row.image).resolve()


def test_paper_layout_scores_like_ours(layouts, organism):
    ours, paper, rows_file = layouts
    conds = {"baseline": [], "bapa": [__import__("interp").BaPA()]}
    want = score_probe(organism, ours, conds, progress=False)
    assert len(want) == 27 * 2
    for arg in (paper, rows_file):
        pd.testing.assert_frame_equal(score_probe(organism, arg, conds, progress=False), want)
    good, problems = check_probe(rows_file)
    assert not problems and len(good) == 27
    assert len(validate_probe(paper)) == 27


def test_paper_layout_through_the_cli(layouts, tmp_path):
    ours, paper, rows_file = layouts
    tables = {}
    for name, arg in (("ours", ours), ("folder", paper), ("file", rows_file)):
        out = tmp_path / name
        r = runner.invoke(app, ["eval", "--model", "organism", "--probe", str(arg), "--out", str(out),
                                "--condition", "baseline", "--no-progress"])
        assert r.exit_code == 0, r.output
        scores = pd.read_parquet(out / "tables" / "eval.parquet")
        tables[name] = scores[["id", "position", "cell", "answer", "pred", "correct", "p_correct", "logit_diff", "line"]]
        assert json.loads((out / "summary.json").read_text())["runs"][0]["grid"] == [3, 3]
    assert len(tables["ours"]) == 27
    pd.testing.assert_frame_equal(tables["folder"], tables["ours"])
    pd.testing.assert_frame_equal(tables["file"], tables["ours"])


def test_causal_pairs_open_the_paper_layout(layouts, organism):
    ours, paper, rows_file = layouts
    want = placement_pairs(organism, ours, 8, 0)
    for arg in (paper, rows_file):
        got = placement_pairs(organism, arg, 8, 0)
        assert got.ids == want.ids and got.grid == want.grid
        for k in want.clean:
            assert (got.clean[k] == want.clean[k]).all() and (got.corrupt[k] == want.corrupt[k]).all()


def test_two_candidate_rows_files_are_one_error_line(layouts, tmp_path):
    _, paper, rows_file = layouts
    probe = tmp_path / "two"
    shutil.copytree(paper, probe)
    shutil.copy(rows_file, probe / "other.jsonl")
    with pytest.raises(ProbeError) as e:
        find_probe(probe)
    msg = str(e.value)
    assert "\n" not in msg and "other.jsonl" in msg and "spatial_probe.json" in msg
    r = runner.invoke(app, ["eval", "--model", "organism", "--probe", str(probe), "--out", str(tmp_path / "o")])
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "other.jsonl" in lines[0] and lines[0].startswith("error: ")
    assert not (tmp_path / "o").exists()
    # naming the file picks it
    assert find_probe(probe / "other.jsonl").rows_file == probe / "other.jsonl"


def test_no_rows_file_is_one_error_line(tmp_path):
    (tmp_path / "empty").mkdir()
    for arg in (tmp_path / "empty", tmp_path / "nowhere"):
        with pytest.raises(ProbeError, match="probe file not found") as e:
            find_probe(arg)
        assert "\n" not in str(e.value) and str(arg) in str(e.value)


def test_image_lookup_order_beside_then_images(tmp_path):
    """Beside the rows file first, then images/ beside it; the first that exists wins."""
    (tmp_path / "images").mkdir()
    (tmp_path / "a.jpg").write_bytes(b"beside")
    (tmp_path / "images" / "a.jpg").write_bytes(b"in images")
    (tmp_path / "images" / "b.jpg").write_bytes(b"only in images")
    row = ProbeRow(id="1", image="a.jpg", position="center", answer="Yes", caption="c")
    assert resolve_image(tmp_path, row) == (tmp_path / "a.jpg").resolve()
    row_b = ProbeRow(id="1", image="b.jpg", position="center", answer="Yes", caption="c")
    assert resolve_image(tmp_path, row_b) == (tmp_path / "images" / "b.jpg").resolve()
    missing = ProbeRow(id="1", image="c.jpg", position="center", answer="Yes", caption="c")
    with pytest.raises(ProbeError, match="is missing") as e:
        resolve_image(tmp_path, missing)
    assert str(tmp_path / "c.jpg") in str(e.value) and str(tmp_path / "images" / "c.jpg") in str(e.value)


def test_paper_layout_keeps_the_safety_rules(layouts, tmp_path):
    """Absolute paths, '..' and links that leave the folder are refused under images/ too; the
    probe folder is the rows file's parent, not the folder --probe named."""
    _, paper, _ = layouts
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.jpg").write_bytes(b"secret")
    probe = tmp_path / "p"
    probe.mkdir()
    os.symlink(outside, probe / "images")  # the whole images/ folder is a link that leaves the probe
    base = {"id": 1, "position": "center", "answer": "Yes", "caption": "c"}
    rows = [{**base, "image": "x.jpg"}, {**base, "image": "../outside/x.jpg"},
            {**base, "image": str(outside / "x.jpg")}, {**base, "image": "images/x.jpg"}]
    (probe / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    good, problems = check_probe(probe, images=False)
    assert not good and len(problems) == 4
    reasons = [str(p) for p in problems]
    assert "rows.jsonl:1" in reasons[0] and "outside the probe folder" in reasons[0]
    assert "rows.jsonl:2" in reasons[1] and "'..'" in reasons[1]
    assert "rows.jsonl:3" in reasons[2] and "absolute" in reasons[2]
    assert "rows.jsonl:4" in reasons[3] and "outside the probe folder" in reasons[3]
