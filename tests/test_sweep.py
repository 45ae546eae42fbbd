"""Sweeps: the plan, one condition alone, kill-and-resume, the Ray executor, bad sweep files."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from analyses import plan as pl, report as rep, runner, store
from analyses.estimate import estimate
from analyses.cli import app

KEY = ["condition_id", "metric", "cell", "layer", "site", "group"]

SWEEP = """
seeds = [0]
analyses = ["eval", "patching", "flow"]
causal_items = 3
patch_cells = [8, 0]   # corners: the tiny LLaVA's 4×4 patches split evenly there only

[models]
organism = {{ path = "organism", probes = ["shapes"] }}
tiny = {{ path = "tiny_llava", probes = ["captions"] }}

[probes]
shapes = {{ build = "shapes", n = 6, seed = 1 }}
captions = {{ build = "source", n = 2, seed = 0, canvas = 96, negatives = true }}

[interventions]
baseline = true
bapa = ["reference"]
agci = [0.5, 1.0]
agci_adaptive = [{{ rule = "cos_spread", scale = [1.0] }}]
positions = [{positions}]
"""


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    """A sweep over the organism (shapes probe) and a saved tiny LLaVA (a Yes/No caption probe built
    from a folder of random images): 2 models × 7 interventions × 3 analyses = 42 conditions."""
    from interp import tiny
    d = tmp_path_factory.mktemp("sweep")
    tiny.save(*tiny.build_llava(), d / "tiny_llava")
    src = d / "source"
    src.mkdir()
    rng = np.random.default_rng(0)
    with open(src / "captions.jsonl", "w") as fh:
        for i in range(12):
            Image.fromarray((rng.random((24, 32, 3)) * 255).astype("uint8")).save(src / f"im{i}.png")
            fh.write(json.dumps({"image": f"im{i}.png", "caption": f"a picture of this {i}"}) + "\n")
    (d / "sweep.toml").write_text(SWEEP.format(positions='"reverse", "shuffle"'))
    return d


def _sorted(df):
    """Rows in a fixed order, without ``config`` (it holds the output folder's absolute paths)."""
    return df.drop(columns="config").sort_values(KEY, na_position="first").reset_index(drop=True)


@pytest.fixture(scope="module")
def reference(sweep_dir):
    """The sweep run once, uninterrupted, in this process."""
    res = runner.run(pl.load(sweep_dir / "sweep.toml", sweep_dir / "ref"), sweep_dir / "ref", progress=False)
    assert res["failed"] == [] and res["done"] == res["total"] == 42
    return pd.read_parquet(sweep_dir / "ref" / "results.parquet")


def test_plan_is_the_cross_product_with_stable_ids(sweep_dir, tmp_path):
    s = pl.load(sweep_dir / "sweep.toml", tmp_path)
    assert len(s.conditions) == 2 * 7 * 3
    assert len({c.id for c in s.conditions}) == 42
    labels = {c.intervention for c in s.conditions}
    assert labels == {"baseline", "bapa", "agci:0.5", "agci:1", "agci-adaptive:cos_spread:1",
                      "positions:reverse", "positions:shuffle"}
    assert {(c.model, c.probe) for c in s.conditions} == {("organism", "shapes"), ("tiny", "captions")}
    again = pl.load(sweep_dir / "sweep.toml", tmp_path / "elsewhere")  # ids do not depend on OUT
    assert [c.id for c in again.conditions] == [c.id for c in s.conditions]
    for c in s.conditions:
        back = pl.Condition.from_dict(json.loads(json.dumps(c.to_dict())))
        assert back == c and back.id == c.id


def test_results_table_is_tidy(reference):
    assert list(reference.columns) == store.COLUMNS
    assert not reference.duplicated(KEY).any()
    assert reference.condition_id.nunique() == 42
    ev = reference[(reference.analysis == "eval") & (reference.metric == "accuracy")]
    assert (ev.groupby("condition_id").cell.nunique() == 9).all()
    agci = reference[reference.intervention == "agci:0.5"]
    assert (agci["lambda"] == 0.5).all() and reference[reference.family == "baseline"]["lambda"].isna().all()
    pat = reference[(reference.analysis == "patching") & (reference.metric == "restoration_denoise")]
    assert set(pat.group) == {"target", "image", "text", "last", "all", "moved", "joint", "vision_position"}
    flow = reference[reference.analysis == "flow"]
    assert set(flow.metric) == {"attention_to_target", "attention_spread"} and flow.layer.notna().all()
    spread = flow[flow.metric == "attention_spread"]
    assert spread.cell.isna().all() and (spread.ci_low <= spread.value).all() and (spread.value <= spread.ci_high).all()
    v = json.loads(reference.versions.iloc[0])
    assert {"torch", "transformers", "nnsight", "python", "spatialbias"} <= set(v)


def test_a_condition_reruns_alone_from_its_config(sweep_dir, reference):
    import interp
    row = reference[(reference.model == "organism") & (reference.intervention == "agci-adaptive:cos_spread:1")
                    & (reference.analysis == "eval")].iloc[0]
    cond = pl.Condition.from_dict(json.loads(row.config))
    alone, details = runner.rerun_alone(cond)
    assert len(details) == int(reference[(reference.condition_id == cond.id) & (reference.metric == "n_rows")].value.iloc[0])
    ref = reference[reference.condition_id == cond.id]
    pd.testing.assert_frame_equal(_sorted(alone), _sorted(ref), check_dtype=False)


def test_position_controls_and_interventions_change_results(reference):
    acc = reference[(reference.metric == "mean_p_correct") & (reference.model == "organism")].set_index("intervention").value
    assert acc.nunique() == len(acc), acc  # every intervention moves the organism's answers
    # the organism reads the target's cell through its rotary ids: reversing them mirrors its profile
    cells = reference[(reference.model == "organism") & (reference.metric == "p_correct")]
    base = cells[cells.intervention == "baseline"].sort_values("cell").value.to_numpy()
    rev = cells[cells.intervention == "positions:reverse"].sort_values("cell").value.to_numpy()
    assert np.corrcoef(base, rev[::-1])[0, 1] > np.corrcoef(base, rev)[0, 1]


def _run_cli(sweep_dir, out):
    return subprocess.Popen([sys.executable, "-m", "analyses.cli", "sweep", str(sweep_dir / "sweep.toml"),
                             "--out", str(out), "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})


def _kill_after(proc, parts: Path, n: int, timeout: float = 120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if parts.is_dir() and len(list(parts.glob("*.parquet"))) >= n:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        if proc.poll() is not None:
            pytest.fail(f"the sweep ended before it could be killed: {proc.stderr.read().decode()[-500:]}")
        time.sleep(0.01)
    proc.kill()
    pytest.fail("no condition finished in time")


def test_kill_and_resume_completes_without_duplicates_or_recomputation(sweep_dir, reference):
    out = sweep_dir / "killed"
    parts = out / "parts"
    for n in (1, 20):  # kill early, then again mid-way
        _kill_after(_run_cli(sweep_dir, out), parts, n)
        got = len(list(parts.glob("*.parquet")))
        assert n <= got < 42, "the kill must land mid-sweep"
        if (out / "results.parquet").is_file():  # whatever results.parquet holds is whole conditions only
            partial = pd.read_parquet(out / "results.parquet")
            assert not partial.duplicated(KEY).any()
            assert set(partial.condition_id) <= {p.stem for p in parts.glob("*.parquet")}
    before = {p.name: p.stat().st_mtime_ns for p in parts.glob("*.parquet")}
    proc = _run_cli(sweep_dir, out)
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-800:]
    assert b"42/42 conditions done" in proc.stdout.read()
    after = {p.name: p.stat().st_mtime_ns for p in parts.glob("*.parquet")}
    assert all(after[k] == v for k, v in before.items()), "finished conditions were recomputed"
    timed = pd.read_json(out / "timings.jsonl", lines=True)
    assert timed.condition_id.value_counts().max() == 1, "a condition ran twice"
    got = pd.read_parquet(out / "results.parquet")
    assert not got.duplicated(KEY).any()
    pd.testing.assert_frame_equal(_sorted(got), _sorted(reference))
    assert [json.loads(line)["id"] for line in (out / "conditions.jsonl").read_text().splitlines()] == \
        [c.id for c in pl.load(sweep_dir / "sweep.toml", out).conditions]


def test_ray_executor_on_a_local_cluster_matches_the_local_run(sweep_dir, reference):
    import ray  # noqa: F401 (pinned in requirements.lock: a missing Ray is an install bug, not a skip)
    out = sweep_dir / "ray"
    res = runner.run(pl.load(sweep_dir / "sweep.toml", out), out, executor="ray", num_cpus=2, progress=False)
    assert res["failed"] == [] and res["done"] == 42
    pd.testing.assert_frame_equal(_sorted(pd.read_parquet(out / "results.parquet")), _sorted(reference))


def test_ray_executor_connects_to_a_running_cluster_by_address(sweep_dir, reference, tmp_path):
    """``--executor ray --address``: a head started with ``ray start --head`` on this machine (the
    way a real cluster is joined); two conditions run there through the CLI."""
    import ray  # noqa: F401 (pinned in requirements.lock: a missing Ray is an install bug, not a skip)
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray_bin = Path(sys.executable).parent / "ray"
    head = subprocess.Popen([str(ray_bin), "start", "--head", "--block", f"--port={port}", "--num-cpus=1",
                             "--include-dashboard=false", "--disable-usage-stats"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        address = None
        for line in head.stdout:
            if "ray start --address=" in line:
                address = line.split("--address=")[1].strip().strip("'\"")
                break
        assert address and address.endswith(f":{port}"), "the head did not start"
        ids = reference[reference.analysis == "eval"].condition_id.unique()[:2]
        r = CliRunner().invoke(app, ["sweep", str(sweep_dir / "sweep.toml"), "--out", str(tmp_path / "o"),
                                     "--executor", "ray", "--address", address, "--no-progress",
                                     "--only", ids[0], "--only", ids[1]])
        assert r.exit_code == 0, r.output
        got = pd.read_parquet(tmp_path / "o" / "results.parquet")
        assert set(got.condition_id) == set(ids)
        pd.testing.assert_frame_equal(_sorted(got), _sorted(reference[reference.condition_id.isin(ids)]))
    finally:
        head.terminate()
        head.wait(timeout=60)


def test_dry_run_lists_conditions_and_cost(sweep_dir, reference):
    r = CliRunner().invoke(app, ["sweep", str(sweep_dir / "sweep.toml"), "--out", str(sweep_dir / "ref"), "--dry-run"])
    assert r.exit_code == 0, r.output
    assert "42 conditions, 42 done, 0 pending" in r.output
    est = estimate(pl.load(sweep_dir / "sweep.toml", sweep_dir / "ref"), sweep_dir / "ref")
    assert (est.forward_rows > 0).all() and est.est_seconds.notna().all()
    fresh = sweep_dir / "fresh"
    r = CliRunner().invoke(app, ["sweep", str(sweep_dir / "sweep.toml"), "--out", str(fresh), "--dry-run"])
    assert "0 done, 42 pending" in r.output and not fresh.exists()


@pytest.mark.parametrize("text, needle", [
    ("[models]\no = 'organism'\n", "needs a [probes] table"),
    ("analyses = ['evaluate']\n[models]\no = 'organism'\n[probes]\np = { build = 'shapes' }\n", "unknown analysis"),
    ("[models]\no = 'organism'\n[probes]\np = { build = 'shapes' }\n[interventions]\nagci = [-1]\n",
     "[interventions] agci: 'agci:-1': λ must be a finite number ≥ 0"),
    ("[models]\no = 'organism'\n[probes]\np = { build = 'shapes' }\n[interventions]\nagci = ['x']\n",
     "list of numbers"),
    ("[models]\no = 'organism'\n[probes]\np = 'no/such/probe'\n", "probe file not found"),
    ("[models]\no = 'nowhere/model'\n[probes]\np = { build = 'shapes', n = 1 }\n", "models.o"),
    ("[models]\no = 'organism'\n[probes]\np = { build = 'shapes' }\n[interventions]\nbapa = ['sideways']\n",
     "sideways"),
    ("[models\n", "not valid TOML"),
    ("causal_items = 'many'\n[models]\no = 'organism'\n[probes]\np = { build = 'shapes' }\n", "positive integer"),
    ("colour = 1\n[models]\no = 'organism'\n[probes]\np = { build = 'shapes' }\n", "unknown key(s) colour"),
])
def test_bad_sweep_files_give_one_error_line_and_write_nothing(tmp_path, text, needle):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["sweep", str(cfg), "--out", str(out), "--no-progress"])
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.output
    assert not out.exists()


def test_only_unknown_condition_is_refused(sweep_dir, tmp_path):
    r = CliRunner().invoke(app, ["sweep", str(sweep_dir / "sweep.toml"), "--out", str(tmp_path / "o"),
                                 "--only", "0123456789ab"])
    assert r.exit_code == 2 and "not a condition" in r.output


def test_the_real_sweeps_report_renders(sweep_dir, reference, tmp_path):
    """``report --from`` on the sweep above (organism + tiny LLaVA, all three analyses): every
    section has its figures, every image decodes, and headless Chromium draws the page."""
    import base64
    import io

    from test_report import DISPLAY_WIDTH, NO_ROWS, _chromium, parse, screenshot

    r = CliRunner().invoke(app, ["report", "--from", str(sweep_dir / "ref")])
    assert r.exit_code == 0, r.output
    page = sweep_dir / "ref" / "index.html"
    p = parse(page)
    specs, skipped = rep.plan_figures(reference, {a: store.read_details(sweep_dir / "ref", reference, a)
                                                   for a in ("flow", "eval")})
    figs = [i for i in p.imgs if ": " in i["alt"]]  # figures; the others are the probe sample's thumbnails
    assert set(skipped) == {"probe-side", "knockout"} | NO_ROWS and len(figs) == len(specs) >= 9
    assert len(p.imgs) - len(figs) == 2 * 9  # one item at all 9 positions of each (model, probe)
    assert all(a in p.ids for a in p.toc_links)
    for img in p.imgs:
        Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1]))).verify()
    if _chromium() is None:
        pytest.skip("no Chromium: the HTML checks above ran, the screenshot is skipped")
    a = screenshot(page, tmp_path / "shot.png", tmp_path / "profile", height=3000)  # at the page's display width
    assert a.shape == (3000, DISPLAY_WIDTH) and a.var() > 0 and (a < 250).mean() > 0.02
