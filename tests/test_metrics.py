"""Per-cell statistics against scipy and hand computations."""
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analyses.metrics import bootstrap_ci, cell_metrics, chi2_homogeneity
from analyses.scoring import AnswerSet


def table(acc_per_cell, n=40, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        for k, a in enumerate(acc_per_cell):
            c = bool(rng.random() < a)
            rows.append({"id": f"i{i}", "cell": k, "correct": c, "p_correct": 0.9 if c else 0.2})
    return pd.DataFrame(rows)


def test_cell_metrics_by_hand():
    df = table([0.5, 0.6, 0.7, 0.8, 0.9, 0.5, 0.6, 0.7, 0.8])
    m = cell_metrics(df)
    acc = df.groupby("cell")["correct"].mean().to_numpy()
    assert m["cell_accuracy"] == pytest.approx(acc.tolist())
    assert m["mean_accuracy"] == pytest.approx(acc.mean())
    assert m["range"] == pytest.approx(acc.max() - acc.min())
    assert m["std"] == pytest.approx(acc.std())
    assert m["cv"] == pytest.approx(acc.std() / acc.mean())
    hits = df.groupby("cell")["correct"].sum().to_numpy()
    ref = stats.chi2_contingency(np.stack([hits, 40 - hits], 1), correction=False)
    assert m["chi2_p"] == pytest.approx(ref.pvalue)
    assert all(lo <= a <= hi for lo, a, hi in zip(m["cell_ci_low"], m["cell_accuracy"], m["cell_ci_high"]))
    per_item = df.groupby("id")["correct"].agg(lambda s: s.all() or not s.any())
    assert m["consistency"] == pytest.approx(per_item.mean())


def test_chi2_degenerate_tables_are_homogeneous():
    assert chi2_homogeneity(np.array([10, 10]), np.array([10, 10])) == (0.0, 1.0)
    assert chi2_homogeneity(np.array([0, 0]), np.array([10, 10])) == (0.0, 1.0)
    assert chi2_homogeneity(np.array([0, 10]), np.array([10, 10]))[1] < 1e-4


def test_bootstrap_interval_covers_and_narrows():
    rng = np.random.default_rng(0)
    x = (rng.random(400) < 0.7).astype(float)
    lo, hi = bootstrap_ci(x, np.random.default_rng(1))
    se = x.std() / np.sqrt(len(x))
    assert lo < x.mean() < hi
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.2)
    assert bootstrap_ci(np.ones(10), np.random.default_rng(0)) == (1.0, 1.0)


def test_answer_scoring_from_logits(tiny_llava):
    tok = tiny_llava.tokenizer
    cands = AnswerSet.build(tok, ["Yes", "No"])
    logits = torch_logits(len(tok), {cands.token_ids[0]: 2.0, cands.token_ids[1]: 0.0})
    s = cands.score(logits, ["Yes"])
    assert bool(s["correct"][0]) and s["logit_diff"][0].item() == pytest.approx(2.0)
    assert s["p_correct"][0].item() == pytest.approx(1 / (1 + np.exp(-2.0)))
    assert not bool(cands.score(logits, ["No"])["correct"][0])


def torch_logits(v, vals):
    import torch
    x = torch.full((1, v), -5.0)
    for k, val in vals.items():
        x[0, k] = val
    return x
