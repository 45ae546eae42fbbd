"""Untrusted probes, images and checkpoints: every input path safe, every failure one clear line."""
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from analyses.cli import app
from probes.format import ProbeError, parse_row, scan_rows
from spatialbias.files import atomic_write_text
from probes.images import load_rgb, to_rgb

runner = CliRunner()
ROOT = Path(__file__).parent.parent


def bad_probe(tmp_path, small_probe):
    """A copy of the small probe with one problem per kind, on known lines."""
    import shutil
    probe = tmp_path / "probe"
    shutil.copytree(small_probe, probe)
    lines = (probe / "probe.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    (tmp_path / "outside.png").write_bytes((probe / rows[0]["image"]).read_bytes())
    os.symlink(tmp_path / "outside.png", probe / "images" / "link.png")
    Image.new("RGB", (6, 6)).save(probe / "images" / "tiny.png")
    (probe / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    edits = {2: {"image": "../outside.png"}, 3: {"image": str(tmp_path / "outside.png")},
             4: {"image": "images/link.png"}, 5: {"image": "images/tiny.png"}, 6: {"image": "images/broken.png"},
             7: {"image": "images/missing.png"}}
    for n, e in edits.items():
        rows[n - 1].update(e)
    out = [json.dumps(r) for r in rows]
    out[7] = "{not json"                                     # line 8
    out[8] = json.dumps({"id": 1, "image": "x.png"})         # line 9: missing fields
    (probe / "probe.jsonl").write_text("\n".join(out) + "\n")
    return probe, {2: "'..'", 3: "absolute", 4: "outside the probe folder", 5: "too small", 6: "cannot be read",
                   7: "missing", 8: "not valid JSON", 9: "missing field"}


def test_eval_reports_every_bad_row_at_once_and_writes_nothing(tmp_path, small_probe):
    probe, expected = bad_probe(tmp_path, small_probe)
    out = tmp_path / "out"
    r = runner.invoke(app, ["eval", "--model", "organism", "--probe", str(probe), "--out", str(out)])
    assert r.exit_code == 2
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert all(ln.startswith("error: ") for ln in lines)
    for n, reason in expected.items():
        hits = [ln for ln in lines if f"probe.jsonl:{n}" in ln]
        assert len(hits) == 1 and reason in hits[0], (n, hits)
    assert "9 bad row(s)" in lines[-1] or f"{len(expected)} bad row(s)" in lines[-1]
    assert not out.exists()


def test_eval_skip_bad_scores_the_rest_and_lists_skipped(tmp_path, small_probe):
    probe, expected = bad_probe(tmp_path, small_probe)
    out = tmp_path / "out"
    r = runner.invoke(app, ["eval", "--model", "organism", "--probe", str(probe), "--out", str(out), "--skip-bad",
                            "--condition", "baseline", "--condition", "bapa", "--no-progress"])
    assert r.exit_code == 0, r.output
    skipped = [ln for ln in r.output.splitlines() if ln.startswith("skipped: ")]
    assert len(skipped) == len(expected) and f"({len(expected)} skipped)" in r.output
    run, = json.loads((out / "summary.json").read_text())["runs"]
    assert set(run["conditions"]) == {"baseline", "bapa"}
    import pandas as pd
    df = pd.read_parquet(out / "tables" / "eval.parquet")
    assert len(df) == 2 * (6 * 9 - len(expected))
    assert not set(expected) & set(df.line)


def test_eval_same_seed_same_files(tmp_path, small_probe):
    outs = []
    for k in range(2):
        out = tmp_path / f"o{k}"
        r = runner.invoke(app, ["eval", "--model", "organism", "--probe", str(small_probe), "--out", str(out),
                                "--seed", "3", "--no-progress"])
        assert r.exit_code == 0, r.output
        outs.append(out)
    for name in ("summary.json", "results.csv", "results.parquet"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


def test_report_same_seed_same_files(tmp_path, small_probe):
    import analyses
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        analyses.demo("organism", out, probe=small_probe, lambdas=[0.5], seed=4, progress=False, causal=False)
    figs = sorted(p.name for p in (outs[0] / "figures").iterdir())
    assert figs == sorted(p.name for p in (outs[1] / "figures").iterdir()) and len(figs) >= 6
    for name in ["summary.json", "results.parquet", "tables/eval.parquet"] + [f"figures/{f}" for f in figs]:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    page = [(o / "index.html").read_text().replace(str(o), "OUT") for o in outs]
    assert page[0] == page[1]  # the page names its folder; otherwise byte-identical


def test_caption_script_is_text_in_the_report(tmp_path):
    from interp import tiny
    from probes.build import shapes_probe
    from probes.format import ProbeRow, read_rows, write_rows
    model, proc = tiny.build_llava()
    ckpt = tiny.save(model, proc, tmp_path / "ckpt")
    probe = tmp_path / "probe"
    shapes_probe(probe, n_items=2, seed=1, cell_px=16, progress=False)
    rows = [ProbeRow(id=r.id, image=r.image, position=r.position, answer="Yes",
                     caption="<script>alert(1)</script>") for r in read_rows(probe)]
    write_rows(probe, rows, {"grid": [3, 3]})
    out = tmp_path / "rep"
    import analyses
    analyses.demo(str(ckpt), out, probe=probe, lambdas=[0.5], progress=False, causal=False)
    page = (out / "index.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16", "I", "F", "LA", "1"])
def test_image_modes_become_8bit_rgb(tmp_path, mode):
    rng = np.random.default_rng(0)
    base = Image.fromarray((rng.random((24, 24, 3)) * 255).astype("uint8"))
    if mode == "I;16":
        im = Image.fromarray((rng.random((24, 24)) * 65535).astype("uint16"))
    elif mode == "RGBA":
        im = base.convert("RGBA")
        im.putalpha(Image.fromarray((rng.random((24, 24)) * 255).astype("uint8")))
    else:
        im = base.convert(mode)
    path = tmp_path / ("x.tif" if mode in ("I;16", "I", "F", "CMYK") else "x.png")
    im.save(path)
    rgb = load_rgb(path, "test")
    assert rgb.mode == "RGB" and rgb.size == (24, 24)
    assert to_rgb(im).mode == "RGB"


def test_decompression_bomb_limit_stays_on(tmp_path, monkeypatch):
    import interp  # noqa: F401  (importing the toolkit must not lift the limit)
    assert Image.MAX_IMAGE_PIXELS is not None
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ProbeError, match="too large to open safely"):
        load_rgb(tmp_path / "big.png", "row 1")


def test_truncated_image_is_refused(tmp_path):
    Image.new("RGB", (64, 64), "red").save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ProbeError, match="cannot be read"):
        load_rgb(tmp_path / "t.png", "row 1")


