"""The diagnosis rule (analyses/diagnosis.py) on hand-made results rows: each label from the
numbers that should give it, the BaPA-trained condition, and a refusal when rows are missing."""
import numpy as np
import pandas as pd
import pytest

from analyses import diagnosis as dg
from spatialbias.errors import SpatialBiasError


def table(paired_p, pos, vis, condition="baseline", chi2_p=None):
    """Results rows with the paired p ``paired_p`` (None: an old table with only the χ² p, then
    ``chi2_p`` or ``paired_p``) and χ² p ``chi2_p`` (default: ``paired_p``) under ``condition``."""
    nan = np.nan
    rows = []
    for iv in ("baseline", "bapa"):
        p = paired_p if iv == condition else 0.9
        c = (paired_p if chi2_p is None else chi2_p) if iv == condition else 0.9
        rows += [dict(intervention=iv, analysis="eval", metric="range", value=0.3, ci_low=0.1, ci_high=0.35),
                 dict(intervention=iv, analysis="eval", metric="chi2_p", value=c)]
        if p is not None:
            rows += [dict(intervention=iv, analysis="eval", metric="paired_p", value=p),
                     dict(intervention=iv, analysis="eval", metric="range_debiased", value=0.25, ci_low=0.1,
                          ci_high=0.35)]
    rows += [dict(intervention=condition, analysis="patching", metric="position_restoration", layer=nan,
                  value=pos[0], ci_low=pos[1], ci_high=pos[2]),
             dict(intervention=condition, analysis="patching", metric="position_restoration", layer=0.0,
                  value=0.0, ci_low=0.0, ci_high=0.0),
             dict(intervention=condition, analysis="patching", metric="restoration_denoise", site="lm.input",
                  group="moved", value=vis[0], ci_low=vis[1], ci_high=vis[2]),
             dict(intervention=condition, analysis="patching", metric="restoration_denoise", site="lm.input",
                  group="target", value=0.99, ci_low=0.98, ci_high=1.0)]
    df = pd.DataFrame(rows)
    for k in ("cell", "layer", "site", "group", "ci_low", "ci_high"):
        df[k] = df[k] if k in df else nan
    return df.assign(model="m", probe="p", seed=0)


@pytest.mark.parametrize("paired_p,pos,vis,label,note", [
    (0.5, (0.9, 0.8, 1.0), (0.0, -0.1, 0.1), dg.NONE, None),
    (1e-6, (0.9, 0.6, 1.1), (0.1, -0.1, 0.3), dg.LM_IDS, None),
    (1e-6, (0.1, -0.1, 0.3), (0.9, 0.6, 1.1), dg.BEFORE_LM, None),
    (1e-6, (0.1, -0.1, 0.3), (0.1, -0.2, 0.4), dg.MIXED, "lm_order"),
    (1e-6, (0.8, 0.6, 1.0), (0.8, 0.55, 1.0), dg.MIXED, "both"),
    (1e-6, (0.8, 0.4, 1.0), (0.1, -0.2, 0.3), dg.MIXED, "wide"),
    (0.009, (0.9, 0.6, 1.1), (0.1, -0.1, float("nan")), dg.MIXED, "wide"),
])
def test_rule(paired_p, pos, vis, label, note):
    d = dg.diagnose(table(paired_p, pos, vis), "m", "p")
    assert (d["label"], d["note"]) == (label, note)
    assert d["numbers"]["position_restoration"]["value"] == pos[0]  # the all-layers row, not layer 0
    assert d["numbers"]["vision_restoration"]["value"] == vis[0]    # the moved group, not target
    assert d["label"] in d["text"]


def test_bapa_trained_model_is_diagnosed_under_bapa():
    assert dg.condition_of({"config": {"bapa_train": True}}) == "bapa"
    assert dg.condition_of({"config": {"bapa_train": False}}) == "baseline" == dg.condition_of(None)
    d = dg.diagnose(table(1e-9, (0.0, -0.1, 0.1), (0.9, 0.7, 1.1), condition="bapa"), "m", "p", "bapa")
    assert d["label"] == dg.BEFORE_LM and d["condition"] == "bapa"


def test_missing_patching_rows_refused():
    df = table(1e-6, (0.9, 0.6, 1.1), (0.1, -0.1, 0.3))
    with pytest.raises(SpatialBiasError, match="patching"):
        dg.diagnose(df[df.analysis == "eval"], "m", "p")


def test_the_gate_reads_the_paired_p_and_an_old_table_the_chi2_p():
    pos, vis = (0.9, 0.6, 1.1), (0.1, -0.1, 0.3)
    d = dg.diagnose(table(1e-4, pos, vis, chi2_p=0.3), "m", "p")  # the χ² misses a paired effect
    assert d["label"] == dg.LM_IDS and d["numbers"]["test"] == "paired" and d["numbers"]["p"] == 1e-4
    assert "paired p 0.0001" in d["text"] and "0.250 [0.100, 0.350] (raw max − min 0.300)" in d["text"]
    assert dg.diagnose(table(0.3, pos, vis, chi2_p=1e-4), "m", "p")["label"] == dg.NONE
    old = dg.diagnose(table(None, pos, vis, chi2_p=0.3), "m", "p")
    assert old["label"] == dg.NONE and old["numbers"]["test"] == "chi2" and "χ² p 0.3" in old["text"]
    assert "0.300 [0.100, 0.350]" in old["text"]
    assert dg.diagnose(table(None, pos, vis, chi2_p=1e-4), "m", "p")["label"] == dg.LM_IDS


def test_two_matching_rows_refused_naming_the_filter():
    df = table(1e-6, (0.9, 0.6, 1.1), (0.1, -0.1, 0.3))
    twice = pd.concat([df, df[df.metric == "position_restoration"].assign(value=0.1)], ignore_index=True)
    with pytest.raises(SpatialBiasError, match="2 rows match.*position_restoration"):
        dg.diagnose(twice, "m", "p")


def test_several_seeds_refused_unless_one_is_named():
    a = table(1e-6, (0.9, 0.6, 1.1), (0.1, -0.1, 0.3))                 # seed 0: position ids
    b = table(1e-6, (0.1, -0.1, 0.3), (0.9, 0.6, 1.1)).assign(seed=1)  # seed 1: before the LM
    both = pd.concat([a, b], ignore_index=True)
    with pytest.raises(SpatialBiasError, match=r"seeds \[0, 1\]"):
        dg.diagnose(both, "m", "p")
    assert dg.diagnose(both, "m", "p", seed=0)["label"] == dg.LM_IDS
    assert dg.diagnose(both, "m", "p", seed=1)["label"] == dg.BEFORE_LM
    assert dg.diagnose(b, "m", "p")["label"] == dg.BEFORE_LM  # one seed: no need to name it
    with pytest.raises(SpatialBiasError, match="seed 2"):
        dg.diagnose(both, "m", "p", seed=2)


def test_summary_diagnoses_the_lowest_seed_and_names_it():
    from analyses.summary import _diagnosis
    both = pd.concat([table(1e-6, (0.1, -0.1, 0.3), (0.9, 0.6, 1.1)).assign(seed=3),
                      table(1e-6, (0.9, 0.6, 1.1), (0.1, -0.1, 0.3)).assign(seed=1)], ignore_index=True)
    d = _diagnosis(both, "m", "p", None)
    assert (d["seed"], d["label"]) == (1, dg.LM_IDS)
