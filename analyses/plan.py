"""A run is a plan of conditions: models × probes × interventions × analyses × seeds.

Role: parse a sweep file (or build the same mapping for the demo, ``eval`` and ``causal``
commands) into :class:`Condition` configs, each serialisable and with an id that covers every
setting that changes a number. May import: ``spatialbias``, ``probes.format``,
``analyses.{vocabulary, registry}`` (which analyses exist, their options). Nothing here loads
a model or runs one.

The mapping (a TOML sweep file, see ``docs/sweeps.md``)::

    seeds = [0]
    analyses = ["eval", "patching", "knockout", "flow", "attribution"]
    causal_items = 20            # default items of the causal analyses
    patch_cells = "auto"         # or [clean, corrupt]; auto = the baseline's best and worst cell
    batch_size = 64              # dtype = "float32" | "bfloat16" | "float16"; device = "cpu" | "cuda"
    [models]   organism = "organism"      # or { path = "ckpt", probes = ["mine"] }
    [probes]   shapes = { build = "shapes", n = 40, seed = 0 }   # or a folder / rows file
    [interventions]  baseline = true; bapa = ["reference"]; agci = [0.5]; conditions = ["agci-pooled:0.5"]
    [analysis.flow]  items = 50; interventions = ["baseline", "bapa"]   # per-analysis options
"""
from __future__ import annotations

import hashlib
import json
import os
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import analyses.kinds  # noqa: F401  (registers the analyses, whose options the plan reads)
from analyses import registry, vocabulary
from probes.format import ProbeError, find_probe
from spatialbias.errors import SpatialBiasError

DTYPES = ("float32", "bfloat16", "float16")
TOP_KEYS = {"seeds", "analyses", "batch_size", "causal_items", "patch_cells", "device", "models", "probes",
            "interventions", "dtype", "analysis", "trust_remote_code", "device_map", "max_memory", "offload_folder",
            "gpus_per_model"}
PLACEMENT_KEYS = ("device_map", "max_memory", "offload_folder", "gpus_per_model")
"""Run settings that place the model and bound memory but change no number (dispatched runs equal
undispatched ones, tests/test_dispatch.py; chunking changes rows per forward only,
tests/test_memory.py): in ``Plan.settings``, not in the condition options or ids."""
DEMO = Path(__file__).parent / "sweeps" / "demo.toml"


class PlanError(SpatialBiasError):
    """A sweep file or plan is unusable; the message names the file and key."""


@dataclass(frozen=True)
class Condition:
    """One cell of the plan. ``intervention``: its label (:mod:`analyses.vocabulary`);
    ``interventions``: the serialised configs; ``options``: every setting that changes a number
    — the analysis' own (items, cells, …) and how it runs (dtype, device, batch size) — all part of
    the id; ``model_path``/``probe_path``: resolved locations (not in the id, so a moved output
    folder still resumes). The weights are checked by fingerprint when a run resumes."""
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


@dataclass
class Plan:
    """``conditions`` in run order (grouped by model); ``probes``: name → build spec of the probes
    the run builds (into ``OUT/probes/NAME``); ``settings``: dtype, device, batch size;
    ``config``: the mapping as given (written to ``OUT/plan.json``); ``where``: what it came from."""
    conditions: list[Condition]
    probes: dict[str, dict]
    settings: dict[str, Any]
    config: dict[str, Any]
    where: str
    base: Path


def load(path: str | os.PathLike, out: str | os.PathLike) -> Plan:
    """Parse and validate a sweep TOML file; relative paths are relative to the file."""
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"{path}: sweep file not found; pass a TOML file (see docs/sweeps.md)")
    try:
        cfg = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise PlanError(f"{path}: not valid TOML ({e}); fix the file (see docs/sweeps.md)") from None
    return from_mapping(cfg, path.parent, out, str(path))


