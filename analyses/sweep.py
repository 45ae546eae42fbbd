"""Scripted ablation sweeps: models × probes × interventions × analyses × seeds, crash-safe.

A sweep is a TOML file (see ``docs/sweeps.md``)::

    seeds = [0]
    analyses = ["eval", "patching", "flow"]
    causal_items = 20            # items for patching and flow
    patch_cells = "auto"         # or [clean, corrupt]; auto = the baseline's best and worst cell

    [models]
    organism = "organism"        # 'organism', a checkpoint folder (relative to this file) or a cached hub id
    llava = { path = "ckpt/llava", probes = ["mine"] }   # a model limited to some probes

    [probes]
    shapes = { build = "shapes", n = 40, seed = 0 }   # built into OUT/probes/shapes
    mine = "probes/mine"                              # an existing probe (folder or rows file)

    [interventions]
    baseline = true
    bapa = ["reference"]                              # variants
    agci = [0.25, 0.5, 1.0]                           # fixed λ
    agci_adaptive = [{ rule = "cos_spread", scale = [1.0, 2.0] }]
    positions = ["reverse", "shuffle"]                # position-id controls

Every cell of the cross product is a :class:`Condition`, a JSON-serialisable config with a
stable 12-hex id that :func:`run_condition` runs alone. Each finished condition is written
atomically to ``OUT/parts/{id}.parquet`` before the next starts, and ``OUT/results.parquet`` is
rebuilt from the parts of the plan: killing the process at any moment loses at most the
condition in flight, and re-running the same command computes only what is missing.

``OUT/results.parquet`` is tidy, one row per condition × metric (:data:`COLUMNS`).
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import platform
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from interp.errors import SpatialBiasError
from probes.format import ProbeError, atomic_write_bytes, atomic_write_text, find_probe, is_built

ANALYSES = ("eval", "patching", "flow")
DTYPES = ("float32", "bfloat16", "float16")
INTERVENTION_KEYS = ("baseline", "bapa", "agci", "agci_pooled", "agci_adaptive", "positions")
COLUMNS = ["condition_id", "model", "probe", "intervention", "family", "lambda", "analysis", "seed", "metric",
           "cell", "layer", "site", "group", "value", "config", "versions", "model_fingerprint"]
"""Columns of ``results.parquet``. ``cell``/``layer``/``site``/``group`` are null where a metric
has no such index; ``lambda`` is AGCI's fixed λ (the rule's scale for adaptive AGCI), else NaN."""


class SweepError(SpatialBiasError):
    """A sweep file or output folder is unusable; the message names the file and key."""


# ------------------------------------------------------------------------------------------
# Conditions


@dataclass(frozen=True)
class Condition:
    """One cell of the sweep. ``interventions``: serialised :class:`interp.Intervention` dicts;
    ``model_path``/``probe_path``: resolved locations (not part of the id, so a moved output
    folder still resumes); ``options``: every setting that changes a number — what the analysis
    needs (items, cells) and how it runs (dtype, device, batch size) — all part of the id. The
    weights themselves are checked by fingerprint (:func:`interp.load.fingerprint`) when a sweep
    resumes."""
    model: str
    model_spec: str
    probe: str
    probe_spec: str
    intervention: str
    family: str
    lam: float | None
    interventions: tuple[dict, ...]
    analysis: str
    seed: int
    options: dict = field(default_factory=dict)
    model_path: str = ""
    probe_path: str = ""

    @property
    def id(self) -> str:
        key = {k: v for k, v in asdict(self).items() if k not in ("model_path", "probe_path")}
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=list).encode()).hexdigest()[:12]

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Condition":
        d = {k: v for k, v in d.items() if k != "id"}
        d["interventions"] = tuple(d["interventions"])
        return cls(**d)

    def build(self) -> list:
        """The intervention objects."""
        from interp.interventions import from_dict
        return [from_dict(d) for d in self.interventions]


def intervention_grid(spec: dict[str, Any], seed: int, where: str) -> list[tuple[str, str, float | None, tuple]]:
    """[(label, family, λ or None, serialised interventions)] from the ``[interventions]`` table."""
    from interp.interventions import AGCI, AdaptiveAGCI, BaPA, PositionPermute
    unknown = sorted(set(spec) - set(INTERVENTION_KEYS))
    if unknown:
        raise SweepError(f"{where}: unknown key(s) {', '.join(unknown)} in [interventions]; use "
                         f"{', '.join(INTERVENTION_KEYS)}")
    out = []
    if spec.get("baseline", True):
        out.append(("baseline", "baseline", None, ()))
    for v in _list(spec.get("bapa", []), where, "bapa"):
        out.append(("bapa" if v == "reference" else f"bapa:{v}", "bapa", None, (BaPA(variant=v).to_dict(),)))
    for key, pooled in (("agci", False), ("agci_pooled", True)):
        for lam in _list(spec.get(key, []), where, key):
            iv = AGCI(lam=lam, pooled=pooled)
            out.append((f"agci{'-pooled' if pooled else ''} λ={lam:g}", "agci", float(lam), (iv.to_dict(),)))
    for rule in _list(spec.get("agci_adaptive", []), where, "agci_adaptive"):
        if not isinstance(rule, dict) or "rule" not in rule:
            raise SweepError(f"{where}: agci_adaptive entries are tables like {{ rule = \"cos_spread\", scale = [1.0] }}")
        for scale in _list(rule.get("scale", [1.0]), where, "agci_adaptive.scale"):
            iv = AdaptiveAGCI(rule=rule["rule"], scale=scale, lam_max=rule.get("lam_max", 4.0),
                              pooled=rule.get("pooled", False))
            out.append((f"agci-adaptive {iv.rule}×{scale:g}", "agci-adaptive", float(scale), (iv.to_dict(),)))
    for mode in _list(spec.get("positions", []), where, "positions"):
        iv = PositionPermute(mode=mode, seed=seed)
        out.append((f"positions:{mode}", "positions", None, (iv.to_dict(),)))
    return out


def _list(v, where, key) -> list:
    v = v if isinstance(v, list) else [v]
    if key in ("agci", "agci_pooled", "agci_adaptive.scale") and not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        raise SweepError(f"{where}: [interventions] {key} must be a list of numbers, got {v!r}")
    return v


# ------------------------------------------------------------------------------------------
# The sweep file


@dataclass
class Sweep:
    """A parsed sweep file: ``conditions`` in run order (grouped by model), ``probes`` to build."""
    path: Path
    conditions: list[Condition]
    probes: dict[str, dict]           # name → build spec (only probes the sweep builds)
    settings: dict[str, Any]


def load_sweep(path: str | os.PathLike, out: str | os.PathLike) -> Sweep:
    """Parse and validate a sweep TOML file; relative paths are relative to the file."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"{path}: sweep file not found; pass a TOML file (see docs/sweeps.md)")
    try:
        cfg = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SweepError(f"{path}: not valid TOML ({e}); fix the file (see docs/sweeps.md)") from None
    where = str(path)
    known = {"seeds", "analyses", "batch_size", "causal_items", "patch_cells", "device", "models", "probes",
             "interventions", "dtype"}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise SweepError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    for key in ("models", "probes"):
        if not isinstance(cfg.get(key), dict) or not cfg[key]:
            raise SweepError(f"{where}: needs a [{key}] table with at least one entry (name = \"path\")")
    analyses = cfg.get("analyses", ["eval"])
    analyses = analyses if isinstance(analyses, list) else [analyses]
    bad = [a for a in analyses if a not in ANALYSES]
    if bad:
        raise SweepError(f"{where}: unknown analysis {bad[0]!r}; use {', '.join(ANALYSES)}")
    seeds = cfg.get("seeds", [0])
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise SweepError(f"{where}: seeds must be a non-empty list of integers, got {seeds!r}")
    cells = cfg.get("patch_cells", "auto")
    if cells != "auto" and not (isinstance(cells, list) and len(cells) == 2 and cells[0] != cells[1]):
        raise SweepError(f"{where}: patch_cells must be \"auto\" or two different cells, e.g. [8, 0]")
    for key in ("causal_items", "batch_size"):
        v = cfg.get(key, 1)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise SweepError(f"{where}: {key} must be a positive integer, got {v!r}")
    causal_items = cfg.get("causal_items", 20)
    base = path.parent
    out = Path(out)

    models = {}
    for name, spec in cfg["models"].items():
        only = None
        if isinstance(spec, dict) and isinstance(spec.get("path"), str):
            only = spec.get("probes")
            if only is not None and (not isinstance(only, list) or set(only) - set(cfg["probes"])):
                raise SweepError(f"{where}: models.{name}.probes must list names from [probes], got {only!r}")
            spec = spec["path"]
        if not isinstance(spec, str):
            raise SweepError(f"{where}: models.{name} must be a string ('organism', a folder or a cached hub id) "
                             "or a table { path = \"...\", probes = [\"...\"] }")
        local = base / spec
        models[name] = (spec, str(local.resolve()) if spec != "organism" and local.exists() else spec, only)
    probes, builds = {}, {}
    for name, spec in cfg["probes"].items():
        if isinstance(spec, dict):
            if "build" not in spec:
                raise SweepError(f"{where}: probes.{name} needs build = \"shapes\" (or a source) or a folder path")
            probes[name] = (json.dumps(spec, sort_keys=True), str((out / "probes" / name).resolve()))
            builds[name] = dict(spec)
        elif isinstance(spec, str):
            folder = (base / spec).resolve()
            try:
                find_probe(folder)
            except ProbeError as e:
                raise SweepError(f"{where}: probes.{name} = {spec!r}: {e}; or use build = \"shapes\"") from None
            probes[name] = (spec, str(folder))
        else:
            raise SweepError(f"{where}: probes.{name} must be a folder path or a table with build = ...")

    settings = {"batch_size": cfg.get("batch_size", 64), "device": cfg.get("device") or "cpu",
                "dtype": cfg.get("dtype") or "float32"}
    if settings["dtype"] not in DTYPES:
        raise SweepError(f"{where}: dtype = {settings['dtype']!r}: use one of {', '.join(DTYPES)}")
    if not isinstance(settings["device"], str):
        raise SweepError(f"{where}: device = {settings['device']!r}: use a torch device string, e.g. \"cuda\"")
    conditions = []
    for mname, (mspec, mpath, only) in models.items():
        for pname, (pspec, ppath) in probes.items():
            if only is not None and pname not in only:
                continue
            for analysis in analyses:
                opts = dict(settings) if analysis == "eval" else {"causal_items": causal_items, **settings}
                if analysis == "patching":
                    opts["patch_cells"] = cells
                for seed in seeds:
                    for label, family, lam, ivs in intervention_grid(cfg.get("interventions", {}), seed, where):
                        conditions.append(Condition(mname, mspec, pname, pspec, label, family, lam, ivs, analysis,
                                                    seed, opts, mpath, ppath))
    ids = [c.id for c in conditions]
    if len(set(ids)) != len(ids):
        raise SweepError(f"{where}: the sweep lists the same condition twice; remove the repeated values")
    return Sweep(path, conditions, builds, settings)


