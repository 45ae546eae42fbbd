"""``interp.load``: an in-memory HF model, a local checkpoint folder, or a hub id from the
local HF cache (offline; nothing is downloaded), always through safetensors."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from interp import adapters
from spatialbias.errors import SpatialBiasError
from spatialbias.sizes import MAP_STRATEGIES, parse_max_memory, parse_size  # noqa: F401 (re-exported)
from interp.model import LVLM

ORGANISM_DIR = Path(__file__).parent / "organism" / "checkpoint"
ALIASES = {"organism": ORGANISM_DIR}


def load(model_or_path: Any, processor: Any = None, *, dtype: torch.dtype | None = None,
         device: str | torch.device | None = None, device_map: str | dict | None = None,
         max_memory: dict | str | None = None, offload_folder: str | os.PathLike | None = None,
         trust_remote_code: bool = False) -> LVLM:
    """Wrap a model for probing and interventions.

    Args:
        model_or_path: an HF model object, ``"organism"`` (the bundled checkpoint), a local
            folder written by ``save_pretrained``, or a hub id already in the local HF cache.
        processor: the model's processor; loaded from the same place when omitted.
        dtype / device: passed to ``from_pretrained`` / ``.to`` (the whole model on one device).
        device_map: place the model across devices with accelerate's big-model dispatch (what
            ``from_pretrained(device_map=...)`` does): ``"auto"`` / ``"balanced"`` /
            ``"sequential"``, or a dict {HF module path: 0 | "cuda:1" | "cpu" | "disk"}. Modules
            on ``"disk"`` (and on ``"cpu"`` when a GPU is in the map) are loaded onto the execution
            device for each forward. Every runner gives the undispatched result (tested).
        max_memory: with ``device_map="auto"``: the most each device may hold *in weights*
            ({0: "20GiB", "cpu": "60GiB"}, or ``"0=20GiB,cpu=60GiB"``); see :func:`parse_max_memory`.
        offload_folder: where weights mapped to ``"disk"`` are written (memory-mapped).
        trust_remote_code: off by default; turning it on lets a checkpoint run its own Python.
    """
    if device is not None and device_map is not None:
        raise SpatialBiasError(f"device={device!r} and device_map={device_map!r} were both given; use device for one "
                               "device, device_map to split the model across devices (and disk)")
    if device_map is None and (max_memory is not None or offload_folder is not None):
        raise SpatialBiasError("max_memory / offload_folder place weights across devices and need device_map "
                               "(e.g. device_map='auto')")
    max_memory = expand_max_memory(parse_max_memory(max_memory) if isinstance(max_memory, str) else max_memory)
    if isinstance(model_or_path, torch.nn.Module):
        model = model_or_path
        adapter = adapters.for_model(model)
        if processor is None:
            src = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
            if not src:
                raise SpatialBiasError(f"{type(model).__name__} was given without a processor and has no "
                                       "name_or_path to load one from; pass processor=...")
            processor = _processor(adapter, src, trust_remote_code)
        if device is not None:
            model = model.to(device)
        if device_map is not None:
            model = dispatch(model, device_map, max_memory, offload_folder)
        return LVLM(model, processor, adapter, name=type(model).__name__)

    name = str(model_or_path)
    src = ALIASES.get(name, name)
    cfg, adapter = read_config(name, trust_remote_code)
    archs = cfg.architectures
    why = adapter.load_requirements()
    if why:
        raise SpatialBiasError(f"cannot load {name!r} ({archs[0]}): {why}")
    import transformers
    cls = getattr(transformers, archs[0])
    from transformers.utils import logging as hf_logging
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no per-tensor loading bar in notebooks and logs
    placement = {} if device_map is None else {"device_map": _check_map(device_map), "max_memory": max_memory,
                                               "offload_folder": _offload_folder(device_map, offload_folder)}
    try:
        model = cls.from_pretrained(src, local_files_only=True, use_safetensors=True, dtype=dtype,
                                    trust_remote_code=trust_remote_code, **placement)
    except OSError as e:
        raise SpatialBiasError(f"cannot load weights of {name!r}: {str(e).splitlines()[0]}; the toolkit "
                               "loads safetensors weights only") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if device is not None:
        model = model.to(device)
    if processor is None:
        processor = _processor(adapter, src, trust_remote_code)
    return LVLM(model, processor, adapter, name=name, source=str(src))


def expand_max_memory(mem: dict | None) -> dict | None:
    """A ``{"all": bytes}`` entry (one size for every device) spelled out for every GPU and the CPU."""
    if not mem or "all" not in mem:
        return mem
    out = {k: v for k, v in mem.items() if k != "all"}
    for i in range(torch.cuda.device_count()):
        out.setdefault(i, mem["all"])
    out.setdefault("cpu", mem["all"])
    return out


def _check_map(device_map):
    if isinstance(device_map, str) and device_map not in MAP_STRATEGIES:
        raise SpatialBiasError(f"device_map={device_map!r}: use {', '.join(MAP_STRATEGIES)} or a dict "
                               "{{module path: device}} (a JSON file on the command line)")
    if not isinstance(device_map, (str, dict)):
        raise SpatialBiasError(f"device_map must be a strategy name or a dict, got {type(device_map).__name__}")
    return device_map


def _offload_folder(device_map, folder) -> str | None:
    if folder is not None:
        return str(folder)
    if isinstance(device_map, dict) and "disk" in {str(v) for v in device_map.values()}:
        raise SpatialBiasError("the device map sends modules to 'disk': pass offload_folder (--offload-folder DIR)")
    return None


def dispatch(model: torch.nn.Module, device_map, max_memory: dict | None = None,
             offload_folder: str | os.PathLike | None = None) -> torch.nn.Module:
    """An in-memory model placed across devices by accelerate (``infer_auto_device_map`` for a
    strategy name, then ``dispatch_model``), as ``from_pretrained(device_map=...)`` places a checkpoint."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory
    device_map = _check_map(device_map)
    if isinstance(device_map, str):
        no_split = sorted(getattr(model, "_no_split_modules", None) or [])
        mem = max_memory
        if device_map != "sequential":
            mem = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split,
                                      low_zero=device_map == "balanced_low_0")
        device_map = infer_auto_device_map(model, max_memory=mem, no_split_module_classes=no_split)
        if set(device_map) == {""} and device_map[""] == "disk":
            raise SpatialBiasError(f"max_memory={max_memory} leaves no room for any module: the whole model would "
                                   "go to disk; raise --max-memory")
    folder = _offload_folder(device_map, offload_folder)
    model = dispatch_model(model, device_map=device_map, offload_dir=folder)
    model.hf_device_map = dict(device_map)
    return model


HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def read_config(name: str, trust_remote_code: bool = False):
    """(config, adapter) of a checkpoint, read from the local files only (no weights loaded); one
    clear error line that tells a missing folder from a hub id missing from the HF cache, a
    config without ``architectures`` and an unsupported class."""
    from transformers import AutoConfig
    src = ALIASES.get(str(name), str(name))
    try:
        cfg = AutoConfig.from_pretrained(src, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        why = str(e).splitlines()[0]
        if os.path.isdir(src):
            msg = f"folder {src} has no readable config.json ({why}); pass a folder written by save_pretrained"
        elif HUB_ID.match(str(src)) and not str(src).startswith("."):
            msg = (f"hub id {name!r} is not in the local HF cache (nothing is downloaded); download it once where "
                   "the network is reachable, or pass a local checkpoint folder")
        else:
            msg = f"no such checkpoint folder {src}; pass an existing folder, 'organism', or a hub id in the HF cache"
        raise SpatialBiasError(f"cannot load model {name!r}: {msg}") from None
    archs = cfg.architectures or []
    if not archs:
        raise SpatialBiasError(f"{name}: config.json names no 'architectures'; set it to the model class, e.g. "
                               f"{adapters.supported_classes()[0]}")
    return cfg, adapters.for_class(archs[0])


def probe_canvas(name: Any, trust_remote_code: bool = False) -> int:
    """Side in pixels of a square probe this checkpoint's processor takes as drawn (its adapter's
    :meth:`~interp.adapters.Adapter.probe_canvas`), read from the config and processor files
    alone (a folder of config files without a tokenizer, like ``benchmarks/configs/*``: its
    ``preprocessor_config.json`` alone). One error line where no 3×3 grid fits (a processor that
    does not resize and a side that 3 does not divide)."""
    cfg, adapter = read_config(name, trust_remote_code)
    src = ALIASES.get(str(name), str(name))
    try:
        ip = _processor(adapter, src, trust_remote_code).image_processor
    except Exception:  # noqa: BLE001 — no usable tokenizer here: the image processor alone, if saved
        ip = _image_processor(src, trust_remote_code)
        if ip is None:
            raise
    side = adapter.probe_canvas(cfg, ip)
    if side % 3 and getattr(ip, "do_resize", True) is False:
        raise SpatialBiasError(f"{name}: its processor does not resize and its {side} px images do not split into "
                               "a 3×3 grid of whole pixels; pass a probe built for it (--probe)")
    return side


def _image_processor(src: Any, trust_remote_code: bool):
    """The image processor alone of a folder that has ``preprocessor_config.json`` but no full
    processor (no tokenizer); None where it has none either."""
    from transformers import AutoImageProcessor
    try:
        return AutoImageProcessor.from_pretrained(src, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None


def _processor(adapter, src: Any, trust_remote_code: bool):
    try:
        proc = adapter.load_processor(src, trust_remote_code)
    except (OSError, ValueError) as e:
        raise SpatialBiasError(f"cannot load the processor of {src!r}: {str(e).splitlines()[0]}; "
                               "pass processor=... explicitly") from None
    if not hasattr(proc, "image_processor"):
        raise SpatialBiasError(f"{src!r}: the saved processor has no image processor; pass processor=... explicitly")
    return proc


def checkpoint_folder(model_or_path: Any) -> Path | None:
    """The local folder a checkpoint loads from: a folder, the organism alias, or a hub id's
    snapshot in the local HF cache; None when there is none (an in-memory model, an unknown id)."""
    if isinstance(model_or_path, torch.nn.Module):
        return None
    src = Path(str(ALIASES.get(str(model_or_path), model_or_path)))
    if src.is_dir():
        return src
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(str(model_or_path), local_files_only=True))
    except Exception:  # not a hub id in the cache: nothing to fingerprint
        return None


def fingerprint(model_or_path: Any) -> str:
    """A short hash that changes when the weights or config change: sha256 over ``config.json``
    and the full bytes of every weight file (hashes cached per file path, size and mtime under
    ``$SPATIALBIAS_CACHE`` or ``~/.cache/spatialbias``), or over the state dict of an in-memory
    model. A sweep records it per condition and refuses to mix results of different weights."""
    import hashlib
    import json
    h = hashlib.sha256()
    if isinstance(model_or_path, torch.nn.Module):
        h.update(json.dumps(model_or_path.config.to_dict(), sort_keys=True, default=str).encode())
        for k, v in sorted(model_or_path.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]
    folder = checkpoint_folder(model_or_path)
    if folder is None:
        raise SpatialBiasError(f"cannot fingerprint {model_or_path!r}: no local checkpoint folder (a folder, "
                               "'organism', or a hub id in the local HF cache)")
    h.update((folder / "config.json").read_bytes() if (folder / "config.json").is_file() else b"")
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f.name.encode())
        h.update(_file_sha256(f).encode())
    return h.hexdigest()[:16]


def _file_sha256(path: Path) -> str:
    import hashlib
    import json
    cache_dir = Path(os.environ.get("SPATIALBIAS_CACHE", Path.home() / ".cache" / "spatialbias"))
    store = cache_dir / "file_sha256.json"
    st = path.resolve().stat()
    key = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    try:
        known = json.loads(store.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            h.update(block)
    known[key] = h.hexdigest()
    try:
        from spatialbias.files import atomic_write_text
        atomic_write_text(store, json.dumps(known, indent=0))
    except OSError:
        pass  # a read-only home: the hash is recomputed next time
    return known[key]