def from_mapping(cfg: dict[str, Any], base: Path, out: str | os.PathLike, where: str) -> Plan:
    """The plan of a sweep mapping (the parsed TOML). ``base``: what relative paths are relative
    to; ``where``: the name errors give (a file path)."""
    unknown = sorted(set(cfg) - TOP_KEYS)
    if unknown:
        raise PlanError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(TOP_KEYS))}")
    for key in ("models", "probes"):
        if not isinstance(cfg.get(key), dict) or not cfg[key]:
            raise PlanError(f"{where}: needs a [{key}] table with at least one entry (name = \"path\")")
    seeds = cfg.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise PlanError(f"{where}: seeds must be a non-empty list of integers, got {seeds!r}")
    for key in ("causal_items", "batch_size"):
        v = cfg.get(key, 1)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise PlanError(f"{where}: {key} must be a positive integer, got {v!r}")
    settings = {"batch_size": cfg.get("batch_size", 64), "device": cfg.get("device") or "cpu",
                "dtype": cfg.get("dtype") or "float32"}
    if settings["dtype"] not in DTYPES:
        raise PlanError(f"{where}: dtype = {settings['dtype']!r}: use one of {', '.join(DTYPES)}")
    if not isinstance(settings["device"], str):
        raise PlanError(f"{where}: device = {settings['device']!r}: use a torch device string, e.g. \"cuda\"")
    if cfg.get("trust_remote_code"):  # lets checkpoints run their own code; recorded, off by default
        settings["trust_remote_code"] = True
    placement = _placement(cfg, where)
    analyses = _analyses(cfg, where)
    base, out = Path(base), Path(out)
    models = _models(cfg, base, where)
    probes, builds = _probes(cfg, base, out, where)
    conditions = []
    for mname, (mspec, mpath, only) in models.items():
        for pname, (pspec, ppath) in probes.items():
            if only is not None and pname not in only:
                continue
            for analysis, (opts, keep) in analyses.items():
                for seed in seeds:
                    for spec in vocabulary.from_table(cfg.get("interventions", {}), seed, where):
                        if keep is not None and spec.label not in keep:
                            continue
                        conditions.append(Condition(mname, mspec, pname, pspec, spec.label, spec.family, spec.lam,
                                                    spec.dicts(), analysis, seed, {**opts, **settings}, mpath, ppath))
    for analysis, (_, keep) in analyses.items():
        labels = {c.intervention for c in conditions if c.analysis == analysis}
        missing = sorted(set(keep or ()) - labels) if conditions else []
        if missing:
            raise PlanError(f"{where}: [analysis.{analysis}] interventions {missing} are not among the conditions of "
                            "[interventions]; use their labels, e.g. \"agci:0.5\"")
    ids = [c.id for c in conditions]
    if len(set(ids)) != len(ids):
        raise PlanError(f"{where}: the plan lists the same condition twice; remove the repeated values")
    if not conditions:
        raise PlanError(f"{where}: the plan has no conditions (check [models] probes = [...] and [analysis.*] "
                        "interventions)")
    return Plan(conditions, builds, {**settings, **placement}, cfg, where, base)


def _placement(cfg: dict, where: str) -> dict[str, Any]:
    """The placement settings (:data:`PLACEMENT_KEYS`), validated: ``device_map`` a strategy or a
    table {module path = device}; ``max_memory`` a size ("40GiB") or a table {0 = "20GiB", cpu =
    "60GiB"}; ``offload_folder`` a path; ``gpus_per_model`` a positive integer (Ray)."""
    from spatialbias.sizes import MAP_STRATEGIES
    out: dict[str, Any] = {}
    dm = cfg.get("device_map")
    if dm is not None:
        if not (dm in MAP_STRATEGIES or isinstance(dm, dict)):
            raise PlanError(f"{where}: device_map = {dm!r}: use {', '.join(MAP_STRATEGIES)} or a table "
                            "{{\"module.path\" = \"cpu\" | \"disk\" | 0}}")
        out["device_map"] = dm
    mm = cfg.get("max_memory")
    if mm is not None:
        out["max_memory"] = memory_limits(mm, where)
    if cfg.get("offload_folder") is not None:
        if not isinstance(cfg["offload_folder"], str):
            raise PlanError(f"{where}: offload_folder must be a folder path")
        if dm is None:
            raise PlanError(f"{where}: offload_folder holds weights device_map puts on disk; add device_map = \"auto\"")
        out["offload_folder"] = cfg["offload_folder"]
    g = cfg.get("gpus_per_model")
    if g is not None:
        if not isinstance(g, int) or isinstance(g, bool) or g < 1:
            raise PlanError(f"{where}: gpus_per_model must be a positive integer, got {g!r}")
        out["gpus_per_model"] = g
    return out


