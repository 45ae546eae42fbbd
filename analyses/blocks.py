"""What the summary and every analysis' summary block and claims share: a results row as
``{value, ci_low, ci_high}``, the (model, probe) runs of a table, and lookups in a run's causal
blocks.

Role: below :mod:`analyses.summary` and :mod:`analyses.kinds` (both read it). May import:
``spatialbias``, pandas.
"""
from __future__ import annotations

import math

import pandas as pd


def _f(x) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) or pd.isna(x) else float(x)


def vci(r) -> dict:
    """{value, ci_low, ci_high} of a results row (a mapping), NaN as None."""
    return {"value": _f(r["value"]), "ci_low": _f(r["ci_low"]), "ci_high": _f(r["ci_high"])}


def runs(df: pd.DataFrame) -> list[tuple[str, str]]:
    """(model, probe) pairs of a results table, in table order."""
    return list(dict.fromkeys(zip(df.model, df.probe)))


def restoration_of(run: dict, iv: str, site: str, group: str, direction: str = "denoise") -> dict | None:
    """The restoration block of one patch (site, group, direction) under ``iv``, or None."""
    for r in run["causal"].get("patching", {}).get(iv, {}).get("restoration", []):
        if (r["site"], r["group"], r["direction"]) == (site, group, direction):
            return r
    return None


def position_of(run: dict, iv: str, layers, what: str) -> dict | None:
    """The position-id patching block (``layers`` "all" or an index; ``what`` restoration or damage)."""
    return next((r for r in run["causal"].get("position_patching", {}).get(iv, [])
                 if r["layers"] == layers and r["what"] == what), None)
