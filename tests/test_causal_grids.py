"""The causal analyses on a probe's own grid (2×2 here), and the refusal of probes without cells."""
import pytest

import interp
from analyses import causal
from interp import tiny
from spatialbias.errors import SpatialBiasError
from probes.build import caption_probe


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("grid22")
    probe = caption_probe("skimage", d / "p22", n_items=2, seed=0, size=128, grid=(2, 2), progress=False).parent
    return interp.load(*tiny.build_llava()), probe, d


def test_patching_flow_and_knockout_on_a_2x2_grid(setup):
    m, probe, _ = setup
    pairs = causal.placement_pairs(m, probe, clean_cell=3, corrupt_cell=0, n_items=2)
    assert pairs.grid == (2, 2)
    import numpy as np
    rng = np.random.default_rng(0)
    last = f"lm.blocks.{m.adapter.layer_count(m.model, 'lm') - 1}"
    for ivs in ([], [interp.BaPA()]):
        ap = causal.restoration_rows(causal.activation_items(m, pairs, ivs), rng)
        full = [r for r in ap if r.get("site") == last and r.get("group") == "last"]
        assert len(full) == 2 and all(abs(r["value"] - 1) < 1e-4 for r in full)  # the final residual is the answer
        pp = causal.position_items(m, pairs, ivs)
        assert set(pp.layers) == {"all"} | {str(i) for i in range(m.adapter.layer_count(m.model, "lm"))}
        fl = causal.flow_items(m, probe, ivs, n_items=2)
        assert sorted(fl.target_cell.unique()) == [0, 1, 2, 3] and sorted(fl.cell.unique()) == [0, 1, 2, 3]
        per = fl.groupby(["item", "target_cell", "layer"]).mass.sum()
        assert ((per > 0) & (per <= 1 + 1e-5)).all()
    ko = causal.knockout_items(m, pairs, [])
    assert set(ko.blocked) == {"target cell", "distractor cell", "all image tokens"} and set(ko["item"]) == {0, 1}


def test_probes_without_cells_are_refused(setup):
    m, _, d = setup
    shift = caption_probe("skimage", d / "shift", n_items=1, seed=0, size=128, kind="shift", progress=False).parent
    with pytest.raises(SpatialBiasError, match="one n×m grid of cells"):
        causal.placement_pairs(m, shift, clean_cell=1, corrupt_cell=0)
