"""The diagnosis rule (analyses/diagnosis.py) on hand-made results rows: each label from the
component shares that should give it (mixtures included), the gap gate, the structural zero of
the position-id patch under BaPA, and refusals when rows are missing or ambiguous."""
import numpy as np
import pandas as pd
import pytest

from analyses import diagnosis as dg
from spatialbias.errors import SpatialBiasError


def table(paired_p, pos, vis, condition="baseline", chi2_p=None, joint=None, code=None, gap=(2.0, 1.5, 2.5),
          family=None):
    """Results rows with the paired p ``paired_p`` (None: an old table with only the χ² p, then
    ``chi2_p`` or ``paired_p``) and χ² p ``chi2_p`` (default: ``paired_p``) under ``condition``;
    patching rows: P ``pos``, V ``vis``, J ``joint`` (default P + V), Q ``code`` (absent by
    default), the gap (value, lo, hi) and whether it is read (lo ≥ 0.5), each (value, lo, hi)."""
    nan = np.nan
    joint = joint or (pos[0] + vis[0], pos[1] + vis[1], pos[2] + vis[2])
    rows = []
    for iv in ("baseline", "bapa"):
        p = paired_p if iv == condition else 0.9
        c = (paired_p if chi2_p is None else chi2_p) if iv == condition else 0.9
        fam = family if iv == condition and family else iv
        rows += [dict(intervention=iv, family=fam, analysis="eval", metric="range", value=0.3, ci_low=0.1,
                      ci_high=0.35),
                 dict(intervention=iv, family=fam, analysis="eval", metric="chi2_p", value=c)]
        if p is not None:
            rows += [dict(intervention=iv, family=fam, analysis="eval", metric="paired_p", value=p),
                     dict(intervention=iv, family=fam, analysis="eval", metric="range_debiased", value=0.25,
                          ci_low=0.1, ci_high=0.35)]
    patch = dict(intervention=condition, family=family or condition, analysis="patching")
    rows += [dict(patch, metric="position_restoration", layer=nan, value=pos[0], ci_low=pos[1], ci_high=pos[2]),
             dict(patch, metric="position_restoration", layer=0.0, value=0.0, ci_low=0.0, ci_high=0.0),
             dict(patch, metric="restoration_denoise", site="lm.input", group="moved", value=vis[0], ci_low=vis[1],
                  ci_high=vis[2]),
             dict(patch, metric="restoration_denoise", site="lm.input", group="joint", value=joint[0],
                  ci_low=joint[1], ci_high=joint[2]),
             dict(patch, metric="restoration_denoise", site="lm.input", group="target", value=0.99, ci_low=0.98,
                  ci_high=1.0),
             dict(patch, metric="gap", value=gap[0], ci_low=gap[1], ci_high=gap[2]),
             dict(patch, metric="gap_read", value=float(gap[1] >= 0.5))]
    if code is not None:
        rows.append(dict(patch, metric="restoration_denoise", site="vision.embed", group="vision_position",
                         value=code[0], ci_low=code[1], ci_high=code[2]))
    df = pd.DataFrame(rows)
    for k in ("cell", "layer", "site", "group", "ci_low", "ci_high"):
        df[k] = df[k] if k in df else nan
    return df.assign(model="m", probe="p", seed=0)


@pytest.mark.parametrize("paired_p,pos,vis,joint,code,kind", [
    (0.5, (0.9, 0.8, 1.0), (0.0, -0.1, 0.1), None, None, dg.NONE),
    (1e-6, (0.9, 0.6, 1.1), (0.1, -0.1, 0.3), (0.95, 0.8, 1.1), None, dg.LM_IDS),
    (1e-6, (0.1, -0.1, 0.3), (0.9, 0.6, 1.1), (0.95, 0.8, 1.1), None, dg.VISION),
    (1e-6, (0.1, -0.1, 0.15), (0.9, 0.6, 1.1), (0.95, 0.8, 1.1), (0.7, 0.5, 0.9), dg.VISION_CODE),
    # the reviewer's mixture: P 0.46, V 0.43, J 0.95 — both named with their shares, no order component
    (1e-6, (0.46, 0.43, 0.50), (0.43, 0.39, 0.47), (0.95, 0.9, 1.0), None, f"{dg.LM_IDS} + {dg.VISION}"),
    # neither ids nor content, J small: what is left is the slots (token order)
    (1e-6, (0.05, -0.1, 0.15), (0.05, -0.1, 0.15), (0.1, -0.05, 0.2), None, dg.ORDER),
    (1e-6, (0.3, 0.1, 0.5), (0.1, -0.2, 0.3), (0.9, 0.7, 1.1), None, dg.UNDETERMINED),
    (0.009, (0.9, 0.6, 1.1), (0.1, -0.1, float("nan")), (0.95, 0.8, 1.1), None, dg.LM_IDS),
])
def test_rule(paired_p, pos, vis, joint, code, kind):
    d = dg.diagnose(table(paired_p, pos, vis, joint=joint, code=code), "m", "p")
    assert dg.kind(d["label"]) == kind, d["label"]
    if kind != dg.NONE:
        c = d["components"]
        assert c["P"]["value"] == pos[0] and c["V"]["value"] == vis[0]  # the all-layers row, the moved group
        assert c["R"]["value"] == pytest.approx(1 - joint[0]) and c["R"]["ci_low"] == pytest.approx(1 - joint[2])
    assert d["label"] in d["text"]


