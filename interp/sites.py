"""The site grammar, resolved in one place: a site name → which module, which tensor of which call.

    SITE  = BASE ['#' KEY] ['@' CALL]
    BASE  = a canonical site (``vision.embed``, ``vision.blocks.{i}``, ``vision.out``, ``projector``,
            ``lm.input``, ``lm.embed``, ``lm.blocks.{i}``, ``lm.blocks.{i}.attn``, ``.attn.heads``,
            ``.attn.pattern``, ``lm.blocks.{i}.mlp``, ``lm.rotary``, ``lm.final_norm``, ``unembed``;
            negative ``{i}`` count from the end) or ``module:HF.PATH`` (any submodule: the escape hatch)
    KEY   = ``input`` (the module's main input) or the name of a keyword argument (``attention_mask``,
            ``position_embeddings``, …): the site is then that input instead of the output
    CALL  = a call index within one forward (``0``, ``1``, …) or a name the adapter gives a call
            (Gemma3: ``lm.rotary@sliding_attention``); without it, an edit acts on every call and a
            cache refuses a module called more than once per forward

Tensor a site denotes: the module's output (for a tuple output its first element; ``lm.rotary``'s
``(cos, sin)`` stays whole); ``lm.input`` / ``vision.out`` are the inputs of ``lm.blocks.0`` /
``projector``; ``.attn.heads`` is the input of the attention output projection viewed as
(B, L, H, head_dim); ``.attn.pattern`` is the softmaxed attention (B, H, Lq, Lk) of that layer
(the run switches the LM to an eager kernel that exposes it; writing it changes the layer's output).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from dataclasses import replace

from interp.adapters.base import INPUT_SITES, LM_INPUT, Adapter, get_module
from spatialbias.errors import SpatialBiasError

_GRAMMAR = re.compile(r"^(?P<base>[^#@\s]+)(?:#(?P<key>[A-Za-z_]\w*))?(?:@(?P<call>[\w.\-]+))?$")
_LAYER = re.compile(r"^(?P<stack>vision|lm)\.blocks\.(?P<i>-?\d+)(?P<rest>(?:\.[a-z_]+)*)$")


@dataclass(frozen=True)
class Site:
    """A resolved site.

    ``name``: canonical spelling (layer indices made non-negative); ``path``: HF module path;
    ``hook``: ``"output"``, ``"input"``, ``"kwarg"`` or ``"pattern"``; ``key``: the keyword argument
    (``hook == "kwarg"``); ``call``: call index or label (None: every call); ``heads``: split the
    last dim into this many heads; ``whole``: a tuple output is given whole; ``tokens``: the token
    axis family, ``"lm"`` (B, L, …) or ``"vision"`` (laid out by the adapter), None otherwise.
    """
    name: str
    path: str
    hook: str
    key: str | None = None
    call: int | str | None = None
    heads: int | None = None
    whole: bool = False
    tokens: str | None = None
    canonical: str = ""
    streams: int = 1

    @property
    def event(self) -> tuple[str, str]:
        """(hook kind, module path): sites sharing it are handled by one hook."""
        return ("input" if self.hook in ("input", "kwarg") else self.hook), self.path


def resolve(adapter: Adapter, model: torch.nn.Module, name: str) -> Site:
    """Parse and resolve one site name for ``model``; one clear error line when it names nothing."""
    m = _GRAMMAR.match(name or "")
    if not m:
        raise SpatialBiasError(f"site {name!r} is not understood; write BASE[#KEY][@CALL], e.g. lm.blocks.3, "
                               "lm.blocks.0#attention_mask, lm.rotary@1 or module:model.language_model.norm")
    base, key, call = m.group("base"), m.group("key"), m.group("call")
    call = int(call) if call is not None and call.isdigit() else call
    if base.startswith("module:"):
        path = base[len("module:"):]
        get_module(model, path)
        return _with_key(Site(name=name, path=path, hook="output", call=call, canonical=base), key, name, True)
    base = _layer_index(adapter, model, base)
    canonical = base
    heads = None
    hook = "output"
    if call is None:
        call = adapter.default_call(base)
    if base in INPUT_SITES:
        if key is not None:
            raise SpatialBiasError(f"site {name!r}: {base} is already an input; write {INPUT_SITES[base]}#{key}")
        at = adapter.lm_input_at() if base == LM_INPUT else None
        if at is not None:  # the text model's own input, before anything derived from it
            get_module(model, at[0])
            return Site(name=name, path=at[0], hook="kwarg", key=at[1], call=call, tokens="lm", canonical=base)
        return Site(name=name, path=adapter.path(base, model), hook="input", call=call,
                    tokens="lm" if base == "lm.input" else "vision", canonical=base)
    if base.endswith(".attn.heads") or base.endswith(".attn.pattern"):
        attn = base.rsplit(".", 1)[0]
        path = adapter.path(attn, model)
        if base.endswith(".heads"):
            path, hook, heads = f"{path}.{adapter.out_proj(model)}", "input", adapter.head_count(model)
        else:
            hook = "pattern"
        if key is not None:
            raise SpatialBiasError(f"site {name!r}: {base} takes no #key; use {attn}#{key}")
        get_module(model, path)
        return Site(name=name, path=path, hook=hook, call=call, heads=heads, tokens="lm" if heads else None,
                    canonical=canonical)
    path = adapter.path(base, model)
    get_module(model, path)
    tokens = "vision" if base == "projector" or base.startswith("vision.") else (
        "lm" if base.startswith("lm.") and base != "lm.rotary" or base == "unembed" else None)
    site = Site(name=name, path=path, hook=hook, call=call, whole=base == "lm.rotary", tokens=tokens,
                canonical=canonical)
    site = _with_key(site, key, name, adapter.lm_input_at() is None)
    if re.fullmatch(r"lm\.blocks\.\d+", base) and key in (None, "input"):
        site = replace(site, streams=adapter.streams(model))
    return site


def every_site(adapter: Adapter, model: torch.nn.Module) -> list[str]:
    """Every canonical site of ``model`` that can be cached, in forward order: the adapter's
    concrete sites (a module called more than once per forward by each named call), plus per LM
    attention layer (:meth:`~interp.adapters.Adapter.attention_layers`) ``.attn.heads`` and
    ``.attn.pattern``."""
    out = []
    for name in adapter.concrete_sites(model):
        out += adapter.calls(model, name)
        m = _LAYER.match(name)
        if m and m.group("stack") == "lm" and m.group("rest") == ".attn":
            out += [f"{name}.heads", f"{name}.pattern"]
    return out


def _with_key(site: Site, key: str | None, name: str, block0_is_lm_input: bool) -> Site:
    if key is None:
        return site
    if key == "input":
        # the main input of a block is the residual stream before it: same token axis
        alias = {v: k for k, v in INPUT_SITES.items() if block0_is_lm_input or k != LM_INPUT}
        canonical = alias.get(site.canonical, f"{site.canonical}#input")
        return Site(name=name, path=site.path, hook="input", call=site.call, tokens=site.tokens,
                    canonical=canonical)
    return Site(name=name, path=site.path, hook="kwarg", key=key, call=site.call, canonical=f"{site.canonical}#{key}")


def _layer_index(adapter: Adapter, model: torch.nn.Module, base: str) -> str:
    """``lm.blocks.-1.attn`` → ``lm.blocks.{n-1}.attn``; out-of-range indices are one error line."""
    m = _LAYER.match(base)
    if not m:
        return base
    stack, i = m.group("stack"), int(m.group("i"))
    n = adapter.layer_count(model, stack)
    if n == 0:  # a tower built outside transformers (Gemma3n's timm one): no canonical blocks
        raise SpatialBiasError(f"unknown site {base!r}: {adapter.name} has no canonical {stack} blocks; use "
                               f"{'vision.out, projector' if stack == 'vision' else 'the lm sites'} or a module: path "
                               "(model.named_modules())")
    if not -n <= i < n:
        raise SpatialBiasError(f"unknown site {base!r}: {adapter.name} has {n} {stack} layers (0..{n - 1}, "
                               f"or -{n}..-1 from the end)")
    return f"{stack}.blocks.{i % n}{m.group('rest')}"


def layer_range(n: int, layers: tuple[int, int] | None) -> range:
    """The layers ``(start, stop)`` name among ``n`` (Python slice rules: negatives from the end,
    None = all); an empty window is one error line."""
    if layers is None:
        return range(n)
    r = range(n)[slice(*layers)]
    if not len(r):
        raise SpatialBiasError(f"layers {tuple(layers)} select no layer of {n}; give (start, stop) with "
                               f"start < stop, e.g. (0, 1) or (-1, None)")
    return r
