"""Where does a model's spatial bias live? One label per model × probe, from the results table.

Role: the automatic diagnosis that ``summary.json``, the HTML report and ``spatialbias zoo``
carry. May import: ``spatialbias``. Reads only the tidy rows of ``results.parquet`` (eval rows of
the diagnosed condition and of BaPA; the patching rows of the diagnosed condition).

The decision rule (fixed before the zoo was scored under it; see docs/zoo.md)
-------------------------------------------------------------------------------
Inputs, all from one (model, probe) and the diagnosed condition ``c`` (``"baseline"`` unless
the model was trained with BaPA position ids, when its own condition is ``"bapa"``):

* ``p`` = the paired homogeneity p of per-cell accuracy under ``c`` (eval ``paired_p``:
  Cochran's Q over items × cells, an item's nine placements paired; docs/statistics.md); a
  results table written before that metric existed has only the χ² p (``chi2_p``, which treats
  the placements as independent and is far too conservative), and the rule then reads that;
* ``P`` = position-id restoration, all layers (patching, ``position_restoration``, layer null):
  the corrupt run with the target's image tokens given their clean position ids, as a share of
  the clean − corrupt logit-difference gap, with its item-bootstrap 95 % interval [P.lo, P.hi];
* ``V`` = vision-side restoration (patching, ``restoration_denoise`` at ``lm.input``, group
  ``moved``): the corrupt run with the target's clean image tokens (as the vision tower and
  projector made them at the clean cell) moved into the corrupt cell's slots, position ids and
  sequence slots kept; interval [V.lo, V.hi].

Rule (``ALPHA`` = 0.01, ``MOST`` = 0.5):

1. ``p ≥ ALPHA`` → **no significant spatial bias** (the causal numbers are then ratios of a gap
   that is not there, and are reported but not read).
2. ``P.lo ≥ MOST`` and ``V.hi < MOST`` → **bias carried by the LM's image position ids**: giving
   the tokens their clean ids restores most of the gap, moving their content does not.
3. ``V.lo ≥ MOST`` and ``P.hi < MOST`` → **bias present before the LM (vision tower /
   projector)**: the content moved into the bad slot restores most of the gap, the ids do not.
4. anything else → **mixed / undetermined**, with a note naming the pattern:
   ``"lm_order"`` when ``P.hi < MOST`` and ``V.hi < MOST`` (neither the ids nor the content
   carries the gap: what is left inside the LM is the tokens' sequence slot — their order under
   the causal mask; an LM-side bias that BaPA does not remove, NOT a vision-side one);
   ``"both"`` when ``P.lo ≥ MOST`` and ``V.lo ≥ MOST``; ``"wide"`` otherwise (an interval
   straddles ``MOST``: more items would decide it).

The BaPA range (eval under ``bapa``, with its interval and paired p) is reported beside the label
as corroboration and is not part of the rule. ``ALPHA`` = 0.01 rather than 0.05 because a zoo
scores tens of runs and a 5 % false alarm per null run would, by design, call a bias in one of
every twenty; ``MOST`` = 0.5 is "most of the gap".
"""
from __future__ import annotations

import math

import pandas as pd

from spatialbias.errors import SpatialBiasError

ALPHA = 0.01
MOST = 0.5
NONE = "no significant spatial bias"
LM_IDS = "bias carried by the LM's image position ids"
BEFORE_LM = "bias present before the LM (vision tower / projector)"
MIXED = "mixed / undetermined"
LABELS = (NONE, LM_IDS, BEFORE_LM, MIXED)
NOTES = {
    "lm_order": "neither the position ids nor the moved content restores most of the gap: the LM reads the "
                "tokens' sequence slot (their order under the causal mask); an LM-side bias that BaPA keeps",
    "both": "the position ids and the moved content each restore most of the gap",
    "wide": "an interval straddles 0.5: more items would decide",
}


def _num(x) -> float | None:
    return None if x is None or pd.isna(x) else float(x)