def test_a_mixture_names_both_shares():
    d = dg.diagnose(table(1e-6, (0.46, 0.43, 0.50), (0.43, 0.39, 0.47), joint=(0.95, 0.9, 1.0)), "m", "p")
    assert d["label"] == "mixed: LM position ids 46% + vision side 43%"
    assert d["present"] == ["P", "V"] and "token order (1 − J) 5% [0%, 10%]" in d["text"]


def test_the_gap_gate_and_the_structural_zero_under_bapa():
    d = dg.diagnose(table(1e-6, (0.9, 0.6, 1.1), (0.1, -0.1, 0.3), gap=(0.04, -0.3, 0.4)), "m", "p")
    assert d["label"] == dg.NOT_READ and d["present"] == []
    b = dg.diagnose(table(1e-6, (0.0, 0.0, 0.0), (0.9, 0.7, 1.1), condition="bapa"), "m", "p", "bapa")
    assert b["components"]["P"] is None and "LM position ids n/a" in b["text"]  # zero by construction: n/a
    assert dg.kind(b["label"]) == dg.VISION


def test_missing_patching_rows_refused():
    df = table(1e-6, (0.9, 0.6, 1.1), (0.1, -0.1, 0.3))
    with pytest.raises(SpatialBiasError, match="patching"):
        dg.diagnose(df[df.analysis == "eval"], "m", "p")


def test_the_gate_reads_the_paired_p_and_an_old_table_the_chi2_p():
    pos, vis = (0.9, 0.6, 1.1), (0.1, -0.1, 0.3)
    d = dg.diagnose(table(1e-4, pos, vis, chi2_p=0.3), "m", "p")  # the χ² misses a paired effect
    assert dg.kind(d["label"]) == dg.LM_IDS and d["test"] == "paired" and d["p"] == 1e-4
    assert "paired p 0.0001" in d["text"] and "0.250 [0.100, 0.350] (raw max − min 0.300)" in d["text"]
    assert dg.diagnose(table(0.3, pos, vis, chi2_p=1e-4), "m", "p")["label"] == dg.NONE
    old = dg.diagnose(table(None, pos, vis, chi2_p=0.3), "m", "p")
    assert old["label"] == dg.NONE and old["test"] == "chi2" and "χ² p 0.3" in old["text"]
    assert "0.300 [0.100, 0.350]" in old["text"]
    assert dg.kind(dg.diagnose(table(None, pos, vis, chi2_p=1e-4), "m", "p")["label"]) == dg.LM_IDS


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
    assert dg.kind(dg.diagnose(both, "m", "p", seed=0)["label"]) == dg.LM_IDS
    assert dg.kind(dg.diagnose(both, "m", "p", seed=1)["label"]) == dg.VISION
    assert dg.kind(dg.diagnose(b, "m", "p")["label"]) == dg.VISION  # one seed: no need to name it
    with pytest.raises(SpatialBiasError, match="seed 2"):
        dg.diagnose(both, "m", "p", seed=2)


def test_summary_diagnoses_the_lowest_seed_and_names_it():
    from analyses.summary import _diagnosis
    both = pd.concat([table(1e-6, (0.1, -0.1, 0.3), (0.9, 0.6, 1.1)).assign(seed=3),
                      table(1e-6, (0.9, 0.6, 1.1), (0.1, -0.1, 0.3)).assign(seed=1)], ignore_index=True)
    d = _diagnosis(both, "m", "p", None)
    assert (d["seed"], dg.kind(d["label"])) == (1, dg.LM_IDS)