def check_models(sweep: Sweep) -> None:
    """Every model of the sweep has a readable config naming a supported class (no weights are
    loaded): a typo fails here, before anything runs, not hours later."""
    from transformers import AutoConfig

    from interp import adapters
    from interp.load import ALIASES
    for c in {c.model: c for c in sweep.conditions}.values():
        try:
            cfg = AutoConfig.from_pretrained(ALIASES.get(c.model_path, c.model_path), local_files_only=True)
            adapters.for_class((cfg.architectures or ["(none)"])[0])
        except (OSError, ValueError, SpatialBiasError) as e:
            msg = str(e).splitlines()[0][:200]
            raise SweepError(f"{sweep.path}: models.{c.model} = {c.model_spec!r} cannot be used ({msg}); give "
                             "'organism', a checkpoint folder (relative to the sweep file) or a cached hub id") from None


def check_fingerprints(sweep: Sweep, out: Path, done: set[str]) -> dict[str, str]:
    """Fingerprint every model of the plan (:func:`interp.load.fingerprint`: config + weights)
    and compare with ``OUT/models.json``: a model whose weights changed since its finished
    conditions were computed is refused (one line), instead of silently mixing their results
    with new ones. Writes ``OUT/models.json``; returns {model name: fingerprint}."""
    from interp.load import fingerprint
    path = out / "models.json"
    try:
        known = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        known = {}
    prints = {}
    for c in {c.model: c for c in sweep.conditions}.values():
        fp = fingerprint(c.model_path)
        was = known.get(c.model)
        has_parts = any(x.model == c.model and x.id in done for x in sweep.conditions)
        if was is not None and was != fp and has_parts:
            raise SweepError(f"{out}: the finished conditions of model {c.model!r} were computed with other weights "
                             f"(fingerprint {was}, now {fp}); run into a new --out, or delete {out / 'parts'} to "
                             "recompute")
        prints[c.model] = fp
    atomic_write_text(path, json.dumps({**known, **prints}, indent=1, sort_keys=True) + "\n")
    return prints


