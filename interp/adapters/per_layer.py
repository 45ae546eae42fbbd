"""Two structures of Google's small LMs, as adapter mixins (:mod:`interp.adapters.lm_structure`
declares what the runners read; these fill it in from HF's config):

* :class:`PerLayerInputs` — per-layer inputs (``hidden_size_per_layer_input`` P > 0: Gemma3n,
  Gemma4 E2B/E4B): the text model computes every block's (B, L, P) input from its
  ``inputs_embeds`` (a projection) and a per-token table (``per_layer_inputs``, from the ids)
  before block 0, outside every block. ``lm.input`` is therefore the text model's
  ``inputs_embeds``; a resumed row entering at block 0 derives them again; residual patches carry
  them (``per_layer_input`` is a token input).
* :class:`SharedKV` — KV-sharing layers (``num_kv_shared_layers`` > 0): the last layers compute no
  keys and values and read those the last earlier layer of their type stored, through a
  per-forward ``KVSharingDict`` keyed by layer type.

Shapes: B rows, L tokens, D width, N LM blocks, P per-layer width; R resumed rows, Lq positions.
"""
from __future__ import annotations

import torch

from interp.adapters.base import get_module

TEXT_MODEL = "model.language_model"
"""HF path of the text model (Gemma3n and Gemma4)."""


def per_layer_width(model: torch.nn.Module) -> int:
    """P, the per-layer input width of the model's text config (0: none)."""
    return int(getattr(model.config.get_text_config(), "hidden_size_per_layer_input", 0) or 0)


def per_layer_params(t: dict) -> int:
    """Parameters of per-layer inputs in a text config mapping (0 without them): the per-token table
    (``vocab_size_per_layer_input`` × N·P), the model projection (D × N·P) and per block the gate
    and projection (2 D·P)."""
    P = int(t.get("hidden_size_per_layer_input") or 0)
    if not P:
        return 0
    D, N = int(t["hidden_size"]), int(t["num_hidden_layers"])
    return int(t.get("vocab_size_per_layer_input") or t["vocab_size"]) * N * P + D * N * P + N * 2 * D * P


class PerLayerInputs:
    """``lm.input`` at the text model's ``inputs_embeds``; with P > 0 the per-layer inputs entered
    and carried (without them the text model reads ``inputs_embeds`` as block 0's input, so the
    site is the same tensor)."""

    def lm_input_at(self):
        return TEXT_MODEL, "inputs_embeds"

    def entry_site(self, model):
        return f"module:{TEXT_MODEL}#per_layer_inputs" if per_layer_width(model) else None

    def token_inputs(self, model):
        return ("per_layer_input",) if per_layer_width(model) else ()

    def per_layer_entry(self, model, x: torch.Tensor, part: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Every block's per-layer input (R, Lq, P), per block, from ``lm.input`` rows ``x`` (R, Lq, D)
        and the per-token table's rows ``part`` (R, Lq, N, P): HF's ``project_per_layer_inputs``."""
        per_layer = get_module(model, TEXT_MODEL).project_per_layer_inputs(x, part)
        return [{"per_layer_input": per_layer[:, :, j]} for j in range(per_layer.shape[2])]

    def enter(self, model, x, part):
        """Block 0 reads ``x`` itself; with P > 0 every block's per-layer input is derived from it."""
        return x, (self.per_layer_entry(model, x, part) if per_layer_width(model) else None)


class SharedKV:
    """HF's KV-sharing layers, from the text config's ``kv_sharing_modes`` and ``layer_types``."""

    def kv_sources(self, model):
        """{layer j → layer s}: layer j computes no keys and values and attends with those layer s
        stored (the last earlier layer of its type: HF's ``kv_sharing_modes``)."""
        tc = model.config.get_text_config()
        if not int(getattr(tc, "num_kv_shared_layers", 0) or 0):
            return {}
        modes, types = list(tc.kv_sharing_modes), list(tc.layer_types)
        return {j: max(s for s in range(j) if modes[s] == "store" and types[s] == types[j])
                for j, mode in enumerate(modes) if mode == "reuse"}

    def reused_kv_kwargs(self, model, j, keys, values):
        from transformers.cache_utils import KVSharingDict
        return {"shared_kv_states": KVSharingDict({model.config.get_text_config().layer_types[j]: (keys, values)})}

    def reused_kv_edit(self, model, j, fn):
        t = model.config.get_text_config().layer_types[j]

        def edit(store):  # the forward's KVSharingDict: the storing layer's (keys, values) per layer type
            store[t] = tuple(fn(x) for x in store[t])
            return store
        return f"lm.blocks.{j}#shared_kv_states", edit

    def block_kwargs(self, model):
        """A fresh ``shared_kv_states`` store per resumed run: the storing layers write there (and
        fail without one, even where no layer reads it)."""
        from transformers.cache_utils import KVSharingDict
        return {"shared_kv_states": KVSharingDict()}
