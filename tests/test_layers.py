"""The layers import one way: ``spatialbias`` (shared errors, atomic writes) → ``probes`` (data) →
``interp`` (models, interventions, causal engine) → ``analyses`` (plans, runs, tables, figures,
reports) → the command line. Checked on every import statement, lazy ones inside functions too;
inside the layers no module imports itself back through others (no import cycles)."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
FORBIDDEN = {
    "spatialbias": {"probes", "interp", "analyses"},
    "probes": {"interp", "analyses"},
    "interp": {"probes", "analyses"},
    "analyses": set(),
}


def imported_packages(path: Path) -> dict[str, int]:
    """Top-level package → first line number of every import in a module (absolute imports)."""
    out: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for a in node.names:
                out.setdefault(a.name.split(".")[0], node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.setdefault(node.module.split(".")[0], node.lineno)
    return out


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_one_way(layer):
    bad = []
    for path in sorted((ROOT / layer).rglob("*.py")):
        for pkg, line in imported_packages(path).items():
            if pkg in FORBIDDEN[layer]:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {pkg}")
    assert not bad, bad


def test_only_the_cli_is_above_analyses():
    bad = []
    for p in (ROOT / "analyses").rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names] if isinstance(node, ast.ImportFrom) else []
            if (ROOT / "analyses" / "cli") not in p.parents and \
                    any(n == "analyses.cli" or n.startswith("analyses.cli.") for n in names):
                bad.append(f"{p.relative_to(ROOT)}:{node.lineno}")
    assert not bad, bad


def test_the_checker_sees_lazy_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\n\ndef f():\n    from interp.model import LVLM\n    import analyses.plan\n")
    assert set(imported_packages(f)) == {"os", "interp", "analyses"}


def test_probes_and_the_shared_layer_load_without_torch():
    code = ("import sys, spatialbias.errors, spatialbias.files, probes.format, probes.build, probes.compose, "
            "probes.images, probes.shapes, probes.sources; print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr[-500:]


PACKAGES = ("spatialbias", "probes", "interp", "analyses")


def project_files(*tops: str) -> list[Path]:
    """Every Python file of the given top-level folders (the four packages, tests)."""
    return sorted(p for top in tops for p in (ROOT / top).rglob("*.py"))


def imported_modules(path: Path) -> dict[str, int]:
    """Dotted name → first line of every absolute import in a module, lazy ones too; for
    ``from x import y`` both ``x`` and ``x.y`` are listed (``x.y`` may be a module)."""
    out: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for a in node.names:
                out.setdefault(a.name, node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.setdefault(node.module, node.lineno)
            for a in node.names:
                out.setdefault(f"{node.module}.{a.name}", node.lineno)
    return out


def test_one_error_type_spelled_one_way():
    """``SpatialBiasError`` is defined once, in ``spatialbias.errors``, and imported from there."""
    defined = [f"{p.relative_to(ROOT)}:{n.lineno}" for p in project_files(*PACKAGES, "tests")
               for n in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
               if isinstance(n, ast.ClassDef) and n.name == "SpatialBiasError"]
    assert len(defined) == 1 and defined[0].startswith("spatialbias/errors.py:"), defined
    bad = [f"{p.relative_to(ROOT)}:{line}" for p in project_files(*PACKAGES, "tests")
           for name, line in imported_modules(p).items()
           if name == "interp.errors" or name.startswith("interp.errors.")]
    assert not bad, bad
    assert not (ROOT / "interp" / "errors.py").exists()


def test_atomic_writes_come_from_the_shared_layer_only():
    """``atomic_write_*`` is imported from :mod:`spatialbias.files` and nowhere else (no re-exports)."""
    bad = []
    for p in project_files(*PACKAGES, "tests"):
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module != "spatialbias.files" and \
                    any(a.name.startswith("atomic_write") for a in node.names):
                bad.append(f"{p.relative_to(ROOT)}:{node.lineno} from {'.' * node.level}{node.module or ''}")
    assert not bad, bad




def module_graph(root: Path, tops: tuple[str, ...]) -> dict[str, set[str]]:
    """Module → the project modules it imports (absolute imports, lazy ones inside functions too).
    ``import x.y`` reads module ``x.y``; ``from x import y`` reads module ``x.y`` when there is one,
    else ``x`` (a name defined in ``x``). Packages are their ``__init__``."""
    files = {}
    for top in tops:
        for p in (root / top).rglob("*.py"):
            parts = p.relative_to(root).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    graph = {}
    for name, path in files.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                           for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in files and t != name}
        graph[name] = deps
    return graph


def import_groups(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected groups of two or more modules (Tarjan): each is one or more cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle ``[a, b, …, a]`` per group of :func:`import_groups`: the shortest way from the
    group's first module back to itself."""
    cycles = []
    for group in import_groups(graph):
        start = min(group)
        prev: dict[str, str] = {}
        frontier = [start]
        while start not in prev:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & group):
                    if w not in prev:
                        prev[w] = v
                        nxt.append(w)
            frontier = nxt
        path = [start]
        while len(path) == 1 or path[-1] != start:
            path.append(prev[path[-1]])
        cycles.append(path[::-1])
    return sorted(cycles)


def test_the_cycle_checker_finds_a_planted_cycle(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pkg.a import A\n")
    (pkg / "a.py").write_text("from pkg import b\nA = 1\n")
    (pkg / "b.py").write_text("import os\n\ndef f():\n    from pkg.sub.c import C  # lazy\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("import pkg.a\nC = 2\n")
    (pkg / "d.py").write_text("from pkg.a import A\nfrom pkg import sub\n")  # no cycle through d
    graph = module_graph(tmp_path, ("pkg",))
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.sub.c"}, "pkg.sub": set(),
                     "pkg.sub.c": {"pkg.a"}, "pkg.d": {"pkg.a", "pkg.sub"}}
    assert import_cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]]
    (pkg / "sub" / "c.py").write_text("C = 2\n")
    assert import_cycles(module_graph(tmp_path, ("pkg",))) == []


def test_no_import_cycles():
    """No module imports, directly or through others, a module that imports it (lazy imports
    count): the registry imports no analysis, the analyses import the registry, and the plan, the
    dry run, the summary and the report import the analyses."""
    cycles = import_cycles(module_graph(ROOT, PACKAGES))
    assert not cycles, "\n".join(" → ".join(c) for c in cycles)


MAX_LINES = 400


def test_no_module_is_over_400_lines():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text(encoding="utf-8").splitlines())
             for p in project_files(*PACKAGES)}
    over = {f: n for f, n in sizes.items() if n > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines (split them by what they hold): {over}"