def build_probes(sweep: Sweep, out: Path, progress: bool = True) -> None:
    """Build the probes the sweep asks for (deterministic; an existing identical build is kept)."""
    from probes.build import caption_probe, shapes_probe
    from probes.format import read_meta
    for name, spec in sweep.probes.items():
        folder = out / "probes" / name
        stamp = folder / "sweep_spec.json"
        want = json.dumps(spec, sort_keys=True)
        if stamp.is_file() and stamp.read_text() == want and is_built(folder):
            continue
        args = {{"n": "n_items", "canvas": "size"}.get(k, k): v for k, v in spec.items() if k != "build"}
        args.setdefault("n_items", 40)
        try:
            if spec["build"] == "shapes":
                shapes_probe(folder, progress=progress, **{"cell_px": 16, **args})
            else:
                src = Path(spec["build"])
                src = src if src.is_absolute() or not (sweep.path.parent / src).exists() else sweep.path.parent / src
                caption_probe(str(src), folder, progress=progress, **args)
        except TypeError as e:
            raise SweepError(f"{sweep.path}: probes.{name}: {e}; see 'spatialbias probe build --help' for the "
                             "options") from None
        read_meta(folder)
        atomic_write_text(stamp, want)


# ------------------------------------------------------------------------------------------
# Running one condition


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


