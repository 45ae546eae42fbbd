"""Scoring probes on tiny models: the paper's own file format, string rules, prompts per
architecture, the similarity and occlusion probes, and a real-photo probe end to end."""
import json

import numpy as np
import pandas as pd
import pytest
from helpers import paper_probe
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

import interp
from analyses import occlusion as occ
from analyses.cli import app
from analyses.evaluate import check_probe, score_probe
from analyses.metrics import cell_metrics
from analyses.scoring import PAPER_PROMPT, prefix_answer, robust_answer
from analyses.similarity import caption_embeddings, similarity_scores, similarity_summary
from interp.tracing import trace
from probes.build import caption_probe
from probes.format import read_rows


@pytest.mark.parametrize("text,prefix,robust", [
    ("Yes", "Yes", "Yes"), ("Yes, there is.", "Yes", "Yes"), ("No.", "No", "No"),
    (" Yes", None, "Yes"), ("yes", None, "Yes"), ('"No"', None, "No"), ("**YES**", None, "Yes"),
    ("\n'no', because", None, "No"), ("Yesterday", "Yes", None), ("Nothing", "No", None),
    ("Maybe yes", None, None), ("", None, None), ("...", None, None),
])
def test_string_rules(text, prefix, robust):
    assert prefix_answer(text) == prefix  # the paper's: case-sensitive str.startswith
    assert robust_answer(text) == robust


def test_organism_cannot_answer_yes_no(organism):
    from analyses.scoring import AnswerSet
    from spatialbias.errors import SpatialBiasError
    with pytest.raises(SpatialBiasError, match="no token for answer 'Yes'"):
        AnswerSet.build(organism, ["Yes", "No"])


def test_paper_files_score_unchanged(tmp_path, tiny_llava):
    probe = paper_probe(tmp_path / "paper")
    good, problems = check_probe(probe)
    assert not problems and len(good) == 18
    rows = read_rows(probe)
    assert [r.cell for r in rows[:9]] == list(range(9)) and rows[0].id == "0" and rows[0].extra == {}
    df = score_probe(tiny_llava, probe, {"baseline": []}, progress=False)
    assert list(df.cell[:9]) == list(range(9)) and set(df.grid) == {"3x3"} and set(df.n_cells) == {9}
    assert df.answer.eq("Yes").all() and df.p_correct.between(0, 1).all()
    prompts = tiny_llava.tokenizer.decode(tiny_llava.inputs([Image.open(probe / "0_0.jpg")],
                                                            [tiny_llava.prompt(PAPER_PROMPT.format(
                                                                caption="a cat 0"))])["input_ids"][0])
    assert "<image>" in prompts
    m = cell_metrics(df)
    assert len(m["cell_accuracy"]) == 9 and m["grid"] == [3, 3]


def test_string_rule_columns_match_generated_text(tmp_path, tiny_llava):
    probe = paper_probe(tmp_path / "paper", n_items=1)
    df = score_probe(tiny_llava, probe, {"baseline": [], "bapa": [interp.BaPA()]}, progress=False,
                     string_rule=True, max_new_tokens=3)
    assert {"pred_text", "correct_prefix", "correct_robust"} <= set(df.columns)
    rows = read_rows(probe)
    img = Image.open(probe / rows[4].image).convert("RGB")
    inputs = tiny_llava.inputs([img], [tiny_llava.prompt(PAPER_PROMPT.format(caption=rows[4].caption))])
    ids = tiny_llava.generate(inputs, [], max_new_tokens=3)
    text = tiny_llava.tokenizer.decode(ids[0], skip_special_tokens=True)
    got = df[(df.condition == "baseline") & (df.row == 4)].iloc[0]
    assert got.pred_text == text
    assert got.correct_prefix == (prefix_answer(text) == "Yes") and got.correct_robust == (robust_answer(text) == "Yes")


