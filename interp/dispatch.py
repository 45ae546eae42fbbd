"""The one dispatcher: every runner (``LVLM.run``, ``generate``, ``trace``, patching, attribution,
attention flow) runs the model's own forward through :func:`forward`, which resolves sites with
:mod:`interp.sites` and installs one PyTorch hook per (module, input/output) for the run.

* Edits (site → ``fn(value) -> value``) and caches act at the same point of the same call, so
  an edit and a cache of one site see one tensor, in every runner; an edit of a tuple output's
  first element is completed by the adapter (``Adapter.complete_output``: a MoE router's choice).
* Repeated calls of a module within one forward are counted (and named by the adapter where it
  can: Gemma3's rotary per layer type); ``SITE@k`` addresses one call; an un-addressed edit acts
  on every call; an un-addressed cache of a module called twice is refused with one line.
* Edit hooks run before any other hook on the module (transformers 5 records ``hidden_states``
  with forward hooks of its own; LLaVA reads its image features from that record, so an edit
  that ran after it would silently do nothing on ``vision.blocks.{i}``).
* ``.attn.pattern`` sites switch the LM to ``"spatialbias"`` attention for the run: the module's
  own eager attention function (found in the module's file), with the softmaxed weights passed
  through the site's hook; when an edit changes them the output is recomputed from them.
* Nothing is remembered between runs (no forward-order cache): each run installs, removes its hooks.
* Generation (``max_new_tokens > 0``): greedy, KV-cached, explicit position ids at every step;
  each intervention gives its decode-step edits (:meth:`interp.Intervention.decode_edits`) or
  refuses; caches hold one entry per forward (prefill, then each decode step).
"""
from __future__ import annotations

from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from interp.attention_kernels import (PATTERN_IMPL, _PATTERN_HOOKS, _register_pattern_kernel,  # noqa: F401
                                      attention_implementation, cpu_attention_guard)
from interp.batch import Batch, validate
from interp.hook_io import _file_name, _positional_index, layer_kv, to_file
from spatialbias.errors import SpatialBiasError
from interp.sites import Site, resolve

Edit = Callable[[Any], Any]


def then(edits: dict[str, Edit], more: dict[str, Edit]) -> dict[str, Edit]:
    """``edits`` with ``more`` added: at a site holding both, ``more``'s edit runs on the output of
    the one already there. Returns a new dict."""
    out = dict(edits)
    for site, fn in more.items():
        prev = out.get(site)
        out[site] = fn if prev is None else (lambda x, f=fn, g=prev: f(g(x)))
    return out


@dataclass
class Trace:
    """What a run returns. ``logits``: (B, L, V) (or (B, 1, V) with ``last_only``); for a
    generation (B, N, V), the logits that chose each of the N new tokens. ``tokens``: (B, N)
    generated ids (None without generation; ``logits`` is None for a run stopped early). ``cache``: site name → value in the site's
    documented shape (``positions="image"``: (n_patches, …) in image raster order; a ``reduce``
    function's output where one was given); for a generation, a list with one value per forward
    (prefill, then each decode step). ``batch``: the validated, prepared inputs that ran.
    ``kv``: with ``kv=True``, per LM layer the (keys, values) its attention used, each
    (B, kv_heads, L, head_dim) after the rotary embedding (None: a hybrid LM's recurrent layer)."""
    logits: torch.Tensor | None
    cache: dict[str, Any] = field(default_factory=dict)
    tokens: torch.Tensor | None = None
    batch: Batch | None = None
    kv: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None


# ------------------------------------------------------------------------------------------------
# hooks


