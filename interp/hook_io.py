"""What the dispatcher's hooks read and write besides a site's tensor: an argument a caller passed
by position, found by name (:func:`_positional_index`); every LM layer's keys and values after a
forward (:func:`layer_kv`); a cached tensor written to a file and memory-mapped back (:func:`to_file`)."""
from __future__ import annotations

import functools
import inspect
from pathlib import Path

import torch


@functools.cache
def _parameters(cls: type) -> tuple[str, ...]:
    return tuple(n for n, p in inspect.signature(cls.forward).parameters.items()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))[1:]  # without self


def _positional_index(mod: torch.nn.Module, key: str) -> int | None:
    """The position at which ``mod.forward`` takes argument ``key`` (None: not positional), so a
    ``#key`` site finds an argument the caller passed by position (Gemma3n's blocks get their
    rotary pair and per-layer input so)."""
    names = _parameters(type(mod))
    return names.index(key) if key in names else None


def to_file(x: torch.Tensor, path: Path) -> torch.Tensor:
    """``x`` written to ``path`` (raw bytes) and returned as a CPU tensor memory-mapped from it
    (same shape and dtype; its pages are read back on use, not held in memory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nbytes = x.numel() * x.element_size()
    storage = torch.UntypedStorage.from_file(str(path), shared=True, nbytes=nbytes)
    out = torch.empty(0, dtype=x.dtype).set_(storage, 0, x.shape)  # contiguous view of the file
    out.copy_(x)
    return out


def _file_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def layer_kv(lvlm, cache) -> list:
    """Per LM layer the (keys, values) its attention used, from a forward's cache: None for a
    recurrent layer; a layer that reuses another's keys and values (:meth:`Adapter.kv_sources`,
    absent from the cache) gets that layer's."""
    att = set(lvlm.adapter.attention_layers(lvlm.model))
    src = lvlm.adapter.kv_sources(lvlm.model)
    out = []
    for i in range(lvlm.adapter.layer_count(lvlm.model, "lm")):
        j = src.get(i, i)
        out.append((cache.layers[j].keys, cache.layers[j].values) if j in att else None)
    return out
