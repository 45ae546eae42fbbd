"""The kinds of an LM's layers, as an adapter declares them (mixed into
:class:`interp.adapters.base.Adapter`): which layers attend (softmax attention over keys and
values) and which mix tokens otherwise — a hybrid LM's recurrent layers (Qwen3.5's Gated
DeltaNet), which read no position ids, take no attention mask and summarise the whole prefix in a
state. Sites that exist on one kind only (``lm.blocks.{i}.attn`` …) are listed and resolved on
those layers only; runners read :meth:`LayerKinds.attention_layers` instead of an architecture's name.

The methods use the adapter's ``pattern_count``, ``site_table`` and ``name``.
"""
from __future__ import annotations

import torch

from spatialbias.errors import SpatialBiasError


class LayerKinds:
    """Per-layer facts of an adapter's LM; the defaults describe an LM whose every layer attends."""

    def layers_of(self, model: torch.nn.Module, pattern: str) -> list[int]:
        """The indices at which an indexed site pattern names a module: all of ``range(pattern_count)``,
        unless the architecture's LM layers differ in kind (a hybrid LM's ``lm.blocks.{i}.attn`` only on
        its attention layers, its recurrent mixer's site only on the others)."""
        return list(range(self.pattern_count(model, pattern)))

    def attention_layers(self, model: torch.nn.Module) -> list[int]:
        """The LM layers whose token mixer is softmax attention over keys and values: where
        ``lm.blocks.{i}.attn`` / ``.attn.heads`` / ``.attn.pattern`` exist, an attention mask can be
        edited (:class:`~interp.interventions.Knockout`), the rotary embedding of the position ids
        acts (BaPA, :class:`~interp.interventions.PositionSwap`) and a resumed run reuses the keys and
        values of the prefix. Every layer on most architectures; on a hybrid LM the other layers
        (recurrent mixers: Gated DeltaNet) read no position and the whole prefix through their state."""
        return self.layers_of(model, "lm.blocks.{i}.attn")

    def layer_kind(self, model: torch.nn.Module, i: int) -> str:
        """LM layer ``i``'s kind, for messages: the text config's ``layer_types`` entry where it has
        one (``full_attention``, ``sliding_attention``, ``linear_attention``), else ``attention``."""
        types = getattr(getattr(model.config, "text_config", None), "layer_types", None)
        return str(types[i]) if types else "attention"

    def mixer_site(self, model: torch.nn.Module, i: int) -> str:
        """The canonical site of LM layer ``i``'s token-mixer output (B, L, D), before the residual
        add: ``lm.blocks.{i}.attn`` on an attention layer (an adapter with another mixer names it)."""
        return f"lm.blocks.{i}.attn"

    def _check_layer(self, model: torch.nn.Module | None, pattern: str, i: str | None, site: str) -> None:
        """None, or one error line when ``site`` (pattern ``pattern`` at index ``i``, None for an
        unindexed pattern) names a layer that lacks it (checked only with a model)."""
        if i is None or model is None:
            return
        i = int(i)
        n = self.pattern_count(model, pattern)
        layers = self.layers_of(model, pattern)
        if not -n <= i < n or len(layers) == n or i % n in layers:
            return
        i %= n
        here = [p.format(i=i) for p in self.site_table(model) if p.startswith("lm.blocks.{i}") and i in
                self.layers_of(model, p)]
        raise SpatialBiasError(f"site {site!r}: LM layer {i} of {self.name} is a {self.layer_kind(model, i)} layer "
                               f"without that module ({pattern} exists on layers {layers} only); layer {i} has "
                               f"{', '.join(here)}")

    def kv_cache(self, model: torch.nn.Module):
        """An empty cache for a forward that returns every layer's keys and values (``kv=True``): a
        plain ``DynamicCache`` (every layer keeps all its keys and values, whatever its attention
        window) where every LM layer attends; on a hybrid LM the model's own cache layout, whose
        recurrent layers keep their conv and recurrent states there."""
        from transformers import DynamicCache
        if len(self.attention_layers(model)) == self.layer_count(model, "lm"):
            return DynamicCache()
        return DynamicCache(config=model.config.get_text_config())