def run_condition(lvlm, cond: Condition, batch_size: int = 64, progress: bool = False,
                  cells: dict | None = None) -> pd.DataFrame:
    """Run one condition on a loaded model; returns its rows of ``results.parquet`` (:data:`COLUMNS`).
    ``cells``: what conditions of one model share, the clean/corrupt cells that ``patch_cells =
    "auto"`` chose per (probe, items)."""
    from analyses import causal
    from analyses.evaluate import score_probe
    from analyses.metrics import cell_metrics
    cells = {} if cells is None else cells
    ivs = cond.build()
    conds = {cond.intervention: ivs}
    rows: list[dict] = []

    def add(metric, value, **idx):
        rows.append({"metric": metric, "value": float(value), **idx})

    if cond.analysis == "eval":
        df = score_probe(lvlm, cond.probe_path, conds, batch_size=batch_size, progress=progress)
        m = cell_metrics(df, seed=cond.seed)
        for k in ("mean_accuracy", "mean_p_correct", "range", "std", "cv", "chi2", "chi2_p", "consistency"):
            add(k, m[k])
        add("n_rows", len(df))
        add("grid_rows", m["grid"][0])
        add("grid_cols", m["grid"][1])
        if cond.family == "agci-adaptive":  # what the rule chose: λ per image, over the probe
            lams = _adaptive_lambdas(lvlm, cond, ivs[0], batch_size)
            for k, v in (("lambda_mean", np.mean(lams)), ("lambda_min", np.min(lams)), ("lambda_max", np.max(lams))):
                add(k, v)
        for name, key in (("accuracy", "cell_accuracy"), ("p_correct", "cell_p_correct"), ("ci_low", "cell_ci_low"),
                          ("ci_high", "cell_ci_high"), ("n", "cell_n")):
            for c, v in enumerate(m[key]):
                add(name, v, cell=c)
    elif cond.analysis == "patching":
        n = cond.options["causal_items"]
        clean, corrupt = _patch_cells(lvlm, cond, cells, batch_size)
        pairs = causal.placement_pairs(lvlm, cond.probe_path, clean, corrupt, n_items=n)
        ap = causal.activation_patching(lvlm, pairs, conds, batch_size=batch_size, progress=progress)
        for r in ap.itertuples():
            add(f"restoration_{r.direction}", r.restoration, site=r.site, group=r.group)
        pp = causal.position_patching(lvlm, pairs, conds)
        for r in pp.itertuples():
            add("position_restoration", r.restoration, layer=None if r.layers == "all" else int(r.layers))
        den = ap[ap.direction == "denoise"]
        add("logit_diff_clean", den.clean.iloc[0])
        add("logit_diff_corrupt", den.corrupt.iloc[0])
        add("clean_cell", clean)
        add("corrupt_cell", corrupt)
        add("n_items", len(pairs.ids))
    elif cond.analysis == "flow":
        fl = causal.flow_by_placement(lvlm, cond.probe_path, conds, n_items=cond.options["causal_items"])
        own = fl[fl.cell == fl.target_cell]
        for r in own.itertuples():
            add("attention_to_target", r.mass, layer=int(r.layer), cell=int(r.target_cell))
    else:
        raise SweepError(f"unknown analysis {cond.analysis!r}; use {', '.join(ANALYSES)}")
    from interp.load import fingerprint
    return _frame(cond, rows, fingerprint(lvlm.source or lvlm.model))


