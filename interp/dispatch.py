"""The one dispatcher: every runner (``LVLM.run``, ``generate``, ``trace``, patching, attribution,
attention flow) runs the model's own forward through :func:`forward`, which resolves sites with
:mod:`interp.sites` and installs one PyTorch hook per (module, input/output) for the run.

* Edits (site → ``fn(value) -> value``) and caches act at the same point of the same call, so
  an edit and a cache of one site see one tensor, in every runner.
* Repeated calls of a module within one forward are counted (and named by the adapter where it
  can: Gemma3's rotary per layer type); ``SITE@k`` addresses one call; an un-addressed edit acts
  on every call; an un-addressed cache of a module called twice is refused with one line.
* Edit hooks run before any other hook on the module (transformers 5 records ``hidden_states``
  with forward hooks of its own; LLaVA reads its image features from that record, so an edit
  that ran after it would silently do nothing on ``vision.blocks.{i}``).
* ``.attn.pattern`` sites switch the LM to ``"spatialbias"`` attention for the run: the module's
  own eager attention function (found in the module's file), with the softmaxed weights passed
  through the site's hook; when an edit changes them the output is recomputed from them.
* Nothing is remembered between runs (no forward-order cache): each run installs and removes
  its hooks.
* Generation (``max_new_tokens > 0``): greedy, KV-cached, explicit position ids at every step;
  each intervention gives its decode-step edits (:meth:`interp.Intervention.decode_edits`) or
  refuses; caches hold one entry per forward (prefill, then each decode step).
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from interp.batch import Batch, validate
from spatialbias.errors import SpatialBiasError
from interp.sites import Site, resolve

Edit = Callable[[Any], Any]
PATTERN_IMPL = "spatialbias"
_PATTERN_HOOKS: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {}


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
    (B, kv_heads, L, head_dim) after the rotary embedding."""
    logits: torch.Tensor | None
    cache: dict[str, Any] = field(default_factory=dict)
    tokens: torch.Tensor | None = None
    batch: Batch | None = None
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None


# ------------------------------------------------------------------------------------------------
# the attention kernel that exposes (and lets a hook replace) the softmaxed pattern


