"""The command line end to end on the organism, and its one-line errors."""
import json
import subprocess
import sys

import pandas as pd
import pytest
from typer.testing import CliRunner

from analyses.cli import app

runner = CliRunner()


@pytest.mark.parametrize("args", [[], ["report"], ["eval"], ["causal"], ["sweep"], ["bench"], ["probe"],
                                  ["probe", "build"], ["organism"], ["organism", "train"]])
def test_help_on_every_command_reads_at_80_columns(args):
    r = runner.invoke(app, args + ["--help"], terminal_width=80, env={"COLUMNS": "80"})
    assert r.exit_code == 0 and "Usage" in r.output
    long = [ln for ln in r.output.splitlines() if len(ln) > 80]
    assert not long and "…" not in r.output, long


def test_version():
    from spatialbias import __version__
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"spatialbias {__version__}"


@pytest.mark.parametrize("args, needle", [
    (["eval", "--model", "organism", "--probe", "P", "--out", "O", "--condition", "agci:-0.5"],
     "'agci:-0.5': λ must be a finite number ≥ 0"),
    (["eval", "--model", "organism", "--probe", "P", "--out", "O", "--condition", "agci:x"], "is not a number"),
    (["eval", "--model", "organism", "--probe", "P", "--out", "O", "--condition", "sideways"], "not understood"),
    (["report", "--model", "no/such/dir/here", "--out", "O"], "no such checkpoint folder"),
    (["report", "--model", "nosuchorg/nosuchmodel", "--out", "O"], "not in the local HF cache"),
    (["report", "--threads", "0", "--out", "O"], "--threads 0"),
])
def test_cli_errors_say_what_is_wrong(tmp_path, small_probe, args, needle):
    args = [str(small_probe) if a == "P" else str(tmp_path / "o") if a == "O" else a for a in args]
    line = one_line_error(runner.invoke(app, args))
    assert needle in line, line


def test_report_end_to_end(tmp_path, small_probe):
    out = tmp_path / "rep"
    r = runner.invoke(app, ["report", "--model", "organism", "--out", str(out), "--probe", str(small_probe),
                            "--lambdas", "0.5,1", "--causal-items", "4", "--no-progress"])
    assert r.exit_code == 0, r.output
    s = json.loads((out / "summary.json").read_text())
    run, = s["runs"]
    assert run["model"] == "organism" and run["organism"]["recipe"] == "planted-lm"
    conds = run["conditions"]
    assert list(conds) == ["baseline", "bapa", "agci:0.5", "agci:1"]
    for c in conds.values():
        assert len(c["cell_accuracy"]) == 9 and len(c["cell_p_correct"]) == 9 and len(c["cell_ci_low"]) == 9
        for k in ("mean_accuracy", "range", "std", "chi2_p"):
            assert isinstance(c[k], float)
    df = pd.read_parquet(out / "results.parquet")
    assert set(df.analysis) == {"eval", "patching", "knockout", "flow", "attribution"}
    assert set(df[df.analysis == "eval"].intervention) == {"baseline", "bapa", "agci:0.5", "agci:1"}
    assert set(df[df.analysis == "patching"].intervention) == {"baseline", "bapa", "agci:0.5"}
    scores = pd.read_parquet(out / "tables" / "eval.parquet")
    assert len(scores) == 6 * 9 * 4 and {"id", "cell", "correct", "p_correct", "line", "intervention"} <= set(scores)
    assert (out / "tables" / "patching.csv").is_file()  # per-item causal tables beside the aggregates
    c = run["causal"]
    assert {"cells", "patching", "position_patching", "knockout", "flow", "attribution"} <= set(c)
    assert set(c["patching"]) == {"baseline", "bapa", "agci:0.5"} and c["cells"]["n_items"] == 4
    r0 = c["patching"]["baseline"]["restoration"][0]
    assert {"site", "group", "direction", "value", "ci_low", "ci_high"} <= set(r0)
    err = c["attribution"]["baseline"]["atp"]  # mean |estimate − exact| in gap units, with a bootstrap interval
    assert 0 <= err["ci_low"] <= err["ci_high"] and 0 <= err["value"] <= err["max"] and err["patches"] >= 1
    assert set(c["flow_spread"]["baseline"]) == {"0", "1"} and c["flow_spread"]["baseline"]["0"]["ci_high"] is not None
    assert run["findings"] and all({"claim", "value", "ci_low", "ci_high"} <= set(f) for f in run["findings"])
    figs = {p.name for p in (out / "figures").iterdir()}
    for stem in ("cell_accuracy_", "agci_lambda", "restoration_denoise_", "position_restoration_", "knockout_",
                 "attention_to_target_", "attention_layer_cell_"):
        assert any(f.startswith(stem) and f.endswith(".png") for f in figs), stem
        assert any(f.startswith(stem) and f.endswith(".svg") for f in figs), stem
    page = (out / "index.html").read_text()
    assert "planted" in page and "data:image/png;base64," in page
    assert "Position-id patching" in page and "Causal findings" in page


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
    assert victim.name in line and "probe.jsonl:5 " in line
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
    run, = json.loads((out / "summary.json").read_text())["runs"]
    assert run["causal"]["cells"] == {"clean": 8, "corrupt": 0, "n_items": 4}
    assert any(p.name.startswith("restoration_denoise_") for p in (out / "figures").glob("*.svg"))
    assert "Moving the target from cell 8" in r.output
    line = one_line_error(runner.invoke(app, ["causal", "--probe", str(small_probe), "--out", str(tmp_path / "d"),
                                              "--clean-cell", "3", "--corrupt-cell", "3"]))
    assert "both 3" in line or "two different cells" in line
    line = one_line_error(runner.invoke(app, ["causal", "--probe", str(small_probe), "--out", str(tmp_path / "e"),
                                              "--clean-cell", "9"]))
    assert "--clean-cell 9" in line and "0..8" in line