def _adaptive_lambdas(lvlm, cond: Condition, iv, batch_size: int) -> list[float]:
    """λ per image that an :class:`interp.AdaptiveAGCI` picks over the whole probe."""
    from analyses.evaluate import probe_batches, validate_probe
    folder = Path(cond.probe_path)
    return [lam for _, _, _, inputs in probe_batches(lvlm, folder, validate_probe(folder), batch_size)
            for lam in iv.lambdas(lvlm, inputs)]


def _patch_cells(lvlm, cond: Condition, chosen: dict, batch_size: int) -> tuple[int, int]:
    """``patch_cells``, or for "auto" the best and worst cell by baseline p(correct) on the items
    the patching uses (the same for every intervention, so conditions compare the same pairs)."""
    cells = cond.options["patch_cells"]
    if cells != "auto":
        return int(cells[0]), int(cells[1])
    key = (cond.probe_path, cond.options["causal_items"])
    if key not in chosen:
        from analyses.evaluate import score_probe, validate_probe
        rows = validate_probe(cond.probe_path)
        ids = list(dict.fromkeys(r.id for r in rows))[:cond.options["causal_items"]]
        keep = set(ids)
        df = score_probe(lvlm, cond.probe_path, {"baseline": []}, batch_size=batch_size, progress=False,
                         rows=[r for r in rows if r.id in keep])
        pc = df.groupby("cell")["p_correct"].mean()
        best, worst = int(pc.idxmax()), int(pc.idxmin())
        chosen[key] = (best, worst) if best != worst else (best, int(pc.index[pc.index != best][0]))
    return chosen[key]


def _frame(cond: Condition, rows: list[dict], fingerprint: str) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    for col in ("cell", "layer"):
        df[col] = pd.array(df[col] if col in df else [None] * len(df), dtype="Int64")
    for col in ("site", "group"):
        df[col] = pd.array(df[col] if col in df else [None] * len(df), dtype="string")
    df = df.assign(condition_id=cond.id, model=cond.model, probe=cond.probe, intervention=cond.intervention,
                   family=cond.family, seed=int(cond.seed), analysis=cond.analysis,
                   config=json.dumps(cond.to_dict(), sort_keys=True), versions=json.dumps(versions(), sort_keys=True))
    df["lambda"] = np.nan if cond.lam is None else float(cond.lam)
    df["model_fingerprint"] = pd.array([fingerprint] * len(df), dtype="string")
    df["value"] = df["value"].astype("float64")
    df["seed"] = df["seed"].astype("int64")
    return df[COLUMNS]


# ------------------------------------------------------------------------------------------
# Results on disk


class Store:
    """``OUT/parts/{id}.parquet`` per finished condition (atomic), ``OUT/results.parquet`` rebuilt
    from the parts of the plan, ``OUT/timings.jsonl`` (seconds per condition, for ``--dry-run``)."""

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.parts = self.out / "parts"
        self._read: dict[str, pd.DataFrame] = {}  # parts already read back: each is read once

    def done(self) -> set[str]:
        return {p.stem for p in self.parts.glob("*.parquet")} if self.parts.is_dir() else set()

    def write(self, cond: Condition, df: pd.DataFrame, seconds: float) -> None:
        buf = io.BytesIO()
        df.to_parquet(buf, index=False)
        atomic_write_bytes(self.parts / f"{cond.id}.parquet", buf.getvalue())
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
        df = pd.concat(frames, ignore_index=True) if frames else _frame_empty()
        buf = io.BytesIO()
        df.to_parquet(buf, index=False)
        atomic_write_bytes(self.out / "results.parquet", buf.getvalue())
        return df