def _pattern_attention(module, query, key, value, attention_mask, **kwargs):
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise SpatialBiasError(f"{type(module).__name__} has no eager attention function in its module; "
                               "attention-pattern sites are not available for it")
    out, weights = eager(module, query, key, value, attention_mask, **kwargs)
    hook = _PATTERN_HOOKS.get(id(module))
    if hook is not None:
        new = hook(weights)
        if new is not weights:
            v = value.repeat_interleave(query.shape[1] // value.shape[1], 1)  # grouped-query heads
            out = torch.matmul(new.to(v.dtype), v).transpose(1, 2).contiguous()
            weights = new
    return out, weights


def _register_pattern_kernel() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    AttentionInterface.register(PATTERN_IMPL, _pattern_attention)
    AttentionMaskInterface.register(PATTERN_IMPL, eager_mask)


_register_pattern_kernel()


@contextmanager
def attention_implementation(model: torch.nn.Module, impl: str | None) -> Iterator[None]:
    """Switch the LM's attention implementation for one block of code (None: leave it)."""
    if impl is None:
        yield
        return
    tc = model.config.text_config
    before = tc._attn_implementation
    tc._attn_implementation_internal = impl
    try:
        yield
    finally:
        tc._attn_implementation_internal = before


@contextmanager
def cpu_attention_guard(lvlm) -> Iterator[None]:
    """torch 2.13's CPU flash-attention kernel packs bfloat16 with AVX-512 instructions and fails
    ("pack_vnni2 is only supported when avx512 is supported") on a CPU without them (ATen
    capability AVX2 or DEFAULT: most AMD EPYC before Zen 4, desktop CPUs) once a sequence has 64
    tokens. There, a bf16 model's attention runs on SDPA's math kernel instead (same formula;
    every other case is left alone)."""
    dtype = getattr(lvlm.model, "dtype", None)
    if lvlm.device.type != "cpu" or dtype != torch.bfloat16 or torch.backends.cpu.get_cpu_capability() == "AVX512":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel([SDPBackend.MATH]):
        yield


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
        """Apply the site's edit (if any) to ``value``, then record it (if cached)."""
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
                else:
                    out = (self._visit(s, out[0]),) + tuple(out[1:])
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


def _shape(x) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def _call_names(name: str, lvlm) -> str:
    if name.split("@")[0] == "lm.rotary" and lvlm.adapter.name == "gemma3":
        return ", ".join(f"{name}@{t}" for t in dict.fromkeys(lvlm.model.config.text_config.layer_types)) + \
            f" or {name}@0, {name}@1"
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
                kw = {"logits_to_keep": 1} if last_only else {}
                if kv:
                    from transformers import DynamicCache
                    kw.update(cache=DynamicCache(), use_cache=True)
                else:
                    kw["use_cache"] = False
                try:
                    out = lvlm.model(**batch, **kw)
                except _Stop:
                    return Trace(None, {n: v[0] for n, v in run.values.items()}, batch=batch)
                run.end_forward()
                keys = [(layer.keys, layer.values) for layer in out.cache.layers] if kv else None
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
    out = lvlm.model(**batch, use_cache=True, logits_to_keep=1)
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


# ------------------------------------------------------------------------------------------------
# resuming the LM from a block: what every block received in an unpatched run, and the run of the
# later blocks only, over the positions that can change


RESUME_KWARGS = ("attention_mask", "position_embeddings", "position_ids")
"""The keyword arguments an LM block is called with (besides the KV cache) in transformers 5.24,
on all five architectures; :func:`capture_lm` records them at ``lm.blocks.{i}#KEY`` sites."""
RESUMABLE_IMPLS = ("sdpa", "eager", PATTERN_IMPL)
"""Attention implementations whose blocks take an explicit (B, 1, Lq, Lk) mask, which resuming
slices to the later queries (flash-attention and flex are refused: their masks are not tensors)."""


@dataclass
class LMStates:
    """What every LM block received in one run, for :func:`resume`. N LM blocks, B rows, L tokens.

    ``residual[s]``: (B, L, D) the residual stream entering block ``s`` (``residual[0]`` =
    ``lm.input``, ``residual[N]`` the last block's output). ``kwargs[j]``: block j's recorded
    keyword arguments (:data:`RESUME_KWARGS`; as the hooks saw them, i.e. after every edit of the
    run). ``kv[j]``: block j's (keys, values), each (B, kv_heads, L, head_dim). ``reach``: (B, L)
    the last key position each query attends to in any block (from the masks), for
    :meth:`prefix`. ``logits``: (B, V) last-position logits of the run."""
    residual: list[torch.Tensor]
    kwargs: list[dict[str, Any]]
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    reach: torch.Tensor
    logits: torch.Tensor

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

    def same_inputs(self, a: int, b: int, start: int) -> bool:
        """Rows ``a`` and ``b`` give blocks ``start``… equal keyword arguments (masks, rotary, ids)."""
        for kw in self.kwargs[start:]:
            for name, v in kw.items():
                for t in (v if isinstance(v, tuple) else (v,)):
                    d = _batch_dim(name, t) if isinstance(t, torch.Tensor) else 0
                    if isinstance(t, torch.Tensor) and t.shape[d] > 1 and not torch.equal(t.select(d, a),
                                                                                            t.select(d, b)):
                        return False
        return True


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
    n = lvlm.adapter.layer_count(lvlm.model, "lm")
    res_sites = ["lm.input"] + [f"lm.blocks.{j}" for j in range(n)]
    kw_sites = [f"lm.blocks.{j}#{k}" for j in range(n) for k in RESUME_KWARGS]
    t = forward(lvlm, inputs, interventions, edits=edits, cache=[*res_sites, *kw_sites, *cache], kv=True,
                last_only=True)
    kwargs = [{k: t.cache.pop(f"lm.blocks.{j}#{k}") for k in RESUME_KWARGS} for j in range(n)]
    residual = [t.cache.pop(s) if s not in cache else t.cache[s] for s in res_sites]
    B, L = residual[0].shape[:2]
    reach = torch.arange(L, device=residual[0].device).expand(B, L).clone()
    seen = set()
    for kw in kwargs:
        m = kw["attention_mask"]
        if m is None or id(m) in seen:
            continue  # no mask: causal (what SDPA is given when nothing is padded)
        seen.add(id(m))
        allowed = m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2
        L_k = allowed.shape[-1]
        last = torch.where(allowed.any(1), torch.arange(L_k, device=m.device), -1).amax(-1)  # (B|1, Lq)
        reach = torch.maximum(reach, last.to(reach.device).expand(B, L))
    return t, LMStates(residual, kwargs, list(t.kv or []), reach, t.logits[:, -1])


class _Prefix:
    """A KV cache holding one block's keys and values of the positions before the resumed ones:
    ``update`` returns them with the new positions' appended (it keeps nothing)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values = keys, values

    def update(self, keys, values, layer_idx=None, *args, **kwargs):
        return (torch.cat([self.keys.to(keys.device, keys.dtype), keys], -2),
                torch.cat([self.values.to(values.device, values.dtype), values], -2))


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


def resume(lvlm, states: LMStates, rows: torch.Tensor, start: torch.Tensor, hidden: torch.Tensor,
           p: int) -> torch.Tensor:
    """Last-position logits of runs that continue an unpatched run from a block on.

    Row r continues the run's row ``rows[r]`` with ``hidden[r]`` (Lq = L − p positions p…, width D)
    as the residual entering block ``start[r]`` (N: after the last block). Blocks before it are not
    run; positions before ``p`` are not recomputed: every block reads their keys and values from
    ``states.kv``, so ``p`` must not exceed :meth:`LMStates.prefix` of any row's first changed
    position. Masks, rotary embeddings and ids are the run's own (``states.kwargs``), sliced to
    the resumed queries. Rows must be sorted by ``start``. Returns (R, V).
    """
    n = states.layers
    order = start.tolist()
    if order != sorted(order):
        raise SpatialBiasError("resume: rows must be sorted by their start block")
    R = len(order)
    blocks = [lvlm.adapter.module(lvlm.model, f"lm.blocks.{j}") for j in range(n)]
    with cpu_attention_guard(lvlm):
        h = _resume_blocks(lvlm, states, rows, order, hidden, p, blocks)
    h = _join(h, hidden, R)
    norm = lvlm.adapter.module(lvlm.model, "lm.final_norm")
    head = lvlm.adapter.module(lvlm.model, "unembed")
    return head(norm(h[:, -1:]))[:, -1]


def _resume_blocks(lvlm, states: LMStates, rows: torch.Tensor, order: list[int], hidden: torch.Tensor, p: int,
                   blocks: list) -> torch.Tensor | None:
    """The residual after the last block of the rows that :func:`resume` continues (see there)."""
    n, L, h = states.layers, states.residual[0].shape[1], None
    for j in range(min(order), n):
        k = sum(1 for s in order if s <= j)  # rows that have joined by block j
        h = _join(h, hidden, k)
        kw = {name: _rows_of(name, v, rows[:k], p) for name, v in states.kwargs[j].items()}
        if kw.get("attention_mask") is None:  # SDPA got no mask (nothing padded): causal, made explicit
            q = torch.arange(p, L, device=h.device)[:, None]
            kw["attention_mask"] = (torch.arange(L, device=h.device)[None] <= q)[None, None]
        K, V = states.kv[j]
        cache = _Prefix(K.index_select(0, rows[:k].to(K.device))[:, :, :p],
                        V.index_select(0, rows[:k].to(V.device))[:, :, :p])
        out = blocks[j](h, cache=cache, **kw)
        h = out[0] if isinstance(out, tuple) else out
    return h


def _join(h: torch.Tensor | None, hidden: torch.Tensor, k: int) -> torch.Tensor:
    """``h`` (rows already running) with rows len(h)…k of ``hidden`` appended."""
    if h is None:
        return hidden[:k]
    if k > h.shape[0]:
        return torch.cat([h, hidden[h.shape[0]:k].to(h.device, h.dtype)], 0)
    return h
