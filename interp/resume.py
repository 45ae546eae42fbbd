"""Resuming the LM from a block: what every block received in an unpatched run
(:func:`capture_lm`), and the run of the later blocks only, over the positions that can change
(:func:`resume`) — what resumed patching (:mod:`interp.patching.resumed`) is built on.

Shapes: N LM blocks, B rows, L tokens, D width; R resumed rows, Lq = L − p resumed positions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from interp.batch import validate
from interp.dispatch import PATTERN_IMPL, Edit, Trace, cpu_attention_guard, forward
from spatialbias.errors import SpatialBiasError


RESUME_KWARGS = ("attention_mask", "position_embeddings", "position_ids")
"""The keyword arguments an LM block is called with (besides the KV cache) in transformers 5.24,
on every supported architecture; :func:`capture_lm` records them at ``lm.blocks.{i}#KEY`` sites."""
RESUMABLE_IMPLS = ("sdpa", "eager", PATTERN_IMPL)
"""Attention implementations whose blocks take an explicit (B, 1, Lq, Lk) mask, which resuming
slices to the later queries (flash-attention and flex are refused: their masks are not tensors)."""


@dataclass
class LMStates:
    """What every LM block received in one run, for :func:`resume`. N LM blocks, B rows, L tokens.

    ``residual[s]``: (B, L, D) the residual stream entering block ``s`` (``residual[0]`` =
    ``lm.input``, ``residual[N]`` the last block's output; on an architecture that adds to the
    stream between blocks, block s − 1's output before the addition, as ``lm.blocks.{s-1}``; with
    S streams (B, L, S·D) after ``lm.input``). ``kwargs[j]``: block j's recorded
    keyword arguments (:data:`RESUME_KWARGS` and the adapter's ``token_inputs``; as the hooks saw
    them, i.e. after every edit of the run). ``kv[j]``: block j's (keys, values), each
    (B, kv_heads, L, head_dim) (a block that reuses another's: that block's); None for a block
    without attention (a recurrent one, which :func:`resume` re-runs from position 0). ``reach``: (B, L)
    the last key position each query attends to in any attention block (from the masks; a
    recurrent block is causal), for
    :meth:`prefix`. ``logits``: (B, V) last-position logits of the run. ``injected[j]``: (B, L, D)
    what the text model added to block j's output before block j + 1 (the adapter's
    :meth:`~interp.adapters.Adapter.injections`, zero outside the image positions), None where
    nothing is (every block of most architectures). ``entry``: (B, L, …) the adapter's
    ``entry_site`` values (what block 0's input is made of besides ``lm.input``), None without one."""
    residual: list[torch.Tensor]
    kwargs: list[dict[str, Any]]
    kv: list[tuple[torch.Tensor, torch.Tensor] | None]
    reach: torch.Tensor
    logits: torch.Tensor
    injected: list[torch.Tensor | None] = field(default_factory=list)
    entry: torch.Tensor | None = None

    @property
    def layers(self) -> int:
        return len(self.kwargs)

    def prefix(self, row: int, first: int) -> int:
        """The longest prefix [0, P) with P ≤ ``first`` whose queries attend to no key at or after
        P in any block: positions before P are unchanged by any change at ``first`` or later. On a
        causal LM P = ``first``; inside a Gemma3 image (bidirectional) P is the image's start."""
        if first <= 0:
            return 0
        reach = self.reach[row, :first].cummax(0).values  # furthest key any query < q+1 attends to
        ok = torch.nonzero(reach < torch.arange(1, first + 1, device=reach.device)).flatten()
        return int(ok[-1]) + 1 if len(ok) else 0

    def same_inputs(self, a: int, b: int, start: int, injected: bool = True, skip: tuple[str, ...] = ()) -> bool:
        """Rows ``a`` and ``b`` give blocks ``start``… equal keyword arguments (masks, rotary, ids;
        not those named in ``skip``) and (``injected``) get equal additions between them."""
        for kw in self.kwargs[start:]:
            for name, v in kw.items():
                if name in skip:
                    continue
                for t in (v if isinstance(v, tuple) else (v,)):
                    d = _batch_dim(name, t) if isinstance(t, torch.Tensor) else 0
                    if isinstance(t, torch.Tensor) and t.shape[d] > 1 and not torch.equal(t.select(d, a),
                                                                                            t.select(d, b)):
                        return False
        for x in (self.injected[max(0, start - 1):] if injected else ()):  # added before block start and after
            if x is not None and not torch.equal(x[a], x[b]):
                return False
        return True

    def injection(self, j: int, rows: torch.Tensor, p: int) -> torch.Tensor | None:
        """(R, L − p, D) what is added after block ``j`` for the run's rows ``rows``, positions p…"""
        x = self.injected[j] if j < len(self.injected) else None
        return None if x is None else x.index_select(0, rows.to(x.device))[:, p:]


