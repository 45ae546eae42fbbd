"""The paired test and the range / spread intervals of cell_metrics on simulated probes with a
known truth (analyses/calibration.py; the full tables are in docs/statistics.md). Seeded and
small: a few seconds."""
import numpy as np
import pytest
from scipy import stats

from analyses import calibration as cal
from analyses.metrics import cochran_q, paired_test


@pytest.fixture(scope="module")
def null():
    """200 null probes (200 items × 9 cells, shared item difficulty) through cell_metrics."""
    return cal.calibration((0.0,), n_probes=200, seed=11, n_resamples=100).iloc[0]


def test_paired_test_holds_its_level_and_the_unpaired_chi2_does_not(null):
    assert 0.02 <= null["paired_0.05"] <= 0.09  # binomial SE at 200 probes: 0.015
    assert null["paired_0.01"] <= 0.035
    # the χ² treats an item's 9 placements as independent: far below its level (fails the check above)
    assert null["chi2_0.05"] < 0.02


def test_range_interval_can_say_no_effect(null):
    assert null["range_ci_reaches_0"] >= 0.9 and null["range_ci_covers"] >= 0.9  # a percentile CI: 0 %
    assert null["spread_ci_covers"] >= 0.9
    assert null["mean_range_debiased"] < null["mean_range"] / 2  # the raw max − min is biased upward


def test_range_interval_covers_a_planted_range():
    r = cal.calibration((0.10,), n_probes=200, seed=12, n_resamples=100).iloc[0]
    assert r["true_range"] == pytest.approx(0.10)
    assert 0.89 <= r["range_ci_covers"] <= 0.99 and 0.89 <= r["spread_ci_covers"] <= 0.99
    assert abs(r["mean_range_debiased"] - 0.10) < 0.015 < r["mean_range"] - 0.10


def test_permutation_p_holds_its_level_with_few_items():
    rng = np.random.default_rng(13)
    probes = cal.simulate(rng, 300, 30, np.zeros(9))
    res = [paired_test(w, rng, 199) for w in probes]
    assert {r[3] for r in res} == {"cochran_q_permutation"}
    assert 0.015 <= np.mean([r[2] < 0.05 for r in res]) <= 0.08


def test_cochran_q_by_hand_and_degenerate():
    rng = np.random.default_rng(0)
    y = (rng.random((60, 4)) < [0.3, 0.5, 0.6, 0.8]).astype(float)
    C, R, k = y.sum(0), y.sum(1), 4
    q_hand = (k - 1) * (k * (C ** 2).sum() - C.sum() ** 2) / (k * R.sum() - (R ** 2).sum())
    assert cochran_q(y) == (pytest.approx(q_hand), 3)
    q, df, p, name = paired_test(y, rng, min_items=10)
    assert name == "cochran_q" and p == pytest.approx(stats.chi2.sf(q_hand, 3))
    _, _, p_perm, name = paired_test(y, np.random.default_rng(1), 2000, min_items=10 ** 6)
    assert name == "cochran_q_permutation" and p_perm == pytest.approx(p, abs=0.02)
    assert paired_test(np.ones((20, 9)), rng) == (0.0, 0, 1.0, "cochran_q")
    assert paired_test(np.zeros((20, 9)), rng)[2] == 1.0
    assert paired_test(np.repeat([[0.0], [1.0]], 9, 1), rng)[2] == 1.0  # every item constant


def test_incomplete_items_use_the_permutation_p():
    rng = np.random.default_rng(2)
    y = (rng.random((200, 9)) < np.linspace(0.4, 0.8, 9)).astype(float)
    y[::3, 4] = np.nan  # a third of the items lack cell 4
    q, df, p, name = paired_test(y, rng, 500)
    assert name == "cochran_q_permutation" and df == 8 and p < 0.01
    assert cochran_q(y[::3])[0] == pytest.approx(cochran_q(np.delete(y[::3], 4, 1))[0])  # one cell absent


def test_planted_ranges_are_population_ranges():
    for r in (0.05, 0.15):
        for shape in cal.SHAPES:
            assert cal.true_values(cal.plant(r, shape))[0] == pytest.approx(r)
    assert cal.true_values(cal.plant(0.0))[0] == pytest.approx(0.0, abs=1e-12)
