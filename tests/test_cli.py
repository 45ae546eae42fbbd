"""The command line end to end on the organism, and its one-line errors."""
import json
import subprocess
import sys

import pandas as pd
import pytest
from typer.testing import CliRunner

from analyses.cli import app

runner = CliRunner()


@pytest.mark.parametrize("args", [[], ["report"], ["causal"], ["probe"], ["probe", "build"], ["organism"],
                                  ["organism", "train"]])
def test_help_on_every_command(args):
    r = runner.invoke(app, args + ["--help"])
    assert r.exit_code == 0 and "Usage" in r.output


def test_report_end_to_end(tmp_path, small_probe):
    out = tmp_path / "rep"
    r = runner.invoke(app, ["report", "--model", "organism", "--out", str(out), "--probe", str(small_probe),
                            "--lambdas", "0.5,1", "--no-progress"])
    assert r.exit_code == 0, r.output
    s = json.loads((out / "summary.json").read_text())
    assert set(s) >= {"model", "probe", "conditions", "organism"}
    conds = s["conditions"]
    assert set(conds) == {"baseline", "bapa", "agci"}
    assert [c["lambda"] for c in conds["agci"]] == [0.5, 1.0]
    for c in [conds["baseline"], conds["bapa"], *conds["agci"]]:
        assert len(c["cell_accuracy"]) == 9 and len(c["cell_p_correct"]) == 9
        for k in ("mean_accuracy", "range", "std", "chi2_p"):
            assert isinstance(c[k], float)
    df = pd.read_parquet(out / "results.parquet")
    assert len(df) == 6 * 9 * 4 and set(df.condition) == {"baseline", "bapa", "agci λ=0.5", "agci λ=1"}
    for stem in ("cell_accuracy", "cell_p_correct", "agci_lambda"):
        assert (out / "figures" / f"{stem}.png").stat().st_size > 1000
        assert (out / "figures" / f"{stem}.svg").read_text().lstrip().startswith("<?xml")
    page = (out / "index.html").read_text()
    assert "planted" in page and "data:image/png;base64," in page
    a = s["attribution"]
    assert {"sites", "lm_layers", "restoration", "top_sites", "attribution_patching", "position_patching",
            "knockout", "flow_to_target_by_placement", "clean_cell", "corrupt_cell"} <= set(a)
    assert set(a["restoration"]) == {"baseline", "bapa", "agci λ=0.5"}
    assert -1 <= a["attribution_patching"]["spearman_vs_exact"] <= 1
    for stem in ("patching_restoration", "position_patching", "attention_flow_target", "knockout"):
        assert (out / "figures" / f"{stem}.png").stat().st_size > 1000
    assert (out / "causal" / "activation_patching.parquet").exists()
    assert "Where the difference comes from" in page and "Position-id patching" in page


def one_line_error(r):
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    return lines[0]


def test_bad_lambda_writes_nothing(tmp_path, small_probe):
    out = tmp_path / "o"
    r = runner.invoke(app, ["report", "--out", str(out), "--probe", str(small_probe), "--lambdas", "0.5,-1"])
    assert "λ" in one_line_error(r)
    assert not out.exists()


def test_missing_image_names_the_file_and_keeps_earlier_output(tmp_path, small_probe):
    import shutil
    probe = tmp_path / "probe"
    shutil.copytree(small_probe, probe)
    victim = sorted((probe / "images").iterdir())[4]
    victim.unlink()
    out = tmp_path / "o"
    out.mkdir()
    (out / "summary.json").write_text('{"earlier": true}')
    line = one_line_error(runner.invoke(app, ["report", "--out", str(out), "--probe", str(probe), "--no-progress"]))
    assert victim.name in line and "row 5" in line
    assert json.loads((out / "summary.json").read_text()) == {"earlier": True}


def test_corrupt_image_and_malformed_row(tmp_path, small_probe):
    import shutil
    probe = tmp_path / "probe"
    shutil.copytree(small_probe, probe)
    victim = sorted((probe / "images").iterdir())[0]
    victim.write_bytes(b"not a png")
    line = one_line_error(runner.invoke(app, ["report", "--out", str(tmp_path / "o"), "--probe", str(probe),
                                              "--no-progress"]))
    assert victim.name in line and "cannot be read" in line
    with open(probe / "probe.jsonl", "a") as fh:
        fh.write('{"id": 1, "image": "x.png"}\n')
    line = one_line_error(runner.invoke(app, ["report", "--out", str(tmp_path / "o"), "--probe", str(probe)]))
    assert "probe.jsonl:55" in line and "missing field" in line


def test_unsupported_model_class(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    line = one_line_error(runner.invoke(app, ["report", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "o")]))
    assert "unsupported model class BertModel" in line and "LlavaForConditionalGeneration" in line


def test_console_script_is_installed():
    r = subprocess.run([sys.executable, "-m", "analyses.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "report" in r.stdout


def test_causal_command(tmp_path, small_probe):
    out = tmp_path / "c"
    r = runner.invoke(app, ["causal", "--probe", str(small_probe), "--out", str(out), "--n-items", "4",
                            "--no-progress"])
    assert r.exit_code == 0, r.output
    a = json.loads((out / "attribution.json").read_text())
    assert a["clean_cell"] == 8 and a["corrupt_cell"] == 0 and a["n_items"] == 4
    assert (out / "figures" / "patching_restoration.svg").exists()
    line = one_line_error(runner.invoke(app, ["causal", "--probe", str(small_probe), "--out", str(tmp_path / "d"),
                                              "--clean-cell", "3", "--corrupt-cell", "3"]))
    assert "both 3" in line
