"""The layers import one way: ``spatialbias`` (shared errors, atomic writes) → ``probes`` (data) →
``interp`` (models, interventions, causal engine) → ``analyses`` (plans, runs, tables, figures,
reports) → the command line. Checked on every import statement, lazy ones inside functions too."""
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
            if p.name != "cli.py" and "analyses.cli" in names:
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
    """Every Python file of the given top-level folders (the four packages, tests, benchmarks …)."""
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
    defined = [f"{p.relative_to(ROOT)}:{n.lineno}" for p in project_files(*PACKAGES, "tests", "benchmarks")
               for n in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
               if isinstance(n, ast.ClassDef) and n.name == "SpatialBiasError"]
    assert len(defined) == 1 and defined[0].startswith("spatialbias/errors.py:"), defined
    bad = [f"{p.relative_to(ROOT)}:{line}" for p in project_files(*PACKAGES, "tests", "benchmarks")
           for name, line in imported_modules(p).items() if name == "interp.errors" or name.startswith("interp.errors.")]
    assert not bad, bad
    assert not (ROOT / "interp" / "errors.py").exists()


def test_atomic_writes_come_from_the_shared_layer_only():
    """``atomic_write_*`` is imported from :mod:`spatialbias.files` and nowhere else (no re-exports)."""
    bad = []
    for p in project_files(*PACKAGES, "tests", "benchmarks"):
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module != "spatialbias.files" and \
                    any(a.name.startswith("atomic_write") for a in node.names):
                bad.append(f"{p.relative_to(ROOT)}:{node.lineno} from {'.' * node.level}{node.module or ''}")
    assert not bad, bad
