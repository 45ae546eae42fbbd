"""The one runner: a plan's conditions, grouped by model (each model loaded once), on a local
process or Ray tasks, each finished condition written to the store before the next starts.

Role: executors and the run loop. May import: ``spatialbias``, ``interp`` (loading),
``probes.build``, ``analyses.{plan, store, tasks}``. Killing the process at any moment loses at
most the conditions in flight; running the same plan into the same folder again computes only
what is missing, and refuses a folder whose finished conditions came from other weights.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Iterable, Iterator

import pandas as pd
from tqdm.auto import tqdm

from analyses.plan import Condition, Plan, PlanError
from analyses.store import Store, frame
from spatialbias.errors import SpatialBiasError
from spatialbias.files import atomic_write_text


def choose_threads(requested: int | None = None) -> int:
    """Torch threads for this process: ``requested`` (or ``$SPATIALBIAS_THREADS``) when given, else
    the cores not busy right now — CPU count minus the 1-minute load average, at least 1 — so a
    run on a shared machine does not oversubscribe it (torch's default, one thread per core,
    collapses under load: 3–4× slower on a busy 2-core machine). Sets it and returns it."""
    import torch
    n = requested or int(os.environ.get("SPATIALBIAS_THREADS", "0") or 0)
    if not n:
        cores = os.cpu_count() or 1
        try:
            busy = os.getloadavg()[0]
        except OSError:  # no load average on this platform
            busy = 0.0
        n = max(1, min(cores, int(cores - busy + 0.5)))
    torch.set_num_threads(n)
    return n


def check_models(plan: Plan) -> None:
    """Every model of the plan has a readable config naming a supported class (no weights are
    loaded): a typo fails here, before anything runs, not hours later."""
    from interp.load import read_config
    for c in {c.model: c for c in plan.conditions}.values():
        try:
            read_config(c.model_path, bool(plan.settings.get("trust_remote_code")))
        except SpatialBiasError as e:
            raise PlanError(f"{plan.where}: models.{c.model} = {c.model_spec!r}: {e}") from None


def check_probes(plan: Plan) -> None:
    """Every existing probe of the plan is read whole and every image decoded before anything
    runs or is written: a bad row is one error line (file:line and reason), not a failure hours
    in. A probe whose eval conditions all skip bad rows (``eval --skip-bad``) is let through."""
    from analyses.evaluate import check_probe
    seen = set()
    for c in plan.conditions:
        if c.probe in plan.probes or c.probe_path in seen:
            continue
        seen.add(c.probe_path)
        if all(x.options.get("skip_bad") for x in plan.conditions if x.probe_path == c.probe_path):
            continue
        _, problems = check_probe(c.probe_path)
        if problems:
            raise problems[0]


def build_probes(plan: Plan, out: Path, progress: bool = True) -> None:
    """Build the probes the plan asks for (deterministic; an existing identical build is kept)."""
    from probes.build import caption_probe, shapes_probe
    from probes.format import read_meta
    for name, spec in plan.probes.items():
        folder = out / "probes" / name
        stamp = folder / "sweep_spec.json"
        want = json.dumps(spec, sort_keys=True)
        if stamp.is_file() and stamp.read_text() == want and (folder / "probe.jsonl").is_file():
            continue
        args = {{"n": "n_items", "canvas": "size"}.get(k, k): v for k, v in spec.items() if k != "build"}
        args.setdefault("n_items", 40)
        try:
            if spec["build"] == "shapes":
                shapes_probe(folder, progress=progress, **{"cell_px": 16, **args})
            else:
                src = Path(spec["build"])
                src = src if src.is_absolute() or not (plan.base / src).exists() else plan.base / src
                caption_probe(str(src), folder, progress=progress, **args)
        except TypeError as e:
            raise PlanError(f"{plan.where}: probes.{name}: {e}; see 'spatialbias probe build --help' for the "
                            "options") from None
        read_meta(folder)
        atomic_write_text(stamp, want)


class SharedFailure(PlanError):
    """A failure every condition of a model would hit (its weights do not load, a probe does not
    fit it): the run stops at once with this one line; what finished before stays in the store."""


def preflight(lvlm, conditions: list[Condition]) -> None:
    """One row of each probe through the model, unintervened, before any condition runs: a probe
    the model cannot take (image size, answer tokens, prompt) fails here, once, as a
    :class:`SharedFailure`, instead of once per condition."""
    from analyses.evaluate import check_probe, score_probe
    for c in {c.probe_path: c for c in conditions}.values():
        good, _ = check_probe(c.probe_path, images=False)
        if not good:
            continue  # the eval condition reports an empty probe itself
        try:
            score_probe(lvlm, c.probe_path, {"baseline": []}, batch_size=1, progress=False, rows=[good[0][1]])
        except SpatialBiasError as e:
            raise SharedFailure(f"model {c.model} cannot take probe {c.probe}: {e} — every condition on this pair "
                                "would fail the same way, so nothing ran; build the probe for this model (omit "
                                "--probe to let the report build one) or pass another model") from None


def run_group(conditions: list[Condition], settings: dict, progress: bool = False
              ) -> Iterator[tuple[Condition, tuple | str, float]]:
    """Load the group's model once, check that it takes each probe (:func:`preflight`), and run
    its conditions; yields (condition, (rows, details) or an error line, seconds). A condition
    that fails with the toolkit's own error is reported, not fatal; a failure every condition
    shares (the model does not load, a probe does not fit it) raises :class:`SharedFailure`."""
    import torch

    import interp
    from analyses.tasks import Context, run_condition
    from interp.load import fingerprint
    try:
        # device_map / offload place the weights and change no number (dispatched runs equal
        # undispatched ones: tests/test_dispatch.py), so they stay out of condition ids; dtype does
        # change numbers and is part of every condition's options (and id)
        place = ({"device_map": settings["device_map"], "max_memory": settings.get("max_memory"),
                  "offload_folder": settings.get("offload_folder")} if settings.get("device_map") is not None
                 else {"device": settings.get("device")})
        lvlm = interp.load(conditions[0].model_path, dtype=getattr(torch, settings.get("dtype") or "float32"),
                           trust_remote_code=bool(settings.get("trust_remote_code")), **place)
        fp = fingerprint(lvlm.source or lvlm.model)
        from analyses.memory import budget
        room = budget(lvlm, settings.get("max_memory"))
    except SpatialBiasError as e:
        raise SharedFailure(f"model {conditions[0].model}: {e}") from None
    preflight(lvlm, conditions)
    ctx = Context(batch_size=settings.get("batch_size", 64), progress=progress, budget=room)
    for c in conditions:
        t0 = time.perf_counter()
        try:
            rows, details = run_condition(lvlm, c, ctx)
        except SpatialBiasError as e:
            yield c, str(e), time.perf_counter() - t0
            continue
        where = f"details/{c.id}.parquet" if details is not None else None
        yield c, (frame(c, rows, fp, where), details), time.perf_counter() - t0


def _groups(conditions: Iterable[Condition]) -> dict[str, list[Condition]]:
    out: dict[str, list[Condition]] = {}
    for c in conditions:
        out.setdefault(c.model, []).append(c)
    return out


def _local(groups: dict[str, list[Condition]], settings: dict, progress: bool = False, **_) -> Iterator:
    for conds in groups.values():
        yield from run_group(conds, settings, progress)


def _ray(groups: dict[str, list[Condition]], settings: dict, address: str | None = None,
         num_cpus: int | None = None, **_) -> Iterator:
    """One Ray task per model group (each worker loads its model once, on the GPUs it asked for),
    streaming one result per condition back to this process, which writes the store: a crash
    loses only conditions in flight."""
    import ray
    started = False
    if not ray.is_initialized():
        kw = {"address": address} if address else {  # "local": a new instance, never an existing cluster
            "address": "local", "num_cpus": num_cpus or os.cpu_count(), "include_dashboard": False}
        ray.init(log_to_driver=False, runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}},
                 **kw)
        started = True
    gpus = settings.get("gpus_per_model") or (1 if str(settings.get("device") or "").startswith("cuda") else 0)

    @ray.remote(num_gpus=gpus)
    def task(conds, settings):
        choose_threads(settings.get("threads"))  # a worker shares its node with others
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


def run(plan: Plan, out: str | os.PathLike, executor: str = "local", address: str | None = None,
        only: Iterable[str] = (), progress: bool = True, num_cpus: int | None = None) -> dict:
    """Run (or resume) a plan into ``out``. Returns {"done", "ran", "total", "failed": [(id, error)],
    "results": path}. ``only``: condition ids to run (again) alone, finished or not."""
    if executor not in EXECUTORS:
        raise PlanError(f"--executor {executor!r}: use {' or '.join(EXECUTORS)}")
    out = Path(out)
    only = set(only)
    unknown = only - {c.id for c in plan.conditions}
    if unknown:
        raise PlanError(f"--only {', '.join(sorted(unknown))}: not a condition of {plan.where}; see --dry-run for "
                        "the ids")
    check_models(plan)
    check_probes(plan)
    out.mkdir(parents=True, exist_ok=True)
    store = Store(out)
    store.check_fingerprints(plan)
    store.write_plan(plan)
    build_probes(plan, out, progress=progress)
    done = store.done()
    todo = [c for c in plan.conditions if (c.id in only if only else c.id not in done)]
    failed = []
    bar = tqdm(total=len(todo), desc="conditions", unit="condition", disable=not progress)
    for cond, res, sec in EXECUTORS[executor](_groups(todo), plan.settings, address=address, num_cpus=num_cpus,
                                              progress=progress and executor == "local"):
        if isinstance(res, str):
            failed.append((cond.id, f"{cond.model} / {cond.probe} / {cond.intervention} / {cond.analysis}: {res}"))
        else:
            store.write(cond, *res, sec)
            store.collect(plan.conditions)
        bar.set_postfix_str(f"{cond.model} {cond.intervention} {cond.analysis}", refresh=False)
        bar.update(1)
    bar.close()
    results = store.collect(plan.conditions)
    store.write_failed(failed)
    return {"done": len(store.done() & {c.id for c in plan.conditions}), "ran": len(todo) - len(failed),
            "total": len(plan.conditions), "failed": failed, "results": str(out / "results.parquet"),
            "rows": len(results)}


def rerun_alone(cond: Condition) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """One condition, from its config alone (what a part holds), on a freshly loaded model."""
    (c, res, _), = run_group([cond], {k: cond.options.get(k) for k in ("device", "dtype", "batch_size",
                                                                       "trust_remote_code")})
    if isinstance(res, str):
        raise SpatialBiasError(res)
    return res