def _batch_dim(name: str, t: torch.Tensor) -> int:
    """The row axis of a recorded block input ``name``: masks (B, 1, Lq, Lk), ids (B, L) and
    rotary pairs (B, L, hd) have it first; M-RoPE ids (3, B, L) and rotaries (3, B, L, hd) second."""
    if name == "position_ids":
        return 1 if t.dim() == 3 else 0
    if name == "position_embeddings":
        return 1 if t.dim() == 4 else 0
    return 0


def capture_lm(lvlm, inputs, interventions: Sequence = (), edits: dict[str, Edit] | None = None,
               cache: Sequence[str] = ()) -> tuple[Trace, LMStates]:
    """One forward recording what :func:`resume` needs (see :class:`LMStates`), plus ``cache``.
    Returns (the run's :class:`Trace`, its :class:`LMStates`)."""
    impl = lvlm.model.config.text_config._attn_implementation
    if impl not in RESUMABLE_IMPLS:
        raise SpatialBiasError(f"resuming LM blocks needs tensor attention masks; the {impl!r} attention "
                               "implementation has none: load the model with attn_implementation='sdpa' or 'eager'")
    a = lvlm.adapter
    n = a.layer_count(lvlm.model, "lm")
    inputs = validate(lvlm, inputs)
    res_sites = ["lm.input"] + [f"lm.blocks.{j}" for j in range(n)]
    tok = a.token_inputs(lvlm.model)
    names = (*RESUME_KWARGS, *tok)
    kw_sites = [f"lm.blocks.{j}#{k}" for j in range(n) for k in names]
    inj = a.injections(lvlm.model)
    inj_sites = [s for s in dict.fromkeys(inj.values()) if s not in cache]
    entry = [a.entry_site(lvlm.model)] if a.entry_site(lvlm.model) else []
    t = forward(lvlm, inputs, interventions, edits=edits, cache=[*res_sites, *kw_sites, *inj_sites, *entry, *cache],
                kv=True, last_only=True)
    kwargs = [{k: t.cache.pop(f"lm.blocks.{j}#{k}") for k in names} for j in range(n)]
    residual = [t.cache.pop(s) if s not in cache else t.cache[s] for s in res_sites]
    feats = {s: (t.cache.pop(s) if s in inj_sites else t.cache[s]) for s in dict.fromkeys(inj.values())}
    mask = lvlm.image_mask(inputs["input_ids"])
    injected = [injected_at(feats[inj[j]], mask, residual[0]) if j in inj else None for j in range(n)]
    B, L = residual[0].shape[:2]
    reach = torch.arange(L, device=residual[0].device).expand(B, L).clone()
    seen = set()
    att = set(lvlm.adapter.attention_layers(lvlm.model))
    for j, kw in enumerate(kwargs):
        m = kw["attention_mask"]
        if j not in att or m is None or id(m) in seen:  # a recurrent layer's (B, L) padding mask: causal
            continue  # no mask: causal (what SDPA is given when nothing is padded)
        seen.add(id(m))
        allowed = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
        L_k = allowed.shape[-1]
        last = torch.where(allowed.any(1), torch.arange(L_k, device=m.device), -1).amax(-1)  # (B|1, Lq)
        reach = torch.maximum(reach, last.to(reach.device).expand(B, L))
    part = t.cache.pop(entry[0]) if entry else None
    return t, LMStates(residual, kwargs, list(t.kv or []), reach, t.logits[:, -1], injected, part)


