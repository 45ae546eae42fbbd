"""--screen K: attribution ranks every patch, exact patching confirms the top K (interp.screen).

Bugs these catch: the top K taken by signed instead of absolute attribution, confirmed patches
that are not the exact ones (rows misaligned after the concat), a screen that leaves out patches
of the table, K = 0 passing silently, the plan id changing for runs without --screen."""
import pytest
import torch

import interp
from helpers import mirrored_pair
from interp import attribution, patching, screen, tiny
from spatialbias.errors import SpatialBiasError


@pytest.fixture(scope="module")
def setup():
    m = interp.load(*tiny.build_llava())
    n = 3
    clean, corrupt, correct, cands = mirrored_pair(m, n)
    ps = patching.default_patches(m)
    return m, (corrupt, clean, ps, correct, cands, [(0, 8)] * n)


def test_top_k_exact_rest_estimated(setup):
    m, args = setup
    exact = patching.run_patches(m, *args)
    est = attribution.attribution_patching(m, *args)
    k = 4
    got = screen.screened_patches(m, *args, k=k)
    assert len(got) == len(exact) and got[["item", "site", "group"]].equals(exact[["item", "site", "group"]])
    ranked = screen.rank_patches(est)
    r = attribution.estimated_restoration(est)
    mags = sorted(r.estimate.abs(), reverse=True)
    by = r.set_index(["site", "group"]).estimate
    assert [abs(by.loc[x]) for x in ranked] == mags and (by < 0).any()  # by |estimate|, negatives included
    top = set(ranked[:k])
    conf = got[got.method == "exact"]
    assert {(s, g) for s, g in zip(conf.site, conf.group)} == top
    key = ["item", "site", "group"]
    j = conf.merge(exact, on=key, suffixes=("", "_x"))
    assert len(j) == k * 3 and (j.metric - j.metric_x).abs().max() <= 1e-6  # fewer patches per forward: rounding
    rest = got[got.method == "screen_estimate"].merge(est, on=key, suffixes=("", "_e"))
    assert torch.allclose(torch.tensor(rest.metric.to_numpy()),
                          torch.tensor((rest.base_metric_e + rest.attribution).to_numpy()))


def test_all_confirmed_is_exact_patching_and_k0_refuses(setup):
    m, args = setup
    ps = args[2]
    got = screen.screened_patches(m, *args, k=len(ps))
    exact = patching.run_patches(m, *args)
    assert (got.method == "exact").all() and got[["item", "site", "group"]].equals(exact[["item", "site", "group"]])
    assert (got.metric - exact.metric).abs().max() <= 1e-6
    with pytest.raises(SpatialBiasError, match="--screen"):
        screen.screened_patches(m, *args, k=0)


def test_screen_misses_counts_effects_outside_the_top_k(setup):
    m, args = setup
    exact = patching.run_patches(m, *args)
    est = attribution.attribution_patching(m, *args)
    rows = screen.screen_misses(exact, est, [1, len(args[2])])
    assert rows[-1]["missed"] == 0  # every patch confirmed: nothing missed
    r = patching.restoration(exact, "denoise")
    big = {(s, g) for s, g, v in zip(r.site, r.group, r.restoration) if abs(v) >= 0.05}
    first = screen.rank_patches(est)[0]
    assert rows[0]["effects"] == len(big) > 1
    assert rows[0]["missed"] == len(big - {first})
    assert rows[0]["missed_patches"] == sorted(f"{s}/{g}" for s, g in big - {first})


def test_screen_below_patch_count_keeps_estimates_out_of_restoration(organism, small_probe):
    """--screen K < patches: the unconfirmed patches carry ``screen_estimate_*`` rows only, never
    ``restoration_*``; the confirmed ones' ``restoration_*`` equal full exact patching's."""
    import numpy as np

    from analyses import causal
    pairs = causal.placement_pairs(organism, small_probe, clean_cell=8, corrupt_cell=0, n_items=3)
    k = 3
    scr = causal.activation_items(organism, pairs, [], screen=k)
    assert set(scr.method) == {"exact", "screen_estimate"}
    full = causal.restoration_rows(causal.activation_items(organism, pairs, []), np.random.default_rng(0))
    rows = causal.restoration_rows(scr, np.random.default_rng(0))
    n_patches = len(patching.default_patches(organism))
    for direction in ("denoise", "noise"):
        confirmed = {(r["site"], r["group"]): r["value"] for r in rows if r["metric"] == f"restoration_{direction}"}
        estimated = {(r["site"], r["group"]) for r in rows if r["metric"] == f"screen_estimate_{direction}"}
        assert len(confirmed) == k and len(estimated) == n_patches - k and not confirmed.keys() & estimated
        want = {(r["site"], r["group"]): r["value"] for r in full if r["metric"] == f"restoration_{direction}"}
        assert len(want) == n_patches
        for key, v in confirmed.items():
            assert abs(v - want[key]) <= 1e-5 * (1 + abs(want[key]))


def test_plan_screen_option_in_id_only_when_given():
    from analyses import plan as pl
    from pathlib import Path
    base = {"models": {"o": "organism"}, "probes": {"p": {"build": "shapes", "n": 2}}, "analyses": ["patching"]}
    ids = lambda cfg: [c.id for c in pl.from_mapping(cfg, Path("."), "/tmp/x", "t").conditions]  # noqa: E731
    plain = ids(base)
    assert "screen" not in pl.from_mapping(base, Path("."), "/tmp/x", "t").conditions[0].options
    scr = ids({**base, "analysis": {"patching": {"screen": 10}}})
    assert set(plain).isdisjoint(scr)
    with pytest.raises(SpatialBiasError, match="screen"):
        ids({**base, "analysis": {"patching": {"screen": 0}}})
