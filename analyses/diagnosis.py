"""Where does a model's spatial bias live? A decomposition of the gap into shares, from the
results table, and a label derived from the shares.

Role: the automatic diagnosis that ``summary.json``, the HTML report and ``spatialbias zoo``
carry. May import: ``spatialbias``. Reads only the tidy rows of ``results.parquet`` (eval rows of
the diagnosed condition and of BaPA; the patching rows of the diagnosed condition). A shipped
organism is diagnosed exactly as a user's checkpoint: under ``baseline`` (ordinary position ids),
nothing read from its training record.

The components (shares of the clean − corrupt answer logit-difference gap)
-------------------------------------------------------------------------
All from the patching analysis between the baseline's best (clean) and worst (corrupt) cell,
chosen on held-out items; each a ratio of item means with its item-bootstrap 95 % interval:

* ``P`` — LM position ids: the corrupt run with the target's image tokens given the clean cell's
  position ids (``position_restoration``, all layers). n/a under BaPA (one shared id: the swap
  changes nothing by construction);
* ``V`` — vision side: the corrupt run with the target's clean image tokens (content as the
  vision tower and projector made it at the clean cell, with the vision tower's position code)
  moved into the corrupt cell's slots, LM ids kept (``restoration_denoise`` at ``lm.input``,
  group ``moved``);
* ``Q`` — the vision tower's position code, inside ``V``: the corrupt run with the vision
  tower's learned position embeddings of the two cells swapped, LM ids untouched (site
  ``vision.embed``, group ``vision_position``). n/a for a tower with rotary positions;
* ``J`` — joint: moved content with the clean ids (group ``joint``): everything from the good
  placement but the sequence slots;
* ``R = 1 − J`` — the slots themselves (token order under the causal mask);
* ``I = J − P − V`` — interaction of content and ids (``interaction``).

The rule (written before any run scored it: docs/diagnosis_preregistration.md)
----------------------------------------------------------------------------
``ALPHA`` = 0.01, ``MIN_SHARE`` = 0.2, the gap gate ``analyses.causal.MIN_GAP`` = 0.5.

1. paired homogeneity p (Cochran's Q, eval ``paired_p``; ``chi2_p`` for older tables) ≥ ALPHA →
   **no significant spatial bias**;
2. the gap's interval not above MIN_GAP (``gap_read`` = 0) → **bias not decomposed** (the gap on
   the patched items is too small to divide by);
3. a component is *present* when its interval's lower end ≥ MIN_SHARE. The label names the
   present ones among **LM position ids** (P), **vision side** (V; "vision side (its position
   code)" when Q is present too) and **token order** (R), each with its share, joined by " + "
   ("mixed: …" when more than one); none present → **undetermined** (every share's interval
   reaches below MIN_SHARE: more items would decide).

The BaPA range (eval under ``bapa``) is reported beside it as corroboration, not used by the rule.
"""
from __future__ import annotations

import math

import pandas as pd

from spatialbias.errors import SpatialBiasError

ALPHA = 0.01
MIN_SHARE = 0.2
NONE = "no significant spatial bias"
NOT_READ = "bias not decomposed: the gap on the patched items is not clearly above the minimum"
UNDETERMINED = "undetermined: no component's share is clearly above 20 %"
LM_IDS = "LM position ids"
VISION = "vision side"
VISION_CODE = "vision side (its position code)"
ORDER = "token order"
COMPONENTS = {"P": "LM position ids", "V": "vision side (content with its vision position code)",
              "Q": "vision tower's position code", "J": "joint (content and ids)", "R": "token order (1 − J)",
              "I": "interaction (J − P − V)"}


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


def components(pa: pd.DataFrame, family: str = "baseline") -> dict[str, dict | None]:
    """P, V, Q, J, R, I of one condition's patching rows (None where the table has no row; P is
    None under BaPA, where it is zero by construction)."""
    j = _row(pa, metric="restoration_denoise", site="lm.input", group="joint")
    r = None if j is None or j["value"] is None else {
        "value": 1 - j["value"], "ci_low": None if j["ci_high"] is None else 1 - j["ci_high"],
        "ci_high": None if j["ci_low"] is None else 1 - j["ci_low"]}
    return {"P": None if family == "bapa" else _row(pa, metric="position_restoration", layer=None),
            "V": _row(pa, metric="restoration_denoise", site="lm.input", group="moved"),
            "Q": _row(pa, metric="restoration_denoise", site="vision.embed", group="vision_position"),
            "J": j, "R": r, "I": _row(pa, metric="interaction")}


