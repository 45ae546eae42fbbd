"""Where ``--device-map`` puts the weights, and the peak bytes on each device, from config.json
alone (the dry run under a device map).

The placement is accelerate's own, computed as ``from_pretrained(device_map=...)`` computes it:
the model class is built on the meta device (no weights allocated, the checkpoint's dtype) and
transformers' ``_get_device_map`` runs on it with the run's ``max_memory`` — for ``auto`` /
``balanced`` its ``get_balanced_memory`` first, then ``infer_auto_device_map``, which fills the
devices in order (GPUs, then ``cpu``, then ``disk``), keeps the model's ``_no_split_modules``
(vision and LM blocks) whole and keeps room on the first GPU (and the CPU) for the largest
offloaded block. So the predicted map is the map a load gives (tests/test_estimate_devices.py).

Peaks per device (bytes) assume how the engine runs a dispatched model (:mod:`interp.dispatch`
through accelerate's hooks; :func:`interp.model.execution_device`): inputs go to the execution
device of the input embeddings (:attr:`interp.model.LVLM.device`); a block stored on ``cpu`` or
``disk`` computes on accelerate's main device (the first GPU in the map, else the CPU), its
weights copied there for its forward; every other block computes on the device it is stored on,
and its activations live there. Hence, at the dry run's rows per step (the batch size; the run chooses its rows from
what the execution device has free after loading):

* the execution device: its weights + the whole step's activations
  (:func:`analyses.memory_model.activation_peak`: what the run budgets there, an upper bound:
  the LM blocks of other GPUs are counted here too);
* another GPU: its weights + the activations of the blocks it computes — the same profile with
  only its n LM blocks (no vision tokens, no pixel inputs) plus, where it computes vision blocks,
  the profile of those blocks alone (the sum: autograd keeps both during attribution);
* the main device also holds the largest block stored on cpu/disk (copied in for its forward)
  and computes the offloaded blocks (counted among its own);
* ``cpu`` / ``disk`` (unless the CPU is the execution device: no GPU in the map): weights only,
  their blocks compute on the execution device.

Role: below :mod:`analyses.estimate`. May import ``spatialbias``, ``interp.load``,
``interp.adapters``, ``analyses.memory_model``.
"""
from __future__ import annotations

import copy
import functools
import logging
from dataclasses import dataclass, replace

from analyses.memory_model import Shapes, activation_peak, gib
from spatialbias.errors import SpatialBiasError

OFFLOAD = ("cpu", "disk")


@dataclass(frozen=True)
class Placement:
    """A predicted placement of one model's weights.

    ``device_map``: accelerate's map {module path: device} (GPU index, ``"cpu"`` or ``"disk"``);
    ``weights``: bytes of parameters and buffers per device label (``"cuda:0"``, ``"cpu"``,
    ``"disk"``; tied tensors once), in map order; ``lm_layers`` / ``vision_layers``: the LM /
    vision block indices stored on each device label; ``execution``: the label of the device
    the inputs go to; ``main``: accelerate's main device, where blocks stored on cpu/disk compute;
    ``largest_offloaded``: bytes of the largest map entry stored on cpu/disk that computes
    elsewhere (copied onto ``main`` for its forward; 0 when none)."""
    device_map: dict
    weights: dict[str, int]
    lm_layers: dict[str, tuple[int, ...]]
    vision_layers: dict[str, tuple[int, ...]]
    execution: str
    main: str
    largest_offloaded: int

    @property
    def total(self) -> int:
        """Bytes of all the weights."""
        return sum(self.weights.values())


def label(device) -> str:
    """``"cuda:k"`` for a GPU index (or ``"cuda:k"`` itself), else the device name as given."""
    s = str(device)
    return f"cuda:{s}" if s.isdigit() else s


def _budget_text(max_memory: dict | None) -> str:
    if not max_memory:
        return "(none given)"
    return ",".join(f"{k}={v / 2 ** 30:g}GiB" for k, v in max_memory.items())


@functools.lru_cache(maxsize=16)
def _meta_model(model_path: str, dtype: str, trust_remote_code: bool = False):
    """(model on the meta device in ``dtype``, its adapter): the class config.json names, built as
    ``from_pretrained`` builds it before loading (its init contexts), no weights allocated."""
    import torch
    import transformers
    from transformers.utils.generic import ContextManagers

    from interp.load import read_config
    cfg, adapter = read_config(model_path, trust_remote_code)
    why = adapter.load_requirements()
    if why:
        raise SpatialBiasError(f"cannot predict the placement of {model_path} ({cfg.architectures[0]}) under "
                               f"--device-map: the class must be built to place it, and {why}")
    cls = getattr(transformers, cfg.architectures[0], None)
    if cls is None:
        raise SpatialBiasError(f"{model_path}: transformers has no class {cfg.architectures[0]}; upgrade transformers")
    with ContextManagers(cls.get_init_context(getattr(torch, dtype), False, False, None)):
        model = cls(copy.deepcopy(cfg))
    return model, adapter