def _frame_empty() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="object") for c in COLUMNS})


def write_plan(sweep: Sweep, out: Path) -> None:
    """``OUT/sweep.toml`` (the file as run) and ``OUT/conditions.jsonl`` (one condition per line)."""
    atomic_write_text(out / "sweep.toml", sweep.path.read_text(encoding="utf-8"))
    atomic_write_text(out / "conditions.jsonl",
                      "".join(json.dumps(c.to_dict(), sort_keys=True) + "\n" for c in sweep.conditions))


# ------------------------------------------------------------------------------------------
# Cost estimate


def forward_rows(cond: Condition, n_probe_rows: int, n_items: int, lm_layers: int | None) -> int:
    """Rows pushed through the model by one condition (a cost unit independent of the machine)."""
    if cond.analysis == "eval":
        return n_probe_rows
    n = min(cond.options["causal_items"], n_items)
    cells = max(1, round(n_probe_rows / max(n_items, 1)))  # placements per item
    if cond.analysis == "flow":
        return cells * n
    layers = lm_layers or 1
    patches = 4 * layers + 2                      # default patches: LM blocks × 4 groups + vision/projector
    return n * (2 * (patches + 2) + 2 * (layers + 1) + 2) + (cells * n if cond.options["patch_cells"] == "auto" else 0)


def estimate(sweep: Sweep, out: Path) -> pd.DataFrame:
    """One row per condition: status (done/pending), forward rows and, where earlier runs in ``out``
    timed the same model and analysis, an estimate of seconds (their seconds per row × rows)."""
    from probes.format import read_rows
    store = Store(out)
    done = store.done()
    probe_rows: dict[str, tuple[int, int]] = {}
    rows = []
    for c in sweep.conditions:
        if c.probe_path not in probe_rows:
            try:
                rs = read_rows(c.probe_path)
                probe_rows[c.probe_path] = (len(rs), len({r.id for r in rs}))
            except SpatialBiasError:  # not built yet: use the build spec
                spec = sweep.probes.get(c.probe, {})
                n = int(spec.get("n", 40))
                probe_rows[c.probe_path] = (9 * n * (2 if spec.get("negatives") else 1), n)
        nr, ni = probe_rows[c.probe_path]
        rows.append({"condition_id": c.id, "model": c.model, "probe": c.probe, "intervention": c.intervention,
                     "analysis": c.analysis, "seed": c.seed, "status": "done" if c.id in done else "pending",
                     "forward_rows": forward_rows(c, nr, ni, _lm_layers(c.model_path))})
    df = pd.DataFrame(rows)
    t = store.timings().merge(df[["condition_id", "forward_rows"]], on="condition_id")
    rate = (t.seconds / t.forward_rows).groupby([t.model, t.analysis]).median() if len(t) else pd.Series(dtype=float)
    df["est_seconds"] = [float(rate.get((m, a), np.nan)) * r for m, a, r in zip(df.model, df.analysis, df.forward_rows)]
    return df


@functools.cache
def _lm_layers(model_path: str) -> int | None:
    from interp.load import ALIASES
    p = Path(ALIASES.get(model_path, model_path)) / "config.json"
    if not p.is_file():
        return None
    cfg = json.loads(p.read_text())
    text = cfg.get("text_config", cfg)
    return text.get("num_hidden_layers")


# ------------------------------------------------------------------------------------------
# Executors


def _groups(conditions: Iterable[Condition]) -> dict[str, list[Condition]]:
    out: dict[str, list[Condition]] = {}
    for c in conditions:
        out.setdefault(c.model, []).append(c)
    return out


def run_group(conditions: list[Condition], settings: dict) -> Iterator[tuple[Condition, pd.DataFrame | str, float]]:
    """Load the group's model once and run its conditions; yields (condition, rows or an error line,
    seconds). A condition that fails with the toolkit's own error is reported, not fatal."""
    import torch

    import interp
    dtype = getattr(torch, settings["dtype"]) if settings.get("dtype") else None
    try:
        lvlm = interp.load(conditions[0].model_path, device=settings.get("device"), dtype=dtype)
    except SpatialBiasError as e:
        for c in conditions:
            yield c, str(e), 0.0
        return
    cells: dict = {}
    for c in conditions:
        t0 = time.perf_counter()
        try:
            df = run_condition(lvlm, c, batch_size=settings.get("batch_size", 64), cells=cells)
        except SpatialBiasError as e:
            yield c, str(e), time.perf_counter() - t0
            continue
        yield c, df, time.perf_counter() - t0