def test_no_pickle_loading_and_no_remote_code_by_default():
    src = [p for d in ("interp", "analyses", "probes") for p in (ROOT / d).rglob("*.py")]
    for p in src:
        text = p.read_text()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in m.group(1), p
        assert "import pickle" not in text and "trust_remote_code=True" not in text, p
    import inspect

    import interp
    assert inspect.signature(interp.load).parameters["trust_remote_code"].default is False
    r = runner.invoke(app, ["report", "--help"])
    assert "--trust-remote-code" in r.output


def test_checkpoint_with_only_pickled_weights_is_refused(tmp_path):
    import interp
    from interp import tiny
    model, proc = tiny.build_llava()
    path = tiny.save(model, proc, tmp_path / "ckpt")
    import torch
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    with pytest.raises(interp.SpatialBiasError, match="safetensors"):
        interp.load(str(path))


def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    target.write_text('{"old": true}')

    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(target, '{"new": true}')
    assert target.read_text() == '{"old": true}'
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                           max_leaves=8)
row_like = st.fixed_dictionaries({}, optional={k: json_values | st.text() for k in
                                               ("id", "image", "position", "answer", "caption", "question")})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.one_of(row_like.map(json.dumps), json_values.map(json.dumps), st.binary(max_size=40)),
                      min_size=1, max_size=6))
def test_probe_reader_accepts_or_names_the_row(tmp_path_factory, lines):
    folder = tmp_path_factory.mktemp("h")
    data = b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n"
    (folder / "probe.jsonl").write_bytes(data)
    rows, problems = scan_rows(folder)  # never raises anything else
    for n, row in rows:
        assert isinstance(n, int) and row.position
    for p in problems:
        assert isinstance(p, ProbeError) and re.search(r"probe\.jsonl(:\d+)?:", str(p)) and "\n" not in str(p)


@given(obj=st.dictionaries(st.sampled_from(["id", "image", "position", "answer", "caption", "question", "x"]),
                           json_values, max_size=7))
def test_parse_row_raises_only_its_own_error(obj):
    try:
        row = parse_row(obj, "f:3")
    except ProbeError as e:
        assert str(e).startswith("f:3:")
    else:
        assert row.image and row.position