def _row(d: pd.DataFrame, **match) -> dict | None:
    """{value, ci_low, ci_high} of the one row matching ``match`` (null-valued keys match NaN);
    None when no row matches; refuses (one line, naming the filter) when several do."""
    sel = d
    for k, v in match.items():
        sel = sel[sel[k].isna()] if v is None else sel[sel[k] == v]
    if sel.empty:
        return None
    if len(sel) > 1:
        where = ", ".join(f"{k}={v!r}" for k, v in match.items())
        raise SpatialBiasError(f"diagnosis: {len(sel)} rows match {where}; the rule reads one: keep one row per "
                               "(model, probe, seed, condition, metric) in the results table")
    r = sel.iloc[0]
    return {"value": _num(r["value"]), "ci_low": _num(r.get("ci_low")), "ci_high": _num(r.get("ci_high"))}


def condition_of(training: dict | None) -> str:
    """The condition a model is diagnosed under: ``"bapa"`` for an organism trained with BaPA
    position ids (its ``training.json`` config has ``bapa_train``), else ``"baseline"``."""
    return "bapa" if ((training or {}).get("config") or {}).get("bapa_train") else "baseline"


def diagnose(df: pd.DataFrame, model: str, probe: str, condition: str = "baseline", seed: int | None = None) -> dict:
    """The diagnosis of one (model, probe, plan seed) of a results table under ``condition``.

    ``seed``: the plan seed whose rows are read; None reads the table's only seed for this
    (model, probe) and refuses (one line, naming them) when it holds several. Returns {label,
    note, condition, seed, numbers: {condition_range, range_debiased, p, test, chi2_p, paired_p,
    bapa_range, bapa_range_debiased, bapa_p, bapa_chi2_p, position_restoration,
    vision_restoration}, text}; each range / restoration with ``value``/``ci_low``/``ci_high``
    (the range's interval is the calibrated ``range_ci``, about the debiased range); ``p`` is the
    p the rule read and ``test`` its name (``"paired"``, or ``"chi2"`` for a table without
    ``paired_p`` rows). Refuses (one line) when the eval or patching rows the rule needs are
    missing or when a number the rule reads has several rows."""
    d = df[(df.model == model) & (df.probe == probe)]
    if d.empty:
        raise SpatialBiasError(f"diagnosis: no rows for model {model!r}, probe {probe!r}")
    d, seed = _one_seed(d, model, probe, seed)
    ev = d[(d.analysis == "eval") & d.cell.isna()]
    pa = d[(d.analysis == "patching") & (d.intervention == condition)]
    e = ev[ev.intervention == condition]
    rng, chi, paired = _row(e, metric="range"), _row(e, metric="chi2_p"), _row(e, metric="paired_p")
    if rng is None or (chi is None and paired is None):
        raise SpatialBiasError(f"diagnosis of {model} / {probe}: no eval rows under {condition!r}; run the eval "
                               f"analysis with the {condition} condition")
    pos = _row(pa, metric="position_restoration", layer=None)
    vis = _row(pa, metric="restoration_denoise", site="lm.input", group="moved")
    b = ev[ev.intervention == "bapa"]
    test, p = ("paired", paired["value"]) if paired is not None else ("chi2", chi["value"])
    numbers = {"condition_range": rng, "range_debiased": _row(e, metric="range_debiased"), "p": p, "test": test,
               "chi2_p": _value(chi), "paired_p": _value(paired), "bapa_range": _row(b, metric="range"),
               "bapa_range_debiased": _row(b, metric="range_debiased"), "bapa_p": _gate_p(b),
               "bapa_chi2_p": _value(_row(b, metric="chi2_p")),
               "position_restoration": pos, "vision_restoration": vis}
    if p >= ALPHA:
        label, note = NONE, None
    else:
        if pos is None or vis is None:
            raise SpatialBiasError(f"diagnosis of {model} / {probe}: a significant bias ({_P[test]} {p:.2g}) but "
                                   f"no position-id or vision-side patching rows under {condition!r}; run the "
                                   "patching analysis with that condition")
        label, note = rule(pos, vis)
    return {"label": label, "note": note, "condition": condition, "seed": seed, "numbers": numbers,
            "text": text(label, note, condition, numbers)}