def memory_limits(value: Any, where: str = "--max-memory") -> dict:
    """{device: bytes} of a ``max_memory`` setting: a size for every device ("40GiB" →
    {"all": …}), ``"0=20GiB,cpu=60GiB"``, or a table {0 = "20GiB", cpu = "60GiB"}."""
    from spatialbias.sizes import parse_max_memory, parse_size
    try:
        if isinstance(value, dict):
            return {int(k) if str(k).isdigit() else str(k): parse_size(v, f"max_memory.{k}") for k, v in value.items()}
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return {"all": int(value)}
        return parse_max_memory(str(value))
    except SpatialBiasError as e:
        raise PlanError(f"{where}: {e}") from None


def _analyses(cfg: dict, where: str) -> dict[str, tuple[dict, list[str] | None]]:
    """analysis → (its options, the intervention labels it runs on or None for all)."""
    names = cfg.get("analyses", ["eval"])
    names = names if isinstance(names, list) else [names]
    tables = cfg.get("analysis", {})
    if not isinstance(tables, dict):
        raise PlanError(f"{where}: [analysis] must hold tables, e.g. [analysis.flow] items = 50")
    names = list(dict.fromkeys([*names, *tables]))
    known = registry.analyses()
    bad = [a for a in names if a not in known]
    if bad:
        raise PlanError(f"{where}: unknown analysis {bad[0]!r}; use {', '.join(known)}")
    cells = cfg.get("patch_cells", "auto")
    items = cfg.get("causal_items", 20)
    out = {}
    for a in names:
        spec = known[a]
        t = dict(tables.get(a, {}))
        keep = t.pop("interventions", ["baseline"] if spec.baseline_only else None)
        unknown = sorted(set(t) - set(spec.options))
        if unknown:
            raise PlanError(f"{where}: [analysis.{a}] unknown option(s) {', '.join(unknown)}; known: "
                            f"{', '.join(spec.options) or 'none'}, interventions")
        opts = {**spec.options, **t}
        if "items" in opts:
            opts["items"] = items if opts["items"] is None else opts["items"]
            if not isinstance(opts["items"], int) or isinstance(opts["items"], bool) or opts["items"] < 1:
                raise PlanError(f"{where}: [analysis.{a}] items must be a positive integer, got {opts['items']!r}")
        if spec.check is not None:
            try:
                opts = spec.check(opts, where)
            except SpatialBiasError as e:
                raise PlanError(str(e)) from None
        if "cells" in opts:
            opts["cells"] = cells if opts["cells"] is None else opts["cells"]
            c = opts["cells"]
            if c != "auto" and not (isinstance(c, list) and len(c) == 2 and c[0] != c[1]
                                    and all(isinstance(x, int) and x >= 0 for x in c)):
                raise PlanError(f"{where}: [analysis.{a}] cells (patch_cells) must be \"auto\" or two different "
                                f"cells, e.g. [8, 0], got {c!r}")
        if keep is not None and (not isinstance(keep, list) or not all(isinstance(x, str) for x in keep)):
            raise PlanError(f"{where}: [analysis.{a}] interventions must be a list of labels, e.g. [\"baseline\"]")
        out[a] = (opts, keep)
    return out


def _models(cfg: dict, base: Path, where: str) -> dict[str, tuple[str, str, list | None]]:
    models = {}
    for name, spec in cfg["models"].items():
        only = None
        if isinstance(spec, dict) and isinstance(spec.get("path"), str):
            only = spec.get("probes")
            if only is not None and (not isinstance(only, list) or set(only) - set(cfg["probes"])):
                raise PlanError(f"{where}: models.{name}.probes must list names from [probes], got {only!r}")
            spec = spec["path"]
        if not isinstance(spec, str):
            raise PlanError(f"{where}: models.{name} must be a string ('organism', a folder or a cached hub id) "
                            "or a table { path = \"...\", probes = [\"...\"] }")
        local = base / spec
        models[name] = (spec, str(local.resolve()) if spec != "organism" and local.exists() else spec, only)
    return models