class _Run:
    """The hooks of one run (a forward, or a generation's forwards): per site its edit and/or
    cache, call counting per module, values collected per forward."""

    def __init__(self, lvlm, batch: Batch, edits: dict[str, Edit], cache: Sequence[str],
                 positions: str | None, reduce: dict[str, Callable] | None, to_cpu: bool, grad: bool,
                 later: Sequence[str] = (), to_disk: str | None = None):
        self.lvlm, self.batch = lvlm, batch
        names = list(dict.fromkeys([*edits, *cache, *later]))  # later: sites edited on decode steps only
        self.sites: dict[str, Site] = {n: resolve(lvlm.adapter, lvlm.model, n) for n in names}
        self.edits, self.cache = dict(edits), list(dict.fromkeys(cache))
        self.reduce, self.to_cpu, self.grad = reduce or {}, to_cpu, grad
        self.to_disk = None if to_disk is None else Path(to_disk)
        self.positions = positions
        if positions not in (None, "image"):
            raise SpatialBiasError(f"positions={positions!r}: use None (all) or 'image'")
        if positions == "image":
            bad = [n for n in self.cache if self.sites[n].tokens is None]
            if bad:
                raise SpatialBiasError(f"positions='image' needs sites with a token axis; {', '.join(bad)} "
                                       "have none: cache them with positions=None")
        self._order: dict[str, torch.Tensor] = {}
        self.values: dict[str, list] = {n: [] for n in self.cache}
        self.fired: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self.step_edits: dict[str, Edit] = self.edits
        self.stop = False
        self.leaves = False

    @property
    def needs_pattern_kernel(self) -> bool:
        return any(s.hook == "pattern" for s in self.sites.values())

    # -- matching a call to its sites
    def _matching(self, path: str, kind: str, args, kwargs) -> list[Site]:
        k = self.calls.get(f"{kind}:{path}", 0)
        self.calls[f"{kind}:{path}"] = k + 1
        out = []
        for s in self.groups[(kind, path)]:
            if s.call is None or s.call == k:
                out.append(s)
            elif isinstance(s.call, str) and s.call == self.lvlm.adapter.call_label(s.canonical.split("#")[0], args,
                                                                                     kwargs):
                out.append(s)
        return out

    def _visit(self, site: Site, value):
        """Apply the site's edit (if any) to ``value``, then record it (if cached). A block state
        of S > 1 streams (S, B, L, D) is seen as (B, L, S·D) by both (:meth:`Adapter.streams`)."""
        if site.streams > 1 and isinstance(value, torch.Tensor):
            # an edited or leaf-made view goes on in the forward; else HF's tensor does, untouched
            native, edited = value, site.name in self.step_edits or (self.leaves and site.name in self.values)
            value = self._visit_view(site, self.lvlm.adapter.merge_streams(value))
            return self.lvlm.adapter.split_streams(value, site.streams) if edited else native
        return self._visit_view(site, value)

    def _visit_view(self, site: Site, value):
        name = site.name
        fn = self.step_edits.get(name)
        if fn is not None:
            new = fn(value)
            if isinstance(value, torch.Tensor) and (not isinstance(new, torch.Tensor) or new.shape != value.shape):
                raise SpatialBiasError(f"the edit at {name} returned {_shape(new)} for a {_shape(value)} tensor; "
                                       "an edit must keep the shape")
            value = new
            self.fired[name] = self.fired.get(name, 0) + 1
        if name in self.values:
            if self.leaves and isinstance(value, torch.Tensor) and value.is_floating_point() \
                    and not value.requires_grad:
                value = value.detach().requires_grad_(True)  # the graph starts here (parameters frozen)
            if site.call is None and len(self.values[name]) > self._forward_index:
                raise SpatialBiasError(f"{name} runs more than once per forward on {self.lvlm.adapter.name}; "
                                       f"name one call to cache it: {_call_names(name, self.lvlm)}")
            self.values[name].append(self._keep(site, value))
            if self.stop and all(len(v) > self._forward_index for v in self.values.values()):
                raise _Stop
        return value

    def _keep(self, site: Site, value):
        if site.name in self.reduce:
            value = self.reduce[site.name](value)
        elif self.positions == "image" and isinstance(value, torch.Tensor):
            value = self._image_tokens(site, value)
        name = f"{site.name}.{self._forward_index}"
        if isinstance(value, tuple):
            return tuple(self._detach(v, f"{name}.{k}") for k, v in enumerate(value))
        return self._detach(value, name)

    def _detach(self, v, name: str = ""):
        if not isinstance(v, torch.Tensor):
            return v
        if not self.grad:
            v = v.detach()
        if self.to_disk is not None:
            return to_file(v, self.to_disk / f"{_file_name(name)}.bin")
        return v.cpu() if self.to_cpu and not self.grad else v

    def _image_tokens(self, site: Site, x: torch.Tensor) -> torch.Tensor:
        """(n_patches, …) the site's patch tokens in image raster order."""
        if site.name not in self._order:
            self._order[site.name] = self.lvlm.token_map(self.batch, site.canonical).raster_order().to(x.device)
        width = 2 if site.heads else 1
        return x.reshape(-1, *x.shape[x.dim() - width:])[self._order[site.name]]

    # -- hooks
    def install(self) -> list:
        from interp.adapters.base import get_module
        self.groups: dict[tuple[str, str], list[Site]] = {}
        for s in self.sites.values():
            self.groups.setdefault(s.event, []).append(s)
        handles = [self.lvlm.model.register_forward_pre_hook(self._new_forward, prepend=True)]
        for (kind, path), sites in self.groups.items():
            mod = get_module(self.lvlm.model, path)
            if kind == "output":
                handles.append(mod.register_forward_hook(self._output_hook(path, sites), prepend=True, with_kwargs=True))
            elif kind == "input":
                handles.append(mod.register_forward_pre_hook(self._input_hook(path, sites), prepend=True,
                                                             with_kwargs=True))
            else:
                _PATTERN_HOOKS[id(mod)] = self._pattern_hook(path, mod)
                handles.append(_Unregister(id(mod)))
        return handles

    def _new_forward(self, _mod, _args):
        self.calls.clear()

    def _output_hook(self, path, sites):
        def hook(_mod, args, kwargs, out):
            matching = self._matching(path, "output", args, kwargs)
            if not matching:
                return None
            for s in matching:
                if s.whole or not isinstance(out, tuple):
                    out = self._visit(s, out)
                else:  # an edited first element: the adapter completes what follows from it
                    out = (self._visit(s, out[0]),) + tuple(out[1:])
                    out = self.lvlm.adapter.complete_output(self.lvlm.model, path, out) if s.name in self.step_edits else out
            return out
        return hook

    def _input_hook(self, path, sites):
        def hook(_mod, args, kwargs):
            matching = self._matching(path, "input", args, kwargs)
            if not matching:
                return None
            args, kwargs = tuple(args), dict(kwargs)
            for s in matching:
                if s.hook == "kwarg":
                    i = None if s.key in kwargs else _positional_index(_mod, s.key)
                    if i is not None and i < len(args):  # an argument the caller passed by position
                        args = args[:i] + (self._visit(s, args[i]),) + args[i + 1:]
                    else:
                        kwargs[s.key] = self._visit(s, kwargs.get(s.key))
                    continue
                if args:
                    x = args[0]
                else:
                    k = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
                    x = kwargs[k]
                if s.heads:
                    shape = x.shape
                    x = self._visit(s, x.reshape(*shape[:-1], s.heads, shape[-1] // s.heads)).reshape(shape)
                else:
                    x = self._visit(s, x)
                if args:
                    args = (x,) + args[1:]
                else:
                    kwargs[k] = x
            return args, kwargs
        return hook

    def _pattern_hook(self, path, mod):
        def hook(weights):
            out = weights
            for s in self._matching(path, "pattern", (), {}):
                out = self._visit(s, out)
            return out
        return hook

    # -- forwards
    def begin_forward(self, index: int, edits: dict[str, Edit]) -> None:
        self._forward_index = index
        self.step_edits = edits
        self.fired.clear()

    def end_forward(self) -> None:
        for name in self.step_edits:
            if name in self.sites and not self.fired.get(name):
                raise SpatialBiasError(f"the edit at {name} never ran in this forward (the module was not "
                                       "called, or no call matched): it would silently do nothing")
        for name in self.cache:
            if len(self.values[name]) <= self._forward_index:
                raise SpatialBiasError(f"{name} did not run in this forward (e.g. a vision site on a text-only "
                                       "input, or a call index that does not occur); nothing to cache")


class _Stop(Exception):
    """Raised by a hook once every cached site of a ``stop=True`` run has been recorded."""


class _Unregister:
    def __init__(self, key):
        self.key = key

    def remove(self):
        _PATTERN_HOOKS.pop(self.key, None)


def _shape(x) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def _call_names(name: str, lvlm) -> str:
    """How to address one call of a module that runs more than once per forward: the names its
    adapter gives the calls (:meth:`interp.adapters.Adapter.calls`, e.g. one rotary call per layer
    type) or their indices."""
    named = [c for c in lvlm.adapter.calls(lvlm.model, name) if c != name]
    if named:
        return ", ".join(named) + " or " + ", ".join(f"{name}@{i}" for i in range(len(named)))
    return f"{name}@0, {name}@1, …"


# ------------------------------------------------------------------------------------------------
# the runner


def forward(lvlm, inputs, interventions: Sequence = (), *, edits: dict[str, Edit] | None = None,
            cache: Sequence[str] = (), positions: str | None = None, reduce: dict[str, Callable] | None = None,
            to_cpu: bool = False, grad: bool = False, last_only: bool = False, max_new_tokens: int = 0,
            to_disk: str | None = None, kv: bool = False, stop: bool = False, leaves: bool = False) -> Trace:
    """One run of the model's own forward (or a greedy generation) with interventions, edits and caches.

    Args:
        inputs: processor inputs or a :class:`interp.batch.Batch` (validated here: right padding
            is converted, padding holes and image/marker mismatches refused).
        interventions: applied in order (their input rewrites, then their site edits).
        edits: site → ``fn(value) -> value``, after the interventions' edits at that site; with
            generation an edit sees every forward (the prompt, then each one-token decode step).
        cache: site names to record; positions: ``"image"`` keeps only patch tokens, in image
            raster order; reduce: site → ``fn(value)`` applied before storing (memory stays bounded).
        to_cpu: move cached values to the CPU as they are recorded (not with ``grad``).
        to_disk: a folder: write each cached tensor there as it is recorded and keep a
            memory-mapped view of the file instead (``{site}.{forward}.bin``; not with ``grad``).
        kv: also return every LM layer's attention keys and values (:attr:`Trace.kv`).
        stop: end the forward as soon as every cached site has been recorded (``logits`` None):
            e.g. ``cache=["lm.input"]`` runs the vision side and the embedding scatter only.
        leaves: with ``grad``, a cached site's value that does not require grad becomes a leaf
            that does, so gradients reach the sites when the parameters are frozen (attribution:
            autograd then keeps only what the sites' gradients need, not the weights' inputs).
        grad: keep the autograd graph (attribution); default runs under ``no_grad``.
        last_only: logits of the last position only, (B, 1, V).
        max_new_tokens: > 0 generates that many tokens greedily (see :class:`Trace`).
    """
    batch = validate(lvlm, inputs)
    if max_new_tokens < 0:
        raise SpatialBiasError(f"max_new_tokens={max_new_tokens}: use 0 (one forward) or more")
    if max_new_tokens and batch.get("position_ids") is None:
        batch = batch.replace(position_ids=lvlm.adapter.generation_position_ids(lvlm.model, batch))
    batch, iv_edits = lvlm.prepare(batch, interventions)
    later = list(_decode_edits(lvlm, batch, interventions, 1, edits or {})) if max_new_tokens > 1 else []
    if (stop or kv) and max_new_tokens:
        raise SpatialBiasError("stop / kv apply to one forward; not with max_new_tokens")
    if stop and not cache:
        raise SpatialBiasError("stop=True ends the forward once the cached sites are recorded: give cache=[...]")
    if to_disk is not None and grad:
        raise SpatialBiasError("to_disk writes cached values to files; it cannot keep their autograd graph (grad=True)")
    run = _Run(lvlm, batch, then(iv_edits, edits or {}), cache, positions, reduce, to_cpu, grad, later, to_disk)
    run.stop = stop
    run.leaves = leaves and grad
    handles = run.install()
    impl = PATTERN_IMPL if run.needs_pattern_kernel else None
    try:
        with torch.set_grad_enabled(grad), attention_implementation(lvlm.model, impl), cpu_attention_guard(lvlm):
            if not max_new_tokens:
                run.begin_forward(0, run.edits)
                kw = lvlm.adapter.last_logits(lvlm.model, batch["input_ids"].shape[1]) if last_only else {}
                if kv:
                    kw.update(cache=lvlm.adapter.kv_cache(lvlm.model), use_cache=True)
                else:
                    kw["use_cache"] = False
                try:
                    out = lvlm.model(**batch, **kw)
                except _Stop:
                    return Trace(None, {n: v[0] for n, v in run.values.items()}, batch=batch)
                run.end_forward()
                keys = layer_kv(lvlm, out.cache) if kv else None
                return Trace(out.logits, {n: v[0] for n, v in run.values.items()}, batch=batch, kv=keys)
            logits, tokens = _generate(lvlm, batch, interventions, run, max_new_tokens, edits or {})
            return Trace(logits, dict(run.values), tokens=tokens, batch=batch)
    finally:
        for h in handles:
            h.remove()


def _decode_edits(lvlm, batch: Batch, interventions, step: int, user_edits: dict[str, Edit]) -> dict[str, Edit]:
    """The edits of decode step ``step`` (1, 2, …): each intervention's, then the user's."""
    out: dict[str, Edit] = {}
    for iv in interventions:
        out = then(out, iv.decode_edits(lvlm, batch, step))
    return then(out, user_edits)


def _generate(lvlm, batch: Batch, interventions, run: _Run, n: int, user_edits: dict[str, Edit]):
    """Greedy decoding with a KV cache. Position ids: the prompt's (the batch's), then for decode
    step k the last prompt id + k on every row (all three rows on M-RoPE), derived from the prompt,
    no counter. Returns (step logits (B, n, V), tokens (B, n))."""
    mask = batch["attention_mask"]
    pos = batch["position_ids"]
    run.begin_forward(0, run.edits)
    out = lvlm.model(**batch, use_cache=True, **lvlm.adapter.last_logits(lvlm.model, batch["input_ids"].shape[1]))
    run.end_forward()
    step_logits, tok = [out.logits[:, -1]], out.logits[:, -1].argmax(-1)
    kv, new, last = out.cache, [tok], pos[..., -1]
    for k in range(1, n):
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        step = {"input_ids": tok[:, None], "attention_mask": mask, "position_ids": (last + k).unsqueeze(-1)}
        dec_edits = _decode_edits(lvlm, batch, interventions, k, user_edits)
        unknown = set(dec_edits) - set(run.sites)
        if unknown:
            raise SpatialBiasError(f"decode step {k} edits {', '.join(sorted(unknown))}, which step 1 did not: "
                                   "an intervention's decode edits must keep their sites")
        run.begin_forward(k, dec_edits)
        out = lvlm.model(**step, cache=kv, use_cache=True)
        run.end_forward()
        kv, tok = out.cache, out.logits[:, -1].argmax(-1)
        step_logits.append(out.logits[:, -1])
        new.append(tok)
    return torch.stack(step_logits, 1), torch.stack(new, 1)
