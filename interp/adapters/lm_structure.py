"""How an LM's residual state is laid out and fed beyond one (B, L, D) stream through its blocks,
as an adapter declares it (mixed into :class:`interp.adapters.base.Adapter`). The defaults
describe a plain decoder: ``lm.input`` is block 0's input, one stream, every block computing its
own keys and values from the stream alone. Gemma3n departs from each (:mod:`interp.adapters.gemma3n`);
the runners read these methods and never an architecture's name.

Shapes: B rows, L tokens, D width, S streams, N LM blocks; R resumed rows, Lq resumed positions.
"""
from __future__ import annotations

from typing import Any

import torch


class LMStructure:
    """Per-architecture facts of the LM's state between blocks; the defaults: one stream."""

    def lm_input_at(self) -> tuple[str, str] | None:
        """Where ``lm.input`` is when it is not the input of ``lm.blocks.0``: (HF module path, keyword
        argument) of the text model's own input (Gemma3n: ``inputs_embeds`` of its text model, which
        derives the per-layer inputs and the AltUp streams from it before block 0). None on most
        architectures."""
        return None

    def streams(self, model: torch.nn.Module) -> int:
        """Parallel residual streams S an LM block reads and writes: HF holds them (S, B, L, D) at
        ``lm.blocks.{i}`` and ``lm.blocks.{i}#input``; every runner sees them as (B, L, S·D), stream s
        at ``[..., s·D:(s+1)·D]`` (:meth:`merge_streams`). 1 on most architectures (Gemma3n's AltUp: 4)."""
        return 1

    @staticmethod
    def merge_streams(x: torch.Tensor) -> torch.Tensor:
        """(S, B, L, D) → (B, L, S·D), the runners' view of a multi-stream block state."""
        S, B, L, D = x.shape
        return x.permute(1, 2, 0, 3).reshape(B, L, S * D)

    @staticmethod
    def split_streams(x: torch.Tensor, streams: int) -> torch.Tensor:
        """(B, L, S·D) → (S, B, L, D): :meth:`merge_streams` undone (contiguous)."""
        B, L, SD = x.shape
        return x.reshape(B, L, streams, SD // streams).permute(2, 0, 1, 3).contiguous()

    def readout(self, model: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
        """(…, D): what the text model makes of the last block's output ``h`` (…, S·D, as
        ``lm.blocks.{N-1}`` holds it) before ``lm.final_norm``: ``h`` itself on most architectures."""
        return h

    def entry_site(self, model: torch.nn.Module) -> str | None:
        """A site recorded with ``lm.input`` that :meth:`enter` needs (per token, (B, L, …)); None
        where block 0 reads ``lm.input`` itself."""
        return None

    def enter(self, model: torch.nn.Module, x: torch.Tensor, part: torch.Tensor | None
              ) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]] | None]:
        """What the text model makes of ``lm.input`` rows ``x`` (R, Lq, D) before block 0, for a
        resumed run: (block 0's input (R, Lq, S·D), per block the :meth:`token_inputs` it derives,
        each (R, Lq, …), or None). ``part``: the :meth:`entry_site` values of those rows and positions.
        ``(x, None)`` where block 0 reads ``lm.input`` itself."""
        return x, None

    def token_inputs(self, model: torch.nn.Module) -> tuple[str, ...]:
        """Keyword arguments of an LM block that hold per-token inputs (B, L, …) besides the stream
        (Gemma3n's ``per_layer_input``): recorded for resuming and carried by residual patches
        (:meth:`carried`). None (``()``) on most architectures."""
        return ()

    def carried(self, model: torch.nn.Module, first: int) -> list[str]:
        """The per-token block inputs (:meth:`token_inputs`) that a residual patch made before LM
        block ``first`` carries with its tokens: those of blocks ``first``…"""
        n = self.layer_count(model, "lm")
        return [f"lm.blocks.{k}#{name}" for k in range(first, n) for name in self.token_inputs(model)]

    def last_logits(self, model: torch.nn.Module, length: int) -> dict[str, Any]:
        """The forward's keyword arguments that ask for the last position's logits only, on inputs of
        ``length`` tokens, without changing what any block computes: ``logits_to_keep=1`` on most
        architectures (Gemma4 with KV-sharing layers runs those on the kept positions only when it is
        an integer, so there the last position's index is given as a tensor)."""
        return {"logits_to_keep": 1}

    def kv_sources(self, model: torch.nn.Module) -> dict[int, int]:
        """{LM block j → block s < j}: block j computes no keys and values of its own and attends with
        those block s made (Gemma3n's and Gemma4's shared-KV layers). {} on most architectures."""
        return {}

    def reused_kv_kwargs(self, model: torch.nn.Module, j: int, keys: torch.Tensor, values: torch.Tensor
                         ) -> dict[str, Any]:
        """The keyword arguments that hand block j (a :meth:`kv_sources` block) the keys and values
        (R, kv_heads, L, head_dim) it attends with, in a resumed run."""
        return {}

    def reused_kv_edit(self, model: torch.nn.Module, j: int, fn) -> tuple[str, Any] | None:
        """(site, edit) that applies ``fn`` to the keys and to the values (each (B, kv_heads, L,
        head_dim)) block j (a :meth:`kv_sources` block) attends with, in a forward; None where no
        block reuses another's."""
        return None
