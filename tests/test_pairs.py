"""The ``pairs`` analysis (``analyses/kinds/pairs.py``): the diagnosis' components for the best cell
against the k worst, or every pair of cells, ranked on the held-out items."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from analyses.tasks import Context
from test_lens import condition


def test_cell_pairs_by_hand():
    from analyses.kinds.pairs import cell_pairs
    acc = np.array([0.5, 0.9, 0.1, 0.7, 0.3, 0.5, 0.2, 0.8, 0.6])
    assert cell_pairs(acc, 1) == [(1, 2)]  # best (cell 1) against the worst (cell 2)
    assert cell_pairs(acc, 3) == [(1, 2), (1, 6), (1, 4)]
    assert cell_pairs(acc, 5)[3:] == [(1, 0), (1, 5)]  # 0.5 twice: the lower cell counts as worse
    assert cell_pairs(acc, 50) == [(1, c) for c in (2, 6, 4, 0, 5, 8, 3, 7)]  # at most every other cell
    every = cell_pairs(acc, "all")
    assert len(every) == 36 and len({frozenset(p) for p in every}) == 36
    assert all(acc[a] > acc[b] or (acc[a] == acc[b] and a < b) for a, b in every)  # clean = better (ties: lower)
    assert (0, 5) in every and (5, 0) not in every  # a tie: the lower cell index is clean
    ties = cell_pairs(np.full(9, 0.5), 2)
    assert ties == [(0, 1), (0, 2)]  # all equal: the first cell is best and the next the worst, as argmax / argmin


def test_bad_option_is_one_line():
    from analyses.kinds.pairs import check
    from spatialbias.errors import SpatialBiasError
    for bad in (0, "some", True, 1.5):
        with pytest.raises(SpatialBiasError, match="pairs = "):
            check({"pairs": bad}, "[analysis.pairs]")
    assert check({"pairs": "all"}, "x") == {"pairs": "all"}


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    from probes.build import shapes_probe
    out = tmp_path_factory.mktemp("pairsprobe")
    shapes_probe(out, n_items=45, seed=43, progress=False)
    return out


@pytest.fixture(scope="module")
def runs(organism, probe):
    from analyses.kinds import pairs, patching
    ctx = Context(batch_size=32)
    cond = condition("pairs", probe, 30, pairs=2)
    rows, d = pairs.run(organism, cond, ctx)
    prow, _ = patching.run(organism, condition("patching", probe, 30, cells="auto"), ctx)
    return pd.DataFrame(rows), d, pd.DataFrame(prow), ctx


def test_first_pair_is_best_to_worst_and_matches_the_patching_analysis(runs):
    """The first pair is the patching analysis' best → worst pair on the same held-out ranking and
    the same items, so its components equal patching's exactly (two code paths, one answer)."""
    r, d, p, ctx = runs
    acc = r[r.metric == "held_out_accuracy"].sort_values("cell").value.to_numpy()
    np.testing.assert_array_equal(acc, next(iter(ctx.cells.values())))
    clean, corrupt = int(p[p.metric == "clean_cell"].value.iloc[0]), int(p[p.metric == "corrupt_cell"].value.iloc[0])
    assert clean == int(np.argmax(acc)) and corrupt == int(np.argmin(acc))
    first = r[r.group == f"{clean}→{corrupt}"]
    assert len(first) and list(dict.fromkeys(r.group.dropna()))[0] == f"{clean}→{corrupt}"
    pairs_gap = first[first.metric == "pair_gap"].iloc[0]
    gap = p[p.metric == "gap"].iloc[0]
    assert pairs_gap.value == pytest.approx(gap.value, abs=1e-9)
    for metric, (site, group) in (("pair_moved", ("lm.input", "moved")), ("pair_joint", ("lm.input", "joint")),
                                  ("pair_vision_position", ("vision.embed", "vision_position"))):
        want = p[(p.metric == "restoration_denoise") & (p.site == site) & (p.group == group)].value.iloc[0]
        got = first[first.metric == metric].value.iloc[0]
        assert got == pytest.approx(want, abs=1e-9, nan_ok=True), metric
    want = p[(p.metric == "position_restoration") & p.layer.isna()].value.iloc[0]
    assert first[first.metric == "pair_position_restoration"].value.iloc[0] == pytest.approx(want, abs=1e-9,
                                                                                             nan_ok=True)


def test_rows_per_pair_and_items_held_out(runs, probe):
    from probes.format import read_rows
    r, d, _, _ = runs
    groups = list(dict.fromkeys(r.group.dropna()))
    assert len(groups) == 2 and len({g.split("→")[0] for g in groups}) == 1  # the best cell against 2 worst
    for g in groups:
        assert set(r[r.group == g].metric) == {"pair_gap", "pair_gap_read", "pair_position_restoration",
                                               "pair_moved", "pair_joint", "pair_vision_position"}
        assert (r[r.group == g].cell == int(g.split("→")[1])).all()
    ids = list(dict.fromkeys(x.id for x in read_rows(probe)))
    assert set(d.id) == set(ids[:30]) and d.groupby(["clean_cell", "corrupt_cell"]).size().eq(30).all()


def test_bapa_has_no_position_component_and_small_gaps_are_not_read(organism, probe, runs):
    from analyses.kinds import pairs
    _, _, _, ctx = runs
    cond = condition("pairs", probe, 30, interventions=({"kind": "bapa", "variant": "reference"},), pairs=1)
    cond = dataclasses.replace(cond, family="bapa", intervention="bapa")
    rows, d = pairs.run(organism, cond, ctx)
    r = pd.DataFrame(rows)
    assert "pair_position_restoration" not in set(r.metric) and "P" not in d
    read = r[r.metric == "pair_gap_read"].value.iloc[0]
    shares = r[r.metric.isin(["pair_moved", "pair_joint"])].value
    assert read == 1.0 or shares.isna().all()  # a gap not clearly above MIN_GAP leaves its ratios unread
    gap = r[r.metric == "pair_gap"].iloc[0]
    from analyses.causal import MIN_GAP
    assert (read == 1.0) == (gap.ci_low >= MIN_GAP)


def test_summary_and_claims(runs):
    from analyses.kinds import pairs
    r, _, _, _ = runs
    df = r.assign(intervention="baseline")
    s = pairs.summary(df, ["baseline"])["pairs"]["baseline"]
    assert len(s) == 2 and set(s[0]) == {"clean", "corrupt", "gap", "P", "V", "J", "Q"}
    assert len(pairs.claims({"causal": {"pairs": {"baseline": s}}})) == 2