def test_the_demo_is_a_plan_killed_and_resumed_like_any_sweep(tmp_path):
    """`spatialbias report` runs the built-in plan through the runner: SIGKILLed mid-way and run
    again, it finishes without recomputing finished conditions and equals an uninterrupted run."""
    import os
    import signal
    import time
    args = ["--model", "organism", "--n-items", "6", "--causal-items", "3", "--lambdas", "0.5,1", "--no-progress"]

    def start(out):
        return subprocess.Popen([sys.executable, "-m", "analyses.cli", "report", "--out", str(out), *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    out = tmp_path / "killed"
    proc = start(out)
    t0 = time.time()
    while time.time() - t0 < 300 and not (out / "parts").is_dir() or len(list((out / "parts").glob("*.parquet"))) < 2:
        if proc.poll() is not None:
            pytest.fail(f"the demo ended before it could be killed: {proc.stderr.read().decode()[-500:]}")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {p.name: p.stat().st_mtime_ns for p in (out / "parts").glob("*.parquet")}
    assert 2 <= len(done) < 8  # 4 eval + patching, knockout, flow, attribution for 3 conditions: 14 in all
    assert not (out / "index.html").exists()
    again = start(out)
    assert again.wait(timeout=600) == 0, again.stderr.read().decode()[-800:]
    assert all((out / "parts" / k).stat().st_mtime_ns == v for k, v in done.items()), "finished parts recomputed"
    ref = tmp_path / "ref"
    r = runner.invoke(app, ["report", "--out", str(ref), *args])
    assert r.exit_code == 0, r.output
    a, b = (pd.read_parquet(d / "results.parquet").drop(columns="config") for d in (out, ref))
    key = ["condition_id", "metric", "cell", "layer", "site", "group"]
    pd.testing.assert_frame_equal(a.sort_values(key).reset_index(drop=True), b.sort_values(key).reset_index(drop=True))
    sa, sb = (json.loads((d / "summary.json").read_text())["runs"][0] for d in (out, ref))
    assert sa["conditions"] == sb["conditions"] and sa["causal"] == sb["causal"]  # (their probe paths differ)


def test_an_empty_probe_does_not_suggest_skip_bad(tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "probe.jsonl").write_text("\n")
    r = runner.invoke(app, ["eval", "--model", "organism", "--probe", str(tmp_path / "p"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "--skip-bad" not in r.output and "no usable rows" in r.output, r.output
    assert not (tmp_path / "o").exists()
