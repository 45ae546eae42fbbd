"""The condition vocabulary: one spelling for every intervention condition, one parser for the
command line and sweep files. The spelling is the label shown in tables, figures and reports.

Role: turn specs into intervention configs and back. May import: ``spatialbias``,
``interp.interventions``. Nothing here runs a model.

Grammar (``--condition SPEC``, ``conditions = ["SPEC", …]`` in a sweep file, and the labels)::

    baseline
    bapa                       BaPA, the authors' variant;   bapa:keep_hw (M-RoPE models)
    agci:λ                     AGCI with fixed λ ≥ 0, per image;   agci-pooled:λ (one g per sequence)
    agci-adaptive:RULE:SCALE   λ per image from its own tokens (rules cos_spread, norm_ratio),
                               optional :pooled and :max=M (default 4)
    positions:reverse          position-id controls: image tokens trade ids (reverse, shuffle;
    positions:shuffle          the shuffle's permutation comes from the condition's seed)

A sweep file's ``[interventions]`` table (``agci = [0.25, 0.5]``, ``bapa = ["keep_hw"]``, …) is
turned into these specs first, then parsed by the same :func:`parse`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from interp.interventions import (ADAPTIVE_RULES, AGCI, BAPA_VARIANTS, POSITION_CONTROLS, AdaptiveAGCI, BaPA,
                                  Intervention, PositionPermute)
from spatialbias.errors import SpatialBiasError

FAMILIES = ("baseline", "bapa", "agci", "agci-adaptive", "positions")
"""Families in display order; a family has one colour in every figure."""
TOML_KEYS = ("conditions", "baseline", "bapa", "agci", "agci_pooled", "agci_adaptive", "positions")
GRAMMAR = ("baseline, bapa, bapa:keep_hw, agci:λ, agci-pooled:λ, agci-adaptive:RULE:SCALE[:pooled][:max=M], "
           "positions:reverse, positions:shuffle")


@dataclass(frozen=True)
class Spec:
    """A parsed condition: its ``label`` (canonical spelling), ``family``, ``lam`` (AGCI's fixed λ,
    or the adaptive rule's scale; None otherwise) and the intervention configs it runs."""
    label: str
    family: str
    lam: float | None
    interventions: tuple[Intervention, ...]

    def dicts(self) -> tuple[dict, ...]:
        return tuple(iv.to_dict() for iv in self.interventions)


def _number(text: str, what: str, where: str, spec: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise SpatialBiasError(f"{where} {spec!r}: {what} {text!r} is not a number; write e.g. agci:0.5") from None
    if not math.isfinite(v) or v < 0:
        raise SpatialBiasError(f"{where} {spec!r}: {what} must be a finite number ≥ 0 (0 = off), got {text}")
    return v


def parse(spec: str, seed: int = 0, where: str = "--condition") -> Spec:
    """One condition spec (see the module doc) → :class:`Spec`; one clear error line otherwise.
    ``where`` names the input in errors (``--condition``, ``sweep.toml: [interventions] agci``)."""
    if not isinstance(spec, str) or not spec.strip():
        raise SpatialBiasError(f"{where} {spec!r}: not a condition; use one of {GRAMMAR}")
    kind, *args = spec.strip().split(":")
    if kind == "baseline" and not args:
        return Spec("baseline", "baseline", None, ())
    if kind == "bapa" and len(args) <= 1:
        variant = args[0] if args else "reference"
        if variant not in BAPA_VARIANTS:
            raise SpatialBiasError(f"{where} {spec!r}: BaPA variant {variant!r} is unknown; use bapa or bapa:keep_hw")
        return Spec("bapa" if variant == "reference" else f"bapa:{variant}", "bapa", None, (BaPA(variant=variant),))
    if kind in ("agci", "agci-pooled") and len(args) == 1:
        lam = _number(args[0], "λ", where, spec)
        return Spec(f"{kind}:{lam:g}", "agci", lam, (AGCI(lam=lam, pooled=kind == "agci-pooled"),))
    if kind == "agci-adaptive" and len(args) >= 2:
        rule, scale = args[0], _number(args[1], "the scale", where, spec)
        if rule not in ADAPTIVE_RULES:
            raise SpatialBiasError(f"{where} {spec!r}: adaptive rule {rule!r} is unknown; use "
                                   f"{' or '.join(ADAPTIVE_RULES)}")
        pooled, lam_max = False, 4.0
        for extra in args[2:]:
            if extra == "pooled":
                pooled = True
            elif extra.startswith("max="):
                lam_max = _number(extra[4:], "max", where, spec)
            else:
                raise SpatialBiasError(f"{where} {spec!r}: {extra!r} is not understood; use :pooled or :max=M")
        iv = AdaptiveAGCI(rule=rule, scale=scale, lam_max=lam_max, pooled=pooled)
        return Spec(label_of([iv]), "agci-adaptive", scale, (iv,))
    if kind == "positions" and len(args) == 1:
        if args[0] not in POSITION_CONTROLS:
            raise SpatialBiasError(f"{where} {spec!r}: position control {args[0]!r} is unknown; use "
                                   f"{' or '.join(POSITION_CONTROLS)}")
        return Spec(f"positions:{args[0]}", "positions", None, (PositionPermute(mode=args[0], seed=seed),))
    raise SpatialBiasError(f"{where} {spec!r} is not understood; use one of {GRAMMAR}")


def label_of(interventions) -> str:
    """The canonical label of a list of intervention configs (the inverse of :func:`parse`)."""
    ivs = list(interventions)
    if not ivs:
        return "baseline"
    if len(ivs) > 1:
        return " + ".join(label_of([iv]) for iv in ivs)
    iv = ivs[0]
    if isinstance(iv, AdaptiveAGCI):
        out = f"agci-adaptive:{iv.rule}:{iv.scale:g}" + (":pooled" if iv.pooled else "")
        return out + (f":max={iv.lam_max:g}" if iv.lam_max != 4.0 else "")
    if isinstance(iv, AGCI):
        return f"agci{'-pooled' if iv.pooled else ''}:{iv.lam:g}"
    if isinstance(iv, BaPA):
        return "bapa" if iv.variant == "reference" else f"bapa:{iv.variant}"
    if isinstance(iv, PositionPermute):
        return f"positions:{iv.mode}"
    return iv.label


def from_table(table: dict[str, Any], seed: int, where: str) -> list[Spec]:
    """The specs of a sweep file's ``[interventions]`` table (baseline first, then the order of
    the keys in :data:`TOML_KEYS`), each parsed by :func:`parse`."""
    unknown = sorted(set(table) - set(TOML_KEYS))
    if unknown:
        raise SpatialBiasError(f"{where}: unknown key(s) {', '.join(unknown)} in [interventions]; use "
                               f"{', '.join(TOML_KEYS)}")
    specs: list[str] = []
    keys: list[str] = []

    def add(spec, key):
        specs.append(spec)
        keys.append(key)
    listed = table.get("conditions", [])
    if table.get("baseline", not (isinstance(listed, list) and "baseline" in listed)):
        add("baseline", "baseline")
    for v in _list(table.get("bapa", []), where, "bapa", str):
        add("bapa" if v == "reference" else f"bapa:{v}", "bapa")
    for key, kind in (("agci", "agci"), ("agci_pooled", "agci-pooled")):
        for lam in _list(table.get(key, []), where, key, float):
            add(f"{kind}:{_g(lam)}", key)
    for rule in _list(table.get("agci_adaptive", []), where, "agci_adaptive", dict):
        if "rule" not in rule or set(rule) - {"rule", "scale", "lam_max", "pooled"}:
            raise SpatialBiasError(f"{where}: [interventions] agci_adaptive entries are tables like "
                                   "{ rule = \"cos_spread\", scale = [1.0], lam_max = 4.0, pooled = false }")
        for scale in _list(rule.get("scale", [1.0]), where, "agci_adaptive.scale", float):
            extra = (":pooled" if rule.get("pooled") else "") + (f":max={_g(rule['lam_max'])}" if "lam_max" in rule else "")
            add(f"agci-adaptive:{rule['rule']}:{_g(scale)}{extra}", "agci_adaptive")
    for mode in _list(table.get("positions", []), where, "positions", str):
        add(f"positions:{mode}", "positions")
    for s in _list(table.get("conditions", []), where, "conditions", str):
        add(s, "conditions")
    out = [parse(s, seed, f"{where}: [interventions] {k}:") for s, k in zip(specs, keys)]
    labels = [s.label for s in out]
    if len(set(labels)) != len(labels):
        dup = next(x for x in labels if labels.count(x) > 1)
        raise SpatialBiasError(f"{where}: [interventions] lists {dup!r} twice; remove the repeated value")
    return out


def _g(x) -> str:
    return f"{float(x):g}" if isinstance(x, (int, float)) and not isinstance(x, bool) else str(x)


def _list(v, where: str, key: str, kind: type) -> list:
    v = v if isinstance(v, list) else [v]
    ok = (lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)) if kind is float else \
        (lambda x: isinstance(x, kind))
    bad = next((x for x in v if not ok(x)), None)
    if bad is not None:
        want = {float: "numbers", str: "strings", dict: "tables"}[kind]
        raise SpatialBiasError(f"{where}: [interventions] {key} must be a list of {want}, got {v!r}")
    return v