def diagnose(df: pd.DataFrame, model: str, probe: str, condition: str = "baseline", seed: int | None = None) -> dict:
    """The diagnosis of one (model, probe, plan seed) of a results table under ``condition``.

    ``seed``: the plan seed whose rows are read; None reads the table's only seed and refuses
    (one line, naming them) when it holds several. Returns {label, condition, seed, p, test,
    gap, components: {P, V, Q, J, R, I: {value, ci_low, ci_high} or None}, present: [names],
    numbers: {condition_range, range_debiased, bapa_range, bapa_range_debiased, bapa_p}, text}.
    Refuses (one line) when the eval rows, or (for a significant bias) the patching rows, are
    missing, or when a number the rule reads has several rows."""
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
    test, p = ("paired", paired["value"]) if paired is not None else ("chi2", chi["value"])
    b = ev[ev.intervention == "bapa"]
    family = str(d[d.intervention == condition].family.iloc[0]) if len(d[d.intervention == condition]) else condition
    out = {"condition": condition, "seed": seed, "p": p, "test": test, "gap": None, "components": {}, "present": [],
           "numbers": {"condition_range": rng, "range_debiased": _row(e, metric="range_debiased"),
                       "bapa_range": _row(b, metric="range"), "bapa_range_debiased": _row(b, metric="range_debiased"),
                       "bapa_p": _value(_row(b, metric="paired_p") or _row(b, metric="chi2_p"))}}
    if p >= ALPHA:
        out["label"] = NONE
    else:
        gap, read = _row(pa, metric="gap"), _row(pa, metric="gap_read")
        comps = components(pa, family)
        if comps["V"] is None and comps["P"] is None:
            raise SpatialBiasError(f"diagnosis of {model} / {probe}: a significant bias ({_P[test]} {p:.2g}) but no "
                                   f"patching rows under {condition!r}; run the patching analysis with that condition")
        out.update(gap=gap, components=comps)
        if read is not None and not read["value"]:
            out["label"] = NOT_READ
        else:
            out["present"] = present(comps)
            out["label"] = label(out["present"], comps)
    out["text"] = text(out)
    return out


def present(comps: dict[str, dict | None]) -> list[str]:
    """The components among P, V, Q, R whose interval's lower end is at least :data:`MIN_SHARE`."""
    return [k for k in ("P", "V", "Q", "R") if comps.get(k) and _bounds(comps[k])[0] >= MIN_SHARE]


def label(names: list[str], comps: dict[str, dict | None]) -> str:
    """Step 3 of the rule: the present components with their shares."""
    parts = []
    if "P" in names:
        parts.append(f"{LM_IDS} {comps['P']['value']:.0%}")
    if "V" in names:
        parts.append(f"{VISION_CODE if 'Q' in names else VISION} {comps['V']['value']:.0%}")
    if "R" in names:
        parts.append(f"{ORDER} {comps['R']['value']:.0%}")
    if not parts:
        return UNDETERMINED
    return parts[0] if len(parts) == 1 else "mixed: " + " + ".join(parts)


def kind(label_: str) -> str:
    """The label without its shares, for comparing with an expected label ("LM position ids +
    vision side"; "no significant spatial bias"; …)."""
    if not label_.startswith(("mixed: ", LM_IDS, VISION, ORDER)):
        return label_
    body = label_.removeprefix("mixed: ")
    return " + ".join(p.rsplit(" ", 1)[0] for p in body.split(" + "))


_P = {"paired": "paired p", "chi2": "χ² p"}


def _value(row: dict | None) -> float | None:
    return (row or {}).get("value")


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


def text(dg: dict) -> str:
    """The diagnosis in one paragraph, every number from ``dg``."""
    n, c = dg["numbers"], dg["components"]
    out = (f"Diagnosis ({dg['condition']}): {dg['label']}. Range across cells "
           f"{_range(n['condition_range'], n.get('range_debiased'))} ({_P[dg['test']]} {dg['p']:.2g}); BaPA range "
           f"{_range(n['bapa_range'], n.get('bapa_range_debiased'))}"
           + (f" ({_P[dg['test']]} {n['bapa_p']:.2g})" if n.get("bapa_p") is not None else "") + ".")
    if dg["label"] == NOT_READ:
        out += (f" Gap {_fmt(dg.get('gap'))} logit difference: its interval reaches below the 0.5 minimum, so "
                "its shares are not read (the per-item numbers are in tables/patching).")
    elif c:
        out += (f" Gap {_fmt(dg.get('gap'))} logit difference; shares of it: "
                + "; ".join(f"{COMPONENTS[k]} {_fmt(c.get(k), True)}" for k in ("P", "V", "Q", "J", "R", "I"))
                + ".")
    return out


def _range(raw: dict | None, debiased: dict | None) -> str:
    """A range for the text: the debiased range with its interval and the raw max − min, or
    (an older table without ``range_debiased``) the raw range with its interval."""
    if not debiased or debiased.get("value") is None or not raw:
        return _fmt(raw)
    return f"{_fmt(debiased)} (raw max − min {raw['value']:.3f})"
