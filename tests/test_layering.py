"""The layers import downwards only (docs/ARCHITECTURE.md, "The parts"):

    engine      the runtime: imports none of the others (a service embedding it pulls in nothing else),
                but for one lazy import: `Generator.from_pretrained(NAME)` exports a model name through
                export.model_cache, inside the function, so loading a model directory never loads export/
    export      checkpoint -> model directory, TensorRT builds: may import engine
    benchmarks  the harness: may import engine, export (its click commands live in cli/bench.py)
    server      HTTP / Ray Serve: may import engine (and export, for named models)
    cli         the composition root: may import everything

Checked statically (every `import` and `from ... import`, at module level or inside functions), so a
lazy import inside a function counts as much as one at the top; the one exception is named by file and
module, and holds only inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("engine", "export", "benchmarks", "server", "cli")

FORBIDDEN = {
    "engine": {"export", "benchmarks", "server", "cli"},
    "export": {"benchmarks", "server", "cli"},
    "benchmarks": {"server", "cli"},
    "server": {"benchmarks", "cli"},
}
# (file, module): allowed there, and only inside a function (never at module level). docs/ARCHITECTURE.md,
# "The parts", says why.
LAZY_EXCEPTIONS = {("engine/generator.py", "export.model_cache")}


def imported_modules(source: str) -> list[tuple[int, str]]:
    """(line, dotted module) for every absolute import in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def module_level_lines(source: str) -> set[int]:
    """Lines of the imports that run when the module is imported (outside any function or class body)."""
    lines, todo = set(), list(ast.parse(source).body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            lines.add(node.lineno)
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            todo += [c for c in ast.iter_child_nodes(node) if isinstance(c, ast.stmt)]
    return lines


def violations(package: str, root: Path = REPO) -> list[str]:
    bad = []
    for path in sorted((root / package).rglob("*.py")):
        source, rel = path.read_text(), path.relative_to(root).as_posix()
        top_level = module_level_lines(source)
        for line, module in imported_modules(source):
            if module.split(".")[0] not in FORBIDDEN[package]:
                continue
            if (rel, module) in LAZY_EXCEPTIONS and line not in top_level:
                continue
            bad.append(f"{rel}:{line} imports {module}" + (" at module level" if (rel, module) in LAZY_EXCEPTIONS else ""))
    return bad


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layers_import_downwards_only(package):
    if not (REPO / package).is_dir():
        pytest.skip(f"no {package}/ package yet")
    assert violations(package) == []


def test_the_check_catches_an_upward_import(tmp_path):
    """The walker sees a lazy import inside a function, not only module-level ones."""
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "ok.py").write_text("import numpy\nfrom engine.errors import InputError\n")
    (tmp_path / "engine" / "bad.py").write_text("def f():\n    from export.exporter import export_model\n")
    assert violations("engine", tmp_path) == ["engine/bad.py:2 imports export.exporter"]


def test_the_one_exception_is_narrow(tmp_path):
    """export.model_cache from engine/generator.py inside a function only: at module level, from another
    engine file, or another export module, it is a violation."""
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "generator.py").write_text(
        "def f():\n    from export.model_cache import resolve_model_dir\n"
        "try:\n    from export.model_cache import default_cache_dir\nexcept ImportError:\n    pass\n"
        "def g():\n    import export.exporter\n")
    (tmp_path / "engine" / "core.py").write_text("def f():\n    from export.model_cache import resolve_model_dir\n")
    assert violations("engine", tmp_path) == ["engine/core.py:2 imports export.model_cache",
                                              "engine/generator.py:4 imports export.model_cache at module level",
                                              "engine/generator.py:8 imports export.exporter"]


def test_importing_the_runtime_loads_no_upper_layer():
    """At run time too: `import engine` (the public API) pulls in none of the layers above it."""
    import subprocess
    import sys
    code = ("import sys, engine, engine.loop, engine.backends.ort; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'export', 'benchmarks', 'server', 'cli'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"