def predict(model_path: str, dtype: str, device_map, max_memory: dict | None, offload_folder: str | None = None,
            trust_remote_code: bool = False) -> Placement:
    """The placement ``interp.load(model_path, dtype=dtype, device_map=device_map,
    max_memory=max_memory)`` would make (``device_map``: a strategy name or an explicit map;
    ``max_memory``: {GPU index | "cpu" | "disk": bytes}, as :func:`spatialbias.sizes.parse_max_memory`
    gives, ``"all"`` spelled out for this machine's GPUs as the load does). One error line when
    weights would go to disk and no ``offload_folder`` is given (the load would refuse), naming
    the sizes and the fix."""
    from transformers.integrations.accelerate import _get_device_map, compute_module_sizes

    from interp.load import expand_max_memory
    model, adapter = _meta_model(str(model_path), dtype, trust_remote_code)
    mem = expand_max_memory(dict(max_memory)) if max_memory else None
    quiet = [logging.getLogger(n) for n in ("accelerate.utils.modeling", "transformers.integrations.accelerate")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:  # "Device 3 is not available": the dry run plans for GPUs this machine need not have
        lg.setLevel(logging.ERROR)
    try:
        dm = device_map if isinstance(device_map, dict) else _get_device_map(model, device_map, mem, None)
    finally:
        for lg, lv in zip(quiet, levels):
            lg.setLevel(lv)
    dm = dict(dm)
    sizes, _ = compute_module_sizes(model)
    weights: dict[str, int] = {}
    for key, dev in dm.items():
        weights[label(dev)] = weights.get(label(dev), 0) + int(sizes.get(key, 0))

    def where(path: str) -> str | None:
        parts = path.split(".")
        for n in range(len(parts), -1, -1):  # the map entry holding the module, or the first inside it
            if ".".join(parts[:n]) in dm:
                return label(dm[".".join(parts[:n])])
        inside = [label(v) for k, v in dm.items() if k.startswith(path + ".")]
        return inside[0] if inside else None

    def blocks(stack: str) -> dict[str, tuple[int, ...]]:
        out: dict[str, list[int]] = {}
        n = adapter.layer_count(model, stack) if stack in adapter.n_layers else 0
        for i in range(n):
            d = where(adapter.path(f"{stack}.blocks.{i}", model))
            if d is not None:
                out.setdefault(d, []).append(i)
        return {k: tuple(v) for k, v in out.items()}

    gpus = [label(v) for v in dm.values() if label(v) not in OFFLOAD]
    embed = where(adapter.path("lm.embed", model)) or "cpu"
    main = gpus[0] if gpus else "cpu"  # accelerate's main device: where offloaded blocks compute
    execution = embed if embed not in OFFLOAD else main
    offloaded = [int(sizes.get(k, 0)) for k, v in dm.items()
                 if label(v) in OFFLOAD and (gpus or label(v) == "disk")]
    weights.setdefault(execution, 0)
    weights.setdefault(main, 0)
    p = Placement(dm, weights, blocks("lm"), blocks("vision"), execution, main, max(offloaded, default=0))
    if "disk" in weights and not offload_folder:
        room = sum(v for k, v in (mem or {}).items() if k != "disk")
        raise SpatialBiasError(
            f"{model_path}: {gib(p.total)} of {dtype} weights do not fit --max-memory {_budget_text(mem)} "
            f"({gib(room)} in all): {gib(weights['disk'])} would go to disk; raise --max-memory (cpu=…) or pass "
            "--offload-folder DIR to memory-map the rest from disk")
    return p


def device_activations(s: Shapes, kind: str, rows: int, p: Placement) -> dict[str, int]:
    """Activation bytes per device label of one step of memory profile ``kind`` at ``rows`` rows
    under placement ``p`` (see the module docstring for what lives where); devices that only
    store weights get 0."""
    out: dict[str, int] = {}
    for d in p.weights:
        if d == p.execution:
            out[d] = activation_peak(s, kind, rows)
        elif d in OFFLOAD:  # its blocks compute on the execution device
            out[d] = 0
        else:
            here = (d, *(OFFLOAD if d == p.main else ()))  # the main device computes the offloaded blocks
            n = sum(len(p.lm_layers.get(x, ())) for x in here)
            nv = sum(len(p.vision_layers.get(x, ())) for x in here)
            lm = replace(s, lm_layers=n, vision_layers=0, vision_tokens=0, pixel_bytes=0, keeps_vision_states=False)
            vis = replace(s, lm_layers=0, seq_len=0, vision_layers=nv, pixel_bytes=0)
            out[d] = (activation_peak(lm, kind, rows) if n else 0) + (activation_peak(vis, kind, rows) if nv else 0)
    return out


def device_peaks(s: Shapes, kinds: tuple[str, ...], rows: int, p: Placement) -> dict[str, int]:
    """Predicted peak bytes per device label: its weights (+ the largest offloaded block on the
    main device) + the activations of the largest of the steps ``kinds`` on it."""
    acts = [device_activations(s, k, rows, p) for k in kinds]
    return {d: w + (p.largest_offloaded if d == p.main else 0) + max(a[d] for a in acts)
            for d, w in p.weights.items()}


def _ranges(ix: tuple[int, ...]) -> str:
    if not ix:
        return ""
    parts, start = [], ix[0]
    for a, b in zip(ix, [*ix[1:], None]):
        if b != a + 1:
            parts.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ",".join(parts)


def device_table(model: str, p: Placement, peaks: dict[str, int]) -> list[dict]:
    """Rows of the dry run's per-device table of one model: device, the LM / vision blocks placed
    there (index ranges), its weights and predicted peak (GiB) and whether inputs go there."""
    return [{"model": model, "device": d, "lm_layers": _ranges(p.lm_layers.get(d, ())),
             "vision_blocks": _ranges(p.vision_layers.get(d, ())), "weights_GiB": round(w / 2 ** 30, 2),
             "peak_GiB": round(peaks.get(d, w) / 2 ** 30, 2), "inputs": "yes" if d == p.execution else ""}
            for d, w in p.weights.items()]