def injected_at(feat: torch.Tensor | None, image_mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor | None:
    """(B, L, D) zeros with ``feat`` (the batch's image tokens in sequence order, (T, D)) at the
    image positions: what an adapter's injection adds between two LM blocks."""
    if feat is None:
        return None
    out = torch.zeros_like(like)
    out[image_mask.to(out.device)] = feat.reshape(-1, out.shape[-1]).to(out.device, out.dtype)
    return out


class _Prefix:
    """A KV cache holding one block's keys and values of the positions before the resumed ones:
    ``update`` returns them with the new positions' appended (it keeps nothing)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values = keys, values

    def update(self, keys, values, layer_idx=None, *args, **kwargs):
        self.full = (torch.cat([self.keys.to(keys.device, keys.dtype), keys], -2),
                     torch.cat([self.values.to(values.device, values.dtype), values], -2))
        return self.full


def _rows_of(name: str, t, rows: torch.Tensor, p: int):
    """Recorded block input ``name`` for the rows ``rows`` and query positions p…: row axis
    gathered (unless it broadcasts), token axis sliced (a mask's query axis)."""
    if t is None:
        return None
    if isinstance(t, tuple):
        return tuple(_rows_of(name, x, rows, p) for x in t)
    d = _batch_dim(name, t)
    if t.shape[d] > 1:
        t = t.index_select(d, rows.to(t.device))
    return t[..., p:] if name == "position_ids" else t[..., p:, :]


def resume(lvlm, states: LMStates, rows: torch.Tensor, start: torch.Tensor, hidden: torch.Tensor | list,
           p: int, injected: dict[int, torch.Tensor] | None = None,
           inputs: dict[int, dict[str, torch.Tensor]] | None = None,
           kv: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
    """Last-position logits of runs that continue an unpatched run from a block on.

    Row r continues the run's row ``rows[r]`` with ``hidden[r]`` (Lq = L − p positions p…) as the
    residual entering block ``start[r]`` (N: after the last block): width D, or S·D for an LM of S
    streams, whose rows starting at block 0 hold ``lm.input`` (D) — ``hidden`` is then a list of
    per-row tensors — and enter through the adapter's :meth:`~interp.adapters.Adapter.enter`
    (block 0's input and the per-token block inputs it derives, as the text model makes them).
    Blocks before it are not
    run; positions before ``p`` are not recomputed: every block reads their keys and values from
    ``states.kv``, so ``p`` must not exceed :meth:`LMStates.prefix` of any row's first changed
    position. Masks, rotary embeddings and ids are the run's own (``states.kwargs``), sliced to
    the resumed queries. A recurrent block (a hybrid LM's Gated DeltaNet: not among the adapter's
    :meth:`~interp.adapters.Adapter.attention_layers`) has no keys and values to reuse: it is run
    over all L positions, the run's own input before p, then the resumed rows (exact, at the cost
    of the prefix). What the text model adds between blocks (``states.injected``: DeepStack)
    is added after each block as in the run — after block ``start`` − 1 too, since ``hidden`` is
    that block's output as ``lm.blocks.{start-1}`` holds it; ``injected`` replaces it per block
    for all R rows ((R, L − p, D): a patched vision side's). ``inputs`` replaces recorded per-token
    block inputs (the adapter's ``token_inputs``) per block for all R rows ((R, L − p, …): a
    residual patch's carried ones). A block that reuses another's keys and values
    (:meth:`~interp.adapters.Adapter.kv_sources`) gets the ones that block made in this run for the
    rows that ran it, for the others the run's own or ``kv[s]`` ((R, kv_heads, L, head_dim) per
    source block s: a residual patch's carried ones). Rows must be sorted by ``start``.
    Returns (R, V).
    """
    a, model = lvlm.adapter, lvlm.model
    n = states.layers
    order = start.tolist()
    if order != sorted(order):
        raise SpatialBiasError("resume: rows must be sorted by their start block")
    hidden = list(hidden)
    R, L = len(order), states.residual[0].shape[1]
    blocks = [a.module(model, f"lm.blocks.{j}") for j in range(n)]
    att = set(a.attention_layers(model))
    S, sources, ran, tok = a.streams(model), a.kv_sources(model), {}, a.token_inputs(model)
    h, entered = None, None
    extra = a.block_kwargs(model)
    with cpu_attention_guard(lvlm):
        for j in range(min(order), n):
            k = sum(1 for s in order if s <= j)  # rows that have joined by block j
            h = _join(h, hidden, k)
            if j == 0:
                part = None if states.entry is None else states.entry.index_select(0, rows[:k].to(
                    states.entry.device))[:, p:].to(h.device)
                h, entered = a.enter(model, h, part)
            if j > 0:
                h = _inject(h, states, injected, j - 1, rows, p)
            if j not in att:  # a recurrent layer: its state at p summarises the whole prefix, so run it from 0
                h = _from_start(blocks[j], states, j, rows[:k], h, p)
                continue
            kw = {name: _rows_of(name, v, rows[:k], p) for name, v in states.kwargs[j].items()}
            kw.update(_token_inputs(tok, kw, inputs, entered, j, k))
            if kw.get("attention_mask") is None:  # SDPA got no mask (nothing padded): causal, made explicit
                q = torch.arange(p, L, device=h.device)[:, None]
                kw["attention_mask"] = (torch.arange(L, device=h.device)[None] <= q)[None, None]
            K, V = states.kv[j]
            cache = _Prefix(K.index_select(0, rows[:k].to(K.device))[:, :, :p],
                            V.index_select(0, rows[:k].to(V.device))[:, :, :p])
            more = a.reused_kv_kwargs(model, j, *_reused(states, sources[j], ran, rows[:k], kv)) if j in sources else {}
            x = a.split_streams(h, S) if S > 1 else h
            out = blocks[j](x, cache=cache, **kw, **{**extra, **more})
            h = out[0] if isinstance(out, tuple) else out
            h = a.merge_streams(h) if S > 1 else h
            if getattr(cache, "full", None) is not None:
                ran[j] = cache.full
    h = _join(h, hidden, R)
    h = _inject(h, states, injected, n - 1, rows, p)
    norm = a.module(model, "lm.final_norm")
    head = a.module(model, "unembed")
    logits = head(norm(a.readout(model, h[:, -1:])))[:, -1]
    cap = getattr(getattr(model.config, "text_config", model.config), "final_logit_softcapping", None)
    return cap * torch.tanh(logits / cap) if cap else logits  # as the model's forward (Gemma4: 30)


def _token_inputs(names: tuple[str, ...], kw: dict, inputs, entered, j: int, k: int) -> dict:
    """Block ``j``'s per-token inputs ``names`` (the adapter's ``token_inputs``) for the first ``k`` resumed
    rows: the recorded ones (in ``kw``), replaced by ``inputs[j]`` (all rows) where given, and for
    the rows that entered at block 0 by what :meth:`~interp.adapters.Adapter.enter` derived."""
    out = {}
    for name in names:
        x = inputs[j][name][:k].to(kw[name].device, kw[name].dtype) if inputs and j in inputs else kw[name]
        if entered is not None:
            new = entered[j][name]
            x = torch.cat([new.to(x.device, x.dtype), x[len(new):]], 0)
        out[name] = x
    return out


def _reused(states: LMStates, s: int, ran: dict, rows: torch.Tensor, kv=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values), each (k, kv_heads, L, head_dim), that block ``s`` made for the resumed rows
    ``rows`` (k,): this run's for the rows that ran block ``s`` (the first ones), the recorded run's
    (or ``kv[s]``'s first k rows) for the rows that joined after it."""
    if kv and s in kv:
        K, V = kv[s][0][:len(rows)], kv[s][1][:len(rows)]
    else:
        K, V = (t.index_select(0, rows.to(t.device)) for t in states.kv[s])
    if s in ran:
        k_s = ran[s][0].shape[0]
        K = torch.cat([ran[s][0].to(K.device, K.dtype), K[k_s:]], 0)
        V = torch.cat([ran[s][1].to(V.device, V.dtype), V[k_s:]], 0)
    return K, V


def _from_start(block: torch.nn.Module, states: LMStates, j: int, rows: torch.Tensor, h: torch.Tensor,
                p: int) -> torch.Tensor:
    """(k, L − p, D): recurrent block ``j`` (no keys and values to reuse: Gated DeltaNet's conv and
    recurrent states at p depend on every earlier token) run over all L positions — the run's own
    input to it (``states.residual[j]`` plus what was added after block j − 1) at positions before
    ``p``, unchanged by any change at p or later (the layer is causal), then ``h`` (k, L − p, D) —
    with the run's (B, L) padding mask and rotary pair gathered to ``rows`` (k,), not sliced; its
    outputs at positions p… are kept."""
    pre = states.residual[j].index_select(0, rows.to(states.residual[j].device))[:, :p]
    if j > 0:
        add = states.injection(j - 1, rows, 0)
        if add is not None:
            pre = pre + add[:, :p].to(pre.device, pre.dtype)
    kw = {name: _rows_of(name, v, rows, 0) for name, v in states.kwargs[j].items()}
    out = block(torch.cat([pre.to(h.device, h.dtype), h], 1), cache=None, **kw)
    return (out[0] if isinstance(out, tuple) else out)[:, p:]


def _inject(h: torch.Tensor, states: LMStates, injected: dict[int, torch.Tensor] | None, j: int, rows: torch.Tensor,
            p: int) -> torch.Tensor:
    """``h`` (the first k resumed rows after block ``j``) plus what the run added there."""
    add = injected.get(j) if injected else None
    if add is None:
        add = states.injection(j, rows[:h.shape[0]], p)
    if add is None:
        return h
    return h + add[:h.shape[0]].to(h.device, h.dtype)


def _join(h: torch.Tensor | None, hidden: list, k: int) -> torch.Tensor:
    """``h`` (rows already running) with rows len(h)…k of ``hidden`` (per-row tensors) appended."""
    if h is None:
        return torch.stack(hidden[:k])
    if k > h.shape[0]:
        return torch.cat([h, torch.stack(hidden[h.shape[0]:k]).to(h.device, h.dtype)], 0)
    return h
