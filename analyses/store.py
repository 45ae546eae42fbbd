"""The results store of a run folder: crash-safe parts, one tidy table, per-condition details.

Role: everything a run writes and reads back. May import: ``spatialbias``, ``analyses.plan``
(and ``interp.load.fingerprint``, lazily). Layout of ``OUT/``::

    plan.json            the plan's mapping as run          conditions.jsonl  one condition per line
    models.json          model → weights fingerprint        timings.jsonl     seconds per condition
    parts/{id}.parquet   a finished condition's rows (atomic; written before the next starts)
    details/{id}.parquet its per-row / per-item table (scores, patches, flows, …), when it has one
    results.parquet      the parts of the plan, concatenated (only whole conditions; rebuilt)
    failed.jsonl         conditions that failed, one line each

``results.parquet`` is tidy: one row per condition × metric (:data:`COLUMNS`); ``ci_low`` /
``ci_high`` hold the bootstrap 95% interval of a value where it has one; ``details`` names the
condition's detail table (relative to ``OUT``).
"""
from __future__ import annotations

import functools
import io
import json
import os
import platform
from pathlib import Path

import numpy as np
import pandas as pd

from analyses.plan import Condition, Plan, PlanError
from spatialbias.files import atomic_write_bytes, atomic_write_text

COLUMNS = ["condition_id", "model", "probe", "intervention", "family", "lambda", "analysis", "seed", "metric",
           "cell", "layer", "site", "group", "value", "ci_low", "ci_high", "details", "config", "versions",
           "model_fingerprint"]
"""Columns of ``results.parquet``. ``cell``/``layer``/``site``/``group`` are null where a metric
has no such index; ``lambda`` is AGCI's fixed λ (the rule's scale for adaptive AGCI), else NaN."""


@functools.cache
def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "nnsight", "spatialbias"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def frame(cond: Condition, rows: list[dict], fingerprint: str, details: str | None) -> pd.DataFrame:
    """A condition's metric rows ({metric, value, [cell, layer, site, group, ci_low, ci_high]}) as
    :data:`COLUMNS`."""
    df = pd.DataFrame(rows)
    for col in ("cell", "layer"):
        df[col] = pd.array(df[col] if col in df else [None] * len(df), dtype="Int64")
    for col in ("site", "group"):
        df[col] = pd.array(df[col] if col in df else [None] * len(df), dtype="string")
    for col in ("ci_low", "ci_high"):
        df[col] = (df[col] if col in df else pd.Series([np.nan] * len(df))).astype("float64")
    df = df.assign(condition_id=cond.id, model=cond.model, probe=cond.probe, intervention=cond.intervention,
                   family=cond.family, seed=int(cond.seed), analysis=cond.analysis,
                   config=json.dumps(cond.to_dict(), sort_keys=True), versions=json.dumps(versions(), sort_keys=True))
    df["lambda"] = np.nan if cond.lam is None else float(cond.lam)
    df["value"] = df["value"].astype("float64")
    df["seed"] = df["seed"].astype("int64")
    df["details"] = pd.array([details] * len(df), dtype="string")
    df["model_fingerprint"] = pd.array([fingerprint] * len(df), dtype="string")
    return df[COLUMNS]


def empty() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="object") for c in COLUMNS})


def _parquet(df: pd.DataFrame) -> bytes:
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


class Store:
    """The files of one run folder (see the module doc)."""

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.parts = self.out / "parts"
        self._read: dict[str, pd.DataFrame] = {}  # parts already read back: each is read once

    def done(self) -> set[str]:
        return {p.stem for p in self.parts.glob("*.parquet")} if self.parts.is_dir() else set()

    def write(self, cond: Condition, rows: pd.DataFrame, details: pd.DataFrame | None, seconds: float) -> None:
        """A finished condition: its details first, then its part (the part marks it done)."""
        if details is not None:
            atomic_write_bytes(self.out / "details" / f"{cond.id}.parquet", _parquet(details))
        atomic_write_bytes(self.parts / f"{cond.id}.parquet", _parquet(rows))
        with open(self.out / "timings.jsonl", "a") as fh:  # advisory; a torn last line is skipped on read
            fh.write(json.dumps({"condition_id": cond.id, "model": cond.model, "analysis": cond.analysis,
                                 "seconds": round(seconds, 4)}) + "\n")

    def timings(self) -> pd.DataFrame:
        p = self.out / "timings.jsonl"
        recs = []
        if p.is_file():
            for line in p.read_text().splitlines():
                try:
                    recs.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return pd.DataFrame(recs, columns=["condition_id", "model", "analysis", "seconds"])

    def collect(self, conditions: list[Condition]) -> pd.DataFrame:
        """Concatenate the parts of ``conditions`` (in plan order) into ``results.parquet``."""
        done = self.done()
        for c in conditions:
            if c.id in done and c.id not in self._read:
                self._read[c.id] = pd.read_parquet(self.parts / f"{c.id}.parquet")
        frames = [self._read[c.id] for c in conditions if c.id in done]
        df = pd.concat(frames, ignore_index=True) if frames else empty()
        atomic_write_bytes(self.out / "results.parquet", _parquet(df))
        return df

    def write_plan(self, plan: Plan) -> None:
        atomic_write_text(self.out / "plan.json", json.dumps(plan.config, indent=1, sort_keys=True, default=str) + "\n")
        atomic_write_text(self.out / "conditions.jsonl",
                          "".join(json.dumps(c.to_dict(), sort_keys=True) + "\n" for c in plan.conditions))

    def write_failed(self, failed: list[tuple[str, str]]) -> None:
        atomic_write_text(self.out / "failed.jsonl", "".join(json.dumps({"condition_id": i, "error": e}) + "\n"
                                                             for i, e in failed))

    def check_fingerprints(self, plan: Plan) -> dict[str, str]:
        """Fingerprint every model of the plan (:func:`interp.load.fingerprint`: config + weights)
        and compare with ``OUT/models.json``: a model whose weights changed since its finished
        conditions were computed is refused (one line) instead of silently mixing their results
        with new ones. Writes ``OUT/models.json``; returns {model name: fingerprint}."""
        from interp.load import fingerprint
        path = self.out / "models.json"
        try:
            known = json.loads(path.read_text()) if path.is_file() else {}
        except ValueError:
            known = {}
        done = self.done()
        prints = {}
        for c in {c.model: c for c in plan.conditions}.values():
            fp = fingerprint(c.model_path)
            was = known.get(c.model)
            if was is not None and was != fp and any(x.model == c.model and x.id in done for x in plan.conditions):
                raise PlanError(f"{self.out}: the finished conditions of model {c.model!r} were computed with other "
                                f"weights (fingerprint {was}, now {fp}); run into a new --out, or delete "
                                f"{self.parts} to recompute")
            prints[c.model] = fp
        atomic_write_text(path, json.dumps({**known, **prints}, indent=1, sort_keys=True) + "\n")
        return prints


def read_details(out: str | os.PathLike, results: pd.DataFrame, analysis: str) -> pd.DataFrame:
    """The detail tables of every condition of ``analysis`` in ``results``, concatenated, each row
    tagged with its condition's model, probe, intervention, family, λ and seed."""
    out = Path(out)
    d = results[(results.analysis == analysis) & results.details.notna()]
    keys = ["condition_id", "model", "probe", "intervention", "family", "lambda", "seed", "details"]
    frames = []
    for r in d[keys].drop_duplicates("condition_id").to_dict("records"):
        p = out / r["details"]
        if p.is_file():
            t = pd.read_parquet(p)
            frames.append(t.assign(**{k: r[k] for k in keys if k != "details"}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