def _local(groups: dict[str, list[Condition]], settings: dict, **_) -> Iterator:
    for conds in groups.values():
        yield from run_group(conds, settings)


def _ray(groups: dict[str, list[Condition]], settings: dict, address: str | None = None,
         num_cpus: int | None = None) -> Iterator:
    """One Ray task per model group (each worker loads its model once), streaming one result per
    condition back to this process, which writes the parts: a crash loses only conditions in flight."""
    import ray
    started = False
    if not ray.is_initialized():
        kw = {"address": address} if address else {  # "local": a new instance, never an existing cluster
            "address": "local", "num_cpus": num_cpus or os.cpu_count(), "include_dashboard": False}
        ray.init(log_to_driver=False, runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}},
                 **kw)
        started = True
    gpus = 1 if str(settings.get("device") or "").startswith("cuda") else 0

    @ray.remote(num_gpus=gpus)
    def task(conds, settings):
        for c, res, sec in run_group(conds, settings):
            yield c, res, sec

    try:
        left = {task.remote(conds, settings): list(conds) for conds in groups.values()}
        while left:
            ready, _ = ray.wait(list(left), num_returns=1)
            for gen in ready:
                try:
                    c, res, sec = ray.get(next(gen))
                except StopIteration:
                    del left[gen]
                    continue
                except Exception as e:  # the worker died: report the rest of its group, go on
                    msg = str(e).strip().splitlines()[-1][:300] if str(e).strip() else type(e).__name__
                    for c in left.pop(gen):
                        yield c, f"Ray task failed: {msg}", 0.0
                    continue
                left[gen] = [x for x in left[gen] if x.id != c.id]
                yield c, res, sec
    finally:
        if started:
            ray.shutdown()


EXECUTORS = {"local": _local, "ray": _ray}


def run_sweep(path: str | os.PathLike, out: str | os.PathLike, executor: str = "local", address: str | None = None,
              only: Iterable[str] = (), progress: bool = True, num_cpus: int | None = None) -> dict:
    """Run (or resume) a sweep. Returns {"done", "ran", "failed": [(id, error)], "results": path}.

    ``only``: condition ids to run (again) alone, finished or not.
    """
    if executor not in EXECUTORS:
        raise SweepError(f"--executor {executor!r}: use {' or '.join(EXECUTORS)}")
    out = Path(out)
    sweep = load_sweep(path, out)
    only = set(only)
    unknown = only - {c.id for c in sweep.conditions}
    if unknown:
        raise SweepError(f"--only {', '.join(sorted(unknown))}: not a condition of {path}; see --dry-run for the ids")
    check_models(sweep)
    out.mkdir(parents=True, exist_ok=True)
    store = Store(out)
    done = store.done()
    check_fingerprints(sweep, out, done)
    write_plan(sweep, out)
    build_probes(sweep, out, progress=progress)
    todo = [c for c in sweep.conditions if (c.id in only if only else c.id not in done)]
    failed = []
    bar = tqdm(total=len(todo), desc="sweep", unit="condition", disable=not progress)
    for cond, res, sec in EXECUTORS[executor](_groups(todo), sweep.settings, address=address, num_cpus=num_cpus):
        if isinstance(res, str):
            failed.append((cond.id, f"{cond.model} / {cond.probe} / {cond.intervention} / {cond.analysis}: {res}"))
        else:
            store.write(cond, res, sec)
            store.collect(sweep.conditions)
        bar.set_postfix_str(f"{cond.model} {cond.intervention} {cond.analysis}", refresh=False)
        bar.update(1)
    bar.close()
    store.collect(sweep.conditions)
    atomic_write_text(out / "failed.jsonl", "".join(json.dumps({"condition_id": i, "error": e}) + "\n"
                                                    for i, e in failed))
    return {"done": len(store.done() & {c.id for c in sweep.conditions}), "ran": len(todo) - len(failed),
            "total": len(sweep.conditions), "failed": failed, "results": str(out / "results.parquet")}
