"""What a plan will cost before it runs: forward rows per condition (a unit independent of the
machine) and, where earlier runs in the folder timed the same model and analysis, seconds.

Role: ``--dry-run``. May import: ``spatialbias``, ``probes.format``, ``analyses.{plan, store,
registry, kinds, memory_model, placement}`` (where ``--device-map`` puts the weights and each
device's peak: :mod:`analyses.placement`) (the memory model itself lives in :mod:`analyses.memory_model`,
below this module and the run-time chunks of :mod:`analyses.memory`).
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pandas as pd

import analyses.kinds  # noqa: F401  (registers the analyses whose costs and profiles it reads)
from analyses.memory_model import (DTYPE_BYTES, MIN_ROWS, TEXT_TOKENS, Shapes, activation_peak,  # noqa: F401
                                   analysis_profiles, choose_rows, gib, kv_widths, lm_block_saved,
                                   lm_blocks_saved, lm_states_bytes, profiles)
from analyses.placement import device_peaks
from analyses.plan import Condition, Plan
from analyses.store import Store
from spatialbias.errors import SpatialBiasError


def forward_rows(cond: Condition, n_probe_rows: int, n_items: int, lm_layers: int | None) -> int:
    """Rows pushed through the model by one condition (its analysis' registered ``cost``)."""
    from analyses import registry
    return int(registry.get(cond.analysis).cost(cond, n_probe_rows, n_items, lm_layers or 1))


def estimate(plan: Plan, out: Path) -> pd.DataFrame:
    """One row per condition: status (done/pending), forward rows, the memory model's rows per
    step under the budget and predicted peak (weights + activations, ``peak_GiB``; see
    :func:`memory_row`) and, where earlier runs in ``out`` timed the same model and analysis, an
    estimate of seconds (their seconds per row × rows). ``attrs["memory_notes"]``: one line per
    condition group that does not fit or has no config.json to read shapes from;
    ``attrs["devices"]``: under ``--device-map``, one row per model and device of the predicted
    placement (:func:`device_rows`)."""
    from probes.format import read_rows
    store = Store(out)
    done = store.done()
    probe_rows: dict[str, tuple[int, int]] = {}
    rows = []
    for c in plan.conditions:
        if c.probe_path not in probe_rows:
            try:
                rs = read_rows(c.probe_path)
                probe_rows[c.probe_path] = (len(rs), len({r.id for r in rs}))
            except SpatialBiasError:  # not built yet: use the build spec
                spec = plan.probes.get(c.probe, {})
                n = int(spec.get("n", 40))
                probe_rows[c.probe_path] = (9 * n * (2 if spec.get("negatives") else 1), n)
        nr, ni = probe_rows[c.probe_path]
        rows.append({"condition_id": c.id, "model": c.model, "probe": c.probe, "intervention": c.intervention,
                     "analysis": c.analysis, "seed": c.seed, "status": "done" if c.id in done else "pending",
                     "forward_rows": forward_rows(c, nr, ni, _lm_layers(c.model_path))})
    df = pd.DataFrame(rows)
    mem = [memory_row(c, plan.settings) for c in plan.conditions]
    df["rows_per_step"] = [r for r, _, _ in mem]
    df["peak_GiB"] = [round(p / 2 ** 30, 2) if p is not None else np.nan for _, p, _ in mem]
    df.attrs["memory_notes"] = sorted({n for _, _, n in mem if n})
    df.attrs["devices"] = device_rows(plan.conditions, plan.settings)
    t = store.timings().merge(df[["condition_id", "forward_rows"]], on="condition_id")
    rate = (t.seconds / t.forward_rows).groupby([t.model, t.analysis]).median() if len(t) else pd.Series(dtype=float)
    df["est_seconds"] = [float(rate.get((m, a), np.nan)) * r for m, a, r in zip(df.model, df.analysis, df.forward_rows)]
    return df


@functools.cache
def _config(model_path: str) -> dict | None:
    from interp.load import ALIASES
    p = Path(ALIASES.get(model_path, model_path)) / "config.json"
    if not p.is_file():  # a hub id: its config.json in the HF cache, if there (nothing is downloaded)
        from huggingface_hub import try_to_load_from_cache
        try:
            got = try_to_load_from_cache(model_path, "config.json")
        except Exception:  # noqa: BLE001 — not a valid repo id: no estimate
            got = None
        p = Path(got) if isinstance(got, str) else p
    return json.loads(p.read_text()) if p.is_file() else None


def _lm_layers(model_path: str) -> int | None:
    cfg = _config(model_path)
    return None if cfg is None else cfg.get("text_config", cfg).get("num_hidden_layers")


@functools.cache
def _image_px(probe_path: str, probe_spec: str = "") -> tuple[int, int]:
    """(h, w) of the probe's first image; when the probe is not built yet, the canvas its build
    spec (a JSON mapping, :attr:`Condition.probe_spec`) draws, 3 × ``cell_px`` (the model's
    :func:`interp.load.probe_canvas`), else 336²."""
    try:
        from PIL import Image

        from probes.format import find_probe, read_rows
        probe = find_probe(probe_path)
        with Image.open(probe.image_path(read_rows(probe_path)[0])) as im:
            return im.height, im.width
    except Exception:  # noqa: BLE001 — not built yet, or a layout without images: the spec's canvas
        try:
            side = 3 * int(json.loads(probe_spec)["cell_px"])
        except Exception:  # noqa: BLE001 — no spec or no cell size: the paper's size
            side = 336
        return side, side


def plan_budget(settings: dict) -> int | None:
    """Activation bytes per step of a plan's runs before loading: ``max_memory`` on the run's
    device (or its one size for all) less the weights, else what the device has free (the run
    measures again after loading); None when unknown (a GPU on a machine without one)."""
    dev = str(settings.get("device") or "cpu")
    mm = {} if settings.get("device_map") else settings.get("max_memory") or {}  # dispatched: bounds weights
    key = int(dev.split(":")[1]) if dev.startswith("cuda:") else 0 if dev == "cuda" else "cpu"
    if key in mm or "all" in mm:
        return int(mm.get(key, mm.get("all")))
    if dev.startswith("cuda"):
        try:
            import torch
            return int(torch.cuda.mem_get_info(key)[0]) if torch.cuda.is_available() else None
        except Exception:  # noqa: BLE001
            return None
    import psutil
    return int(psutil.virtual_memory().available)


def memory_row(cond: Condition, settings: dict) -> tuple[int, int | None, str]:
    """(rows per step, predicted peak bytes = weights + activations at those rows, note) of one
    condition, from its model's config.json (dtype and batch size from the condition, text of
    :data:`TEXT_TOKENS` tokens, images of the probe's size). Rows 0 and a note when one step does
    not fit the budget; peak None when the model has no config.json here. Under ``--device-map``:
    the batch size and the execution device's peak under the predicted placement
    (:mod:`analyses.placement`); rows 0, peak None and the refusal line when weights would go to
    disk without ``--offload-folder``."""
    cfg = _config(cond.model_path)
    if cfg is None:
        return 0, None, f"{cond.model}: no config.json to read shapes from; no memory estimate"
    s = Shapes.from_config(cfg, cond.options.get("dtype") or "float32",
                           image_px=_image_px(cond.probe_path, cond.probe_spec))
    room = plan_budget(settings)
    limit = int(cond.options.get("batch_size", 64))
    kinds = analysis_profiles(cond.analysis, cond.options)
    if settings.get("device_map"):  # accelerate's placement, predicted; rows chosen by the run after loading
        try:
            p = _placement(cond, settings)
        except SpatialBiasError as e:
            return 0, None, str(e)
        return limit, device_peaks(s, kinds, limit, p)[p.execution], (
            f"{cond.model}: split by --device-map: peak_GiB is the execution device's ({p.execution}) at {limit} rows "
            "per step; the run chooses its rows from what that device has free after loading")
    if room is None:
        return limit, s.weights + max(activation_peak(s, k, limit) for k in kinds), ""
    steps = []
    for k in kinds:  # each step of the analysis gets its own rows under the budget
        try:
            r = choose_rows(s, k, room - s.weights, limit, f"{cond.model} {cond.analysis}")
        except SpatialBiasError as e:
            return 0, s.weights + activation_peak(s, k, MIN_ROWS.get(k, 1)), str(e)
        steps.append((r, activation_peak(s, k, r)))
    return min(r for r, _ in steps), s.weights + max(p for _, p in steps), ""




def _placement(cond: Condition, settings: dict):
    """The predicted placement of a condition's model under the plan's placement settings."""
    dm = settings["device_map"]
    return _predict(cond.model_path, cond.options.get("dtype") or "float32",
                    tuple(dm.items()) if isinstance(dm, dict) else dm,
                    tuple((settings.get("max_memory") or {}).items()), settings.get("offload_folder"),
                    bool(settings.get("trust_remote_code")))


@functools.lru_cache(maxsize=32)
def _predict(model_path: str, dtype: str, dm, mm: tuple, folder: str | None, trust: bool):
    from analyses.placement import predict
    return predict(model_path, dtype, dict(dm) if isinstance(dm, tuple) else dm, dict(mm) or None, folder, trust)


def device_rows(conditions: list[Condition], settings: dict) -> list[dict]:
    """Under ``--device-map``: per model (and dtype) and device of its predicted placement, the LM
    and vision blocks placed there, weights GiB and predicted peak GiB (weights + activations of
    the largest step of the model's conditions on that device, at the batch size; see
    :mod:`analyses.placement`). Empty without a device map, or for a model without config.json or
    refused (its note says why)."""
    from analyses.placement import device_table
    if not settings.get("device_map"):
        return []
    groups: dict[tuple[str, str], list[Condition]] = {}
    for c in conditions:
        groups.setdefault((c.model_path, c.options.get("dtype") or "float32"), []).append(c)
    out = []
    for (path, dtype), conds in groups.items():
        cfg = _config(path)
        if cfg is None:
            continue
        try:
            p = _placement(conds[0], settings)
        except SpatialBiasError:
            continue
        peaks: dict[str, int] = {}
        for c in conds:
            s = Shapes.from_config(cfg, dtype, image_px=_image_px(c.probe_path, c.probe_spec))
            kinds = analysis_profiles(c.analysis, c.options)
            for d, v in device_peaks(s, kinds, int(c.options.get("batch_size", 64)), p).items():
                peaks[d] = max(peaks.get(d, 0), v)
        out += device_table(conds[0].model, p, peaks)
    return out