_P = {"paired": "paired p", "chi2": "χ² p"}


def _value(row: dict | None) -> float | None:
    return (row or {}).get("value")


def _gate_p(e: pd.DataFrame) -> float | None:
    """The p the rule reads from one condition's eval rows: ``paired_p``, else ``chi2_p``."""
    return _value(_row(e, metric="paired_p") or _row(e, metric="chi2_p"))


def _one_seed(d: pd.DataFrame, model: str, probe: str, seed: int | None) -> tuple[pd.DataFrame, int]:
    """(the rows of plan seed ``seed``, that seed); with ``seed`` None, the only seed of ``d``."""
    seeds = sorted(int(s) for s in d.seed.unique())
    if seed is None:
        if len(seeds) > 1:
            raise SpatialBiasError(f"diagnosis of {model} / {probe}: the table holds seeds {seeds}; pass seed= one of "
                                   "them (the diagnosis is per seed)")
        seed = seeds[0]
    if seed not in seeds:
        raise SpatialBiasError(f"diagnosis of {model} / {probe}: no rows of seed {seed}; the table holds seeds {seeds}")
    return d[d.seed == seed], seed


def rule(pos: dict, vis: dict) -> tuple[str, str | None]:
    """Steps 2–4 of the module's rule, from the two restorations' intervals."""
    p_lo, p_hi = _bounds(pos)
    v_lo, v_hi = _bounds(vis)
    if p_lo >= MOST and v_hi < MOST:
        return LM_IDS, None
    if v_lo >= MOST and p_hi < MOST:
        return BEFORE_LM, None
    if p_hi < MOST and v_hi < MOST:
        return MIXED, "lm_order"
    if p_lo >= MOST and v_lo >= MOST:
        return MIXED, "both"
    return MIXED, "wide"


def _bounds(x: dict) -> tuple[float, float]:
    """(lo, hi) of an interval; a missing or non-finite bound is taken as the open side (the
    rule then cannot call the number high or low)."""
    lo, hi = x.get("ci_low"), x.get("ci_high")
    lo = -math.inf if lo is None or not math.isfinite(lo) else lo
    hi = math.inf if hi is None or not math.isfinite(hi) else hi
    return lo, hi


def _fmt(x: dict | None, pct: bool = False) -> str:
    if not x or x.get("value") is None:
        return "n/a"
    f = (lambda v: f"{v:.0%}") if pct else (lambda v: f"{v:.3f}")
    ci = "" if x.get("ci_low") is None or x.get("ci_high") is None else f" [{f(x['ci_low'])}, {f(x['ci_high'])}]"
    return f"{f(x['value'])}{ci}"


def text(label: str, note: str | None, condition: str, n: dict) -> str:
    """The diagnosis in one paragraph, every number from ``n``."""
    label_p = _P[n.get("test", "chi2")]
    out = (f"Diagnosis ({condition}): {label}" + (f" — {NOTES[note]}" if note else "") + ". "
           f"Range across cells {_range(n['condition_range'], n.get('range_debiased'))} ({label_p} "
           f"{n.get('p', n['chi2_p']):.2g}); BaPA range {_range(n['bapa_range'], n.get('bapa_range_debiased'))}"
           + (f" ({label_p} {n['bapa_p']:.2g})" if n.get("bapa_p") is not None else "")
           + f"; position-id restoration {_fmt(n['position_restoration'], True)}; vision-side (moved content) "
           f"restoration {_fmt(n['vision_restoration'], True)}.")
    return out


def _range(raw: dict | None, debiased: dict | None) -> str:
    """A range for the text: the debiased range with its interval and the raw max − min, or
    (an older table without ``range_debiased``) the raw range with its interval."""
    if not debiased or debiased.get("value") is None or not raw:
        return _fmt(raw)
    return f"{_fmt(debiased)} (raw max − min {raw['value']:.3f})"
