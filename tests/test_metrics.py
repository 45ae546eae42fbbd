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
    cands = AnswerSet.build(tiny_llava, ["Yes", "No"])
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


def test_grid_size_comes_from_the_table():
    rng = np.random.default_rng(3)
    acc = rng.uniform(0.3, 0.95, 16)
    df = table(acc, n=30, seed=4).assign(grid="4x4", n_cells=16)
    m = cell_metrics(df)
    assert m["grid"] == [4, 4] and len(m["cell_accuracy"]) == 16 and m["cell_n"] == [30] * 16
    hits = df.groupby("cell")["correct"].sum().to_numpy()
    ref = stats.chi2_contingency(np.stack([hits, 30 - hits], 1), correction=False)
    assert (m["chi2"], m["chi2_p"]) == pytest.approx((ref.statistic, ref.pvalue))
    sparse = df[df.cell != 5]  # a cell without rows stays in the lists as NaN
    ms = cell_metrics(sparse)
    assert len(ms["cell_accuracy"]) == 16 and np.isnan(ms["cell_accuracy"][5]) and ms["cell_n"][5] == 0
    with pytest.raises(ValueError, match="do not fit 9 cells"):
        cell_metrics(df.drop(columns=["grid", "n_cells"]))
    with pytest.raises(ValueError, match="mixes grids"):
        cell_metrics(pd.concat([df, table([0.5] * 9).assign(grid="3x3", n_cells=9)]))


def test_3x3_results_do_not_change_with_the_grid_columns():
    df = table([0.5, 0.6, 0.7, 0.8, 0.9, 0.5, 0.6, 0.7, 0.8], seed=2)
    a = cell_metrics(df, seed=5)
    b = cell_metrics(df.assign(grid="3x3", n_cells=9), seed=5)
    c = cell_metrics(df, seed=5, n_cells=9)
    assert a == b == c and a["grid"] == [3, 3]


def test_chi2_and_consistency_by_hand():
    # two cells: 30/40 and 10/40 right. Expected counts 20/20 per cell → χ² = Σ (o − e)² / e = 4·(10²/20) = 20
    assert chi2_homogeneity(np.array([30, 10]), np.array([40, 40]))[0] == pytest.approx(20.0)
    assert chi2_homogeneity(np.array([30, 10]), np.array([40, 40]))[1] == pytest.approx(stats.chi2.sf(20.0, 1))
    df = pd.DataFrame({"id": ["a"] * 3 + ["b"] * 3 + ["c"] * 3, "cell": [0, 1, 2] * 3,
                       "correct": [True, True, True, False, False, False, True, False, True],
                       "p_correct": [0.9] * 9})
    m = cell_metrics(df, n_cells=3)
    assert m["consistency"] == pytest.approx(2 / 3)  # a all right, b all wrong, c mixed
    assert m["cell_accuracy"] == pytest.approx([2 / 3, 1 / 3, 2 / 3])
    assert m["std"] == pytest.approx(np.std([2 / 3, 1 / 3, 2 / 3]))
    assert m["cv"] == pytest.approx(np.std([2 / 3, 1 / 3, 2 / 3]) / (5 / 9))


def test_bootstrap_equals_scipy_with_the_same_generator():
    x = (np.random.default_rng(7).random(50) < 0.6).astype(float)
    lo, hi = bootstrap_ci(x, np.random.default_rng(11), n_resamples=500)
    ref = stats.bootstrap((x,), np.mean, n_resamples=500, confidence_level=0.95, method="percentile",
                          rng=np.random.default_rng(11)).confidence_interval
    assert (lo, hi) == (ref.low, ref.high)


def test_shift_curve_by_hand():
    from analyses.metrics import shift_curve
    df = pd.DataFrame({"id": ["a", "b", "a", "b", "a", "b"], "offset": [0, 0, 70, 70, 140, 140],
                       "cell": [3, 3, 3, 3, 4, 4], "correct": [True, True, True, False, False, False],
                       "p_correct": [0.9, 0.8, 0.7, 0.4, 0.2, 0.1]})
    c = shift_curve(df, n_resamples=200)
    assert c.offset.tolist() == [0, 70, 140] and c["mean"].tolist() == [1.0, 0.5, 0.0]
    assert c.cell.tolist() == [3, 3, 4] and c.n.tolist() == [2, 2, 2]
    assert (c.ci_low[0], c.ci_high[0]) == (1.0, 1.0) and c.ci_low[1] <= 0.5 <= c.ci_high[1]
    assert shift_curve(df, key="p_correct")["mean"].tolist() == pytest.approx([0.85, 0.55, 0.15])
    with pytest.raises(ValueError, match="no 'offset' column"):
        shift_curve(df.drop(columns="offset"))


def test_range_and_mean_intervals_resample_items():
    import numpy as np
    import pandas as pd
    from analyses.metrics import cell_metrics
    rng = np.random.default_rng(0)
    rows = []
    for i in range(200):
        p = rng.random()  # item difficulty, shared by its 9 placements
        for c in range(9):
            rows.append({"id": str(i), "cell": c, "correct": rng.random() < (0.3 + 0.05 * c if i % 2 else p),
                         "p_correct": 0.5})
    df = pd.DataFrame(rows)
    m = cell_metrics(df, seed=1)
    lo, hi = m["range_ci"]
    # a planted 0.4 slope over half the items (true range 0.2); this sample's raw range is only 0.125
    assert m["range_debiased"] < m["range"] and lo <= m["range_debiased"] <= hi and m["range_ci"] == m["range_debiased_ci"]
    assert m["paired_test"] == "cochran_q" and m["paired_p"] < 0.05 and m["paired_df"] == 8
    assert m["paired_p"] < m["chi2_p"]  # pairing removes the items' difficulty from the noise
    mlo, mhi = m["mean_accuracy_ci"]
    assert mlo < m["mean_accuracy"] < mhi and mhi - mlo < 0.15
    flat = df.assign(correct=df["id"].astype(int) % 2 == 0)  # right or wrong everywhere: no spatial effect
    f = cell_metrics(flat, seed=1)
    assert f["range"] == 0 and f["range_ci"] == [0.0, 0.0]  # resampled items keep their placements paired
    assert (f["range_debiased"], f["spread"], f["spread_ci"], f["paired_p"]) == (0.0, 0.0, [0.0, 0.0], 1.0)
    quad = pd.concat([df] + [df.assign(id=df["id"] + f"_{r}", correct=np.random.default_rng(r).random(len(df))
                                       < np.where(df["id"].astype(int) % 2, 0.3 + 0.05 * df["cell"], 0.5))
                             for r in range(3)])  # 800 items
    q = cell_metrics(quad, seed=1)
    assert 0.1 < q["range_ci"][0] < 0.2 < q["range_ci"][1] and q["paired_p"] < 1e-6 and q["spread_ci"][0] > 0.2