def _probes(cfg: dict, base: Path, out: Path, where: str):
    probes, builds = {}, {}
    for name, spec in cfg["probes"].items():
        if isinstance(spec, dict):
            if "build" not in spec:
                raise PlanError(f"{where}: probes.{name} needs build = \"shapes\" (or a source) or a folder path")
            probes[name] = (json.dumps(spec, sort_keys=True), str((out / "probes" / name).resolve()))
            builds[name] = dict(spec)
        elif isinstance(spec, str):
            try:
                probe = find_probe(base / spec)
            except ProbeError as e:
                raise PlanError(f"{where}: probes.{name} = {spec!r}: {e}; or use build = \"shapes\"") from None
            probes[name] = (spec, str(probe.rows_file.resolve()))
        else:
            raise PlanError(f"{where}: probes.{name} must be a folder path or a table with build = ...")
    return probes, builds


# ------------------------------------------------------------------------------------------------
# The plans the commands build


def demo(model: str = "organism", probe: str | os.PathLike | None = None, n_items: int | None = None,
         lambdas=None, seed: int | None = None, causal: bool = True, causal_items: int | None = None,
         settings: dict | None = None, canvas: int | None = None) -> dict[str, Any]:
    """The demo (``spatialbias report --model M``): ``analyses/sweeps/demo.toml`` with the given
    overrides, as a mapping for :func:`from_mapping`. ``canvas``: the built probe's side in
    pixels (:func:`interp.load.probe_canvas`, what the model's processor takes as drawn; 48 for
    the organism), drawn as a 3×3 grid of ``canvas // 3`` px cells."""
    cfg = tomllib.loads(DEMO.read_text(encoding="utf-8"))
    if model != "organism":
        cfg["models"] = {Path(str(model)).name or str(model): str(model)}
    if probe is not None:
        cfg["probes"] = {find_probe(probe).folder.name: str(Path(probe).resolve())}
    else:
        spec = dict(next(iter(cfg["probes"].values())))
        if n_items is not None:
            spec["n"] = n_items
        if seed is not None:
            spec["seed"] = seed
        if canvas is not None:
            spec["cell_px"] = int(canvas) // 3
        cfg["probes"] = {"shapes": spec}
    if lambdas is not None:  # the causal analyses take λ = 0.5 when it is among them, else the first
        lams = [float(x) for x in lambdas]
        cfg["interventions"]["agci"] = lams
        causal_agci = [f"agci:{0.5 if 0.5 in lams else lams[0]:g}"] if lams else []
        for t in cfg["analysis"].values():
            if "interventions" in t:
                t["interventions"] = [x for x in t["interventions"] if not x.startswith("agci:")] + (
                    causal_agci if any(x.startswith("agci:") for x in t["interventions"]) else [])
    if seed is not None:
        cfg["seeds"] = [seed]
    if causal_items is not None:
        for name, t in cfg["analysis"].items():
            if "items" in t:
                t["items"] = min(causal_items, t["items"]) if name == "flow" else causal_items
    if not causal:
        cfg["analyses"] = ["eval"]
        cfg["analysis"] = {k: v for k, v in cfg["analysis"].items() if k == "eval"}
    cfg.update({k: v for k, v in (settings or {}).items() if v is not None})
    return cfg


def command(model: str, probe: str | os.PathLike, conditions: list[str], analyses: dict[str, dict],
            seed: int = 0, settings: dict | None = None) -> dict[str, Any]:
    """The mapping of a one-model, one-probe run (``spatialbias eval`` and ``causal``):
    ``conditions`` are specs (:mod:`analyses.vocabulary`), ``analyses`` name → options."""
    cfg: dict[str, Any] = {"seeds": [seed], "models": {Path(str(model)).name or str(model): str(model)},
                           "probes": {find_probe(probe).folder.name: str(Path(probe).resolve())},
                           "interventions": {"baseline": False, "conditions": list(conditions)},
                           "analyses": list(analyses), "analysis": {k: v for k, v in analyses.items() if v}}
    cfg.update({k: v for k, v in (settings or {}).items() if v is not None})
    return cfg
