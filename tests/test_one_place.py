"""The adapter is the one place an architecture lives: no module outside ``interp/adapters/``
branches on an architecture's name, model class or ``model_type``.

Everything a runner, the memory model, the prompt builder, the dispatcher or a benchmark needs
to know about an architecture is a declared property of its adapter (site table, token order,
position scheme, chat fallback ``Adapter.chat``, modules called more than once per forward
``Adapter.calls``, memory facts ``Adapter.memory_profile``, vision tokens ``Adapter.vision_tokens``).
This test parses every module of ``interp``, ``analyses``, ``probes`` and ``spatialbias`` with
``ast`` and fails on

* a comparison or membership test (``==``, ``!=``, ``in``, ``not in``) with an architecture
  name, class name or model type as a string constant (``name == "gemma3"``,
  ``kind in ("qwen2_vl", "qwen2_5_vl")``);
* a dict keyed by one (``{"llava": …}``, ``TABLE["qwen25vl"]``, ``TABLE.get("gemma3")``);
* any read of ``model_type`` (``cfg.model_type``, ``cfg.get("model_type")``, ``cfg["model_type"]``,
  ``getattr(vc, "model_type", "")``): what it would select belongs to the adapter.
"""
import ast
from pathlib import Path

import pytest

from interp.adapters import ADAPTERS

ROOT = Path(__file__).parent.parent
PACKAGES = ("interp", "analyses", "probes", "spatialbias")

EXEMPT = {
    # The tiny builders construct models of named architectures from their configs (that is
    # their job: one builder per architecture, named for it, plus the BUILDERS table).
    "interp/tiny/",
    # The real-shape builders construct LLaVA-1.5-7B / Qwen2.5-VL-7B configs and hold the
    # benchmarks' table of them (REAL), which the benchmarks read instead of branching on a name.
    "interp/realshape.py",
}
"""Modules that BUILD models of named architectures (not ones that branch on them). The
organisms (``analyses/organisms/``) need no exemption: their recipes declare what they build
(``Arch(..., is_qwen=True)``, ``lm="gpt2"``) instead of reading it off a name."""

KNOWN = {"llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen2vl", "qwen25vl", "qwen3_vl",
         "qwen3vl", "gemma3", "paligemma", "idefics3", "mllama", "llava15"}
"""Architecture names that may not be adapters yet (a module branching on one is the regression
this test is for), beside every registered adapter's name, model classes and model types."""


def arch_names() -> set[str]:
    names = set(KNOWN)
    for a in ADAPTERS:
        names |= {a.name, *a.model_classes, *a.model_types}
    return {n.lower() for n in names}


def _is_arch(node, names) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.lower() in names


def _arch_constants(node, names) -> bool:
    """An architecture name as a constant, or inside a tuple/list/set display of constants."""
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return any(_is_arch(e, names) for e in node.elts)
    return _is_arch(node, names)


def violations(source: str, names: set[str] | None = None) -> list[tuple[int, str]]:
    """(line, what) of every place ``source`` branches on an architecture (see the module doc)."""
    names = arch_names() if names is None else names
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            if any(_arch_constants(x, names) for x in (node.left, *node.comparators)):
                out.append((node.lineno, "compares with an architecture name"))
        elif isinstance(node, ast.Dict):
            if any(k is not None and _is_arch(k, names) for k in node.keys):
                out.append((node.lineno, "dict keyed by an architecture name"))
        elif isinstance(node, ast.Subscript):
            if _is_arch(node.slice, names):
                out.append((node.lineno, "looks up an architecture name"))
            elif isinstance(node.slice, ast.Constant) and node.slice.value == "model_type":
                out.append((node.lineno, "reads model_type"))
        elif isinstance(node, ast.Call):
            f = node.func
            attr = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if attr in ("get", "pop", "setdefault") and node.args and _is_arch(node.args[0], names):
                out.append((node.lineno, "looks up an architecture name"))
            if attr in ("get", "getattr", "hasattr") and any(
                    isinstance(a, ast.Constant) and a.value == "model_type" for a in node.args):
                out.append((node.lineno, "reads model_type"))
        elif isinstance(node, ast.Attribute) and node.attr == "model_type":
            out.append((node.lineno, "reads model_type"))
    return sorted(set(out))


def modules() -> list[Path]:
    out = []
    for pkg in PACKAGES:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            rel = p.relative_to(ROOT).as_posix()
            if rel.startswith("interp/adapters/") or any(rel == e or rel.startswith(e) for e in EXEMPT if e.endswith("/") or e == rel):
                continue
            out.append(p)
    return out


def test_no_module_outside_the_adapters_branches_on_an_architecture():
    bad = [f"{p.relative_to(ROOT)}:{line}: {what}" for p in modules()
           for line, what in violations(p.read_text(encoding="utf-8"))]
    assert not bad, "architecture knowledge outside interp/adapters/ (make it an adapter property):\n" + "\n".join(bad)


def test_the_checker_scans_the_packages():
    rels = {p.relative_to(ROOT).as_posix() for p in modules()}
    assert {"interp/prompts.py", "interp/dispatch.py", "analyses/estimate.py", "analyses/memory.py",
            "analyses/bench/common.py", "analyses/bench/scale.py", "analyses/organisms/arch.py"} <= rels
    assert not any(r.startswith("interp/adapters/") for r in rels)
    assert {"llava", "qwen25vl", "gemma3", "qwen2_5_vl", "gemma3forconditionalgeneration"} <= arch_names()


BAD = {
    "name_eq": 'def f(lvlm):\n    if lvlm.adapter.name == "gemma3":\n        return 1\n',
    "reversed_eq": 'def f(name):\n    return 2 if "qwen25vl" == name else 1\n',
    "membership": 'def f(kind):\n    return kind in ("qwen2_vl", "qwen2_5_vl")\n',
    "not_in": 'def f(kind):\n    return kind not in {"llava_next"}\n',
    "dict_table": 'TABLE = {"llava": 1, "other": 2}\n',
    "dict_lookup": 'def f(t):\n    return t["qwen2vl"]\n',
    "dict_get": 'def f(t):\n    return t.get("gemma3", 2)\n',
    "model_type_get": 'def f(cfg):\n    kind = cfg.get("model_type", "")\n    return kind\n',
    "model_type_attr": 'def f(vc):\n    return 1 if vc.model_type == "clip_vision_model" else 0\n',
    "model_type_getattr": 'def f(vc):\n    return getattr(vc, "model_type", "") == "x"\n',
    "model_type_subscript": 'def f(cfg):\n    return cfg["model_type"]\n',
    "class_name": 'def f(m):\n    return type(m).__name__ == "LlavaNextForConditionalGeneration"\n',
    "new_arch": 'def f(name):\n    return name == "llava_onevision"\n',
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_the_checker_flags_a_module_that_branches_on_an_architecture(case, tmp_path):
    f = tmp_path / f"{case}.py"
    f.write_text(BAD[case])
    assert violations(f.read_text()), case


def test_the_checker_passes_declared_properties(tmp_path):
    good = ('def f(lvlm, cfg):\n    a = lvlm.adapter\n    x = a.chat.render("<image>", "q")\n'
            '    y = a.memory_profile(cfg).qk_norm\n    z = a.name\n    return f"{z}: {x} {y}"\n'
            'NAMES = ("see", "llama")\n')
    f = tmp_path / "good.py"
    f.write_text(good)
    assert violations(f.read_text()) == []