def test_similarity_matches_a_hand_computation(tmp_path, tiny_llava):
    probe = caption_probe("skimage", tmp_path / "sim", n_items=1, kind="similarity", size=96, negatives=True,
                          progress=False).parent
    df = similarity_scores(tiny_llava, probe, progress=False)
    rows = read_rows(probe)
    assert len(df) == len(rows) * 2 and set(df.pooling) == {"max", "mean"}
    r = rows[4]  # target in the centre cell
    img = Image.open(probe / r.image).convert("RGB")
    inputs = tiny_llava.inputs([img], [tiny_llava.prompt(PAPER_PROMPT.format(caption=r.caption))])
    proj = trace(tiny_llava, inputs, cache=["projector"]).cache["projector"][0].float()  # (16, D): 4×4 patches
    ids = tiny_llava.tokenizer(r.caption, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        txt = tiny_llava.model.get_input_embeddings()(torch.tensor(ids)).float()
    assert torch.allclose(caption_embeddings(tiny_llava, r.caption), txt)
    centre = proj.reshape(4, 4, -1)[1:3, 1:3].reshape(4, -1)  # patch centres 12, 20 px of 32 fall in cell 4
    for how, f in (("max", lambda x: x.max(0).values), ("mean", lambda x: x.mean(0))):
        got = df[(df.row == 4) & (df.pooling == how)].iloc[0]
        assert got.sim_image == pytest.approx(float(F.cosine_similarity(f(txt), f(proj), dim=0)), abs=1e-5)
        assert got.sim_cell == pytest.approx(float(F.cosine_similarity(f(txt), f(centre), dim=0)), abs=1e-5)
        assert got.n_cell_tokens == 4
    s = similarity_summary(df)
    assert set(s) == {"max", "mean"} and len(s["max"]["cell_sim_image"]) == 9
    yes = df[(df.pooling == "max") & (df.answer == "Yes")]
    assert s["max"]["cell_sim_image"][4] == pytest.approx(yes[yes.cell == 4].sim_image.mean())
    assert "cell_sim_image_mismatch" in s["max"]


def test_occlusion_matches_a_hand_computation(tmp_path, tiny_llava):
    probe = caption_probe("skimage", tmp_path / "g", n_items=1, size=90, grid=(3, 3), progress=False).parent
    rows = read_rows(probe)[:2]
    df = occ.occlusion_scores(tiny_llava, probe, {"baseline": []}, rows=rows, steps=3, progress=False)
    assert len(df) == 2 * 9 and set(df.region) == set(range(9))
    from analyses.evaluate import answer_set
    cands = answer_set(tiny_llava, rows, {"answers": ["Yes", "No"]})
    img = Image.open(probe / rows[1].image).convert("RGB")
    prompt = tiny_llava.prompt(PAPER_PROMPT.format(caption=rows[1].caption))

    def ld(im):
        with torch.no_grad():
            lg = tiny_llava.run(tiny_llava.inputs([im], [prompt]), last_only=True)[:, -1]
        return float(cands.score(lg, ["Yes"])["logit_diff"][0])

    base = ld(img)
    got = df[(df.row == 1) & (df.oy == 2) & (df.ox == 1)].iloc[0]
    assert (got.sx, got.sy, got.square, got.region) == (30, 60, 30, 7)
    assert got.base_logit_diff == pytest.approx(base, abs=1e-5)
    assert got.delta == pytest.approx(ld(occ.occluded(img, 30, 60, 30)) - base, abs=1e-5)
    t = occ.region_table(df)
    assert t[(t.cell == 1) & (t.region == 7)].mean_abs_delta.item() == pytest.approx(abs(got.delta), abs=1e-6)
    maps = occ.position_maps(df)
    assert set(maps) == {0, 1} and maps[1].shape == (3, 3) and maps[1].max() == pytest.approx(1.0)
    assert np.allclose(occ.image_map(df, 1), df[df.row == 1].sort_values(["oy", "ox"]).abs_delta.to_numpy()
                       .reshape(3, 3))
    assert occ.offsets(840, 42, 20) == list(range(0, 799, 42))  # the paper's 20×20 tiling


def test_real_photo_probe_end_to_end_on_a_tiny_model(tmp_path):
    """skimage probe → saved tiny LLaVA → spatialbias eval with string rule, similarity and occlusion."""
    m, p = interp.tiny.build_llava(seed=1)
    model = interp.tiny.save(m, p, tmp_path / "tiny")
    runner = CliRunner()
    probe, out = tmp_path / "probe", tmp_path / "out"
    r = runner.invoke(app, ["probe", "build", "--source", "skimage", "--out", str(probe), "--n", "2", "--negatives",
                            "--grid", "2x2", "--canvas", "64", "--no-progress"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["eval", "--model", str(model), "--probe", str(probe), "--out", str(out), "--condition",
                            "baseline", "--condition", "bapa", "--string-rule", "--similarity",
                            "--occlusion-steps", "2", "--no-progress"])
    assert r.exit_code == 0, r.output
    df = pd.read_parquet(out / "tables" / "eval.parquet")
    assert len(df) == 2 * 2 * 4 * 2 and set(df.grid) == {"2x2"} and set(df.position) == {"r0c0", "r0c1", "r1c0", "r1c1"}
    assert {"pred_text", "correct_prefix", "correct_robust", "line"} <= set(df.columns)
    res = pd.read_parquet(out / "results.parquet")
    n = res[(res.intervention == "baseline") & (res.metric == "n")].sort_values("cell").value.tolist()
    assert n == [4, 4, 4, 4]
    run, = json.loads((out / "summary.json").read_text())["runs"]
    base = run["conditions"]["baseline"]
    assert run["grid"] == [2, 2] and len(base["cell_accuracy"]) == 4
    assert 0.0 <= base["accuracy_robust"] <= 1.0
    assert len(run["similarity"]["max"]["cell_sim_image"]) == 4
    assert len(pd.read_parquet(out / "tables" / "occlusion.parquet")) == 16 * 4 * 2
    for stem in ("cell_accuracy_", "similarity_", "occlusion_"):
        assert any(p.stat().st_size > 1000 for p in (out / "figures").glob(f"{stem}*.png")), stem
    # the report on a 2×2 probe and a model labelled as random weights
    (model / "provenance.json").write_text(json.dumps({"random_weights": True, "note": "pipeline check"}))
    rep = tmp_path / "rep"
    r = runner.invoke(app, ["report", "--model", str(model), "--probe", str(probe), "--out", str(rep),
                            "--lambdas", "0.5", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert "Random-weight model" in r.output
    page = (rep / "index.html").read_text()
    assert "Random weights." in page and "<th>r1c1</th>" in page and "2×2 grid" in page
    run, = json.loads((rep / "summary.json").read_text())["runs"]
    assert run["grid"] == [2, 2] and "flow" in run["causal"]  # the causal analyses run on the probe's grid
    assert all(len(v) == 4 for v in run["causal"]["flow"]["baseline"].values())


def test_figures_for_other_grids():
    from analyses.figures import cell_heatmaps
    acc = np.linspace(0, 1, 16)
    rows = [{"metric": "accuracy", "cell": c, "value": v} for c, v in enumerate(acc)]
    rows += [{"metric": "grid_rows", "value": 4}, {"metric": "grid_cols", "value": 4},
             {"metric": "mean_accuracy", "value": 0.5}, {"metric": "range", "value": 1.0}]
    df = pd.concat([pd.DataFrame(rows).assign(intervention=iv, family=iv, seed=0, model="m", probe="p",
                                              analysis="eval") for iv in ("baseline", "bapa")], ignore_index=True)
    df["lambda"] = np.nan
    df["cell"] = df["cell"].astype("Int64")
    fig = cell_heatmaps(df)
    assert fig.axes[0].collections[0].get_array().reshape(4, 4)[3, 3] == pytest.approx(1.0)


def test_shift_probe_gets_a_curve(tmp_path, tiny_llava):
    probe = caption_probe("skimage", tmp_path / "s", n_items=2, kind="shift", size=60, step=10, progress=False).parent
    df = score_probe(tiny_llava, probe, {"baseline": []}, progress=False)
    assert sorted(df.offset.unique()) == [0, 10, 20, 30, 40]
    from analyses.figures import shift_curves
    from analyses.metrics import shift_curve
    c = shift_curve(df, key="p_correct", n_resamples=200)
    assert list(c.offset) == [0, 10, 20, 30, 40] and list(c.n) == [2] * 5
    assert c["mean"].tolist() == pytest.approx(df.groupby("offset").p_correct.mean().tolist())
    fig = shift_curves(df.rename(columns={"condition": "intervention"}).assign(model="m", probe="p", family="baseline",
                                                                             seed=0, **{"lambda": np.nan}))
    assert fig.axes[0].get_xlabel().startswith("target offset") and len(fig.axes[0].lines) == 1
