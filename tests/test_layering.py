"""The layers import downwards only (docs/ARCHITECTURE.md, "The parts"):

    engine      the runtime: imports none of the others (a service embedding it pulls in nothing else)
    export      checkpoint -> model directory, TensorRT builds: may import engine
    benchmarks  the harness: may import engine, export (its click commands live in cli/bench.py)
    server      HTTP / Ray Serve: may import engine (and export, for named models)
    cli         the composition root: may import everything

Checked statically (every `import` and `from ... import`, at module level or inside functions), so a
lazy import inside a function counts as much as one at the top.
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
ALLOWED_EXCEPTIONS: set[tuple[str, str]] = set()


def imported_modules(source: str) -> list[tuple[int, str]]:
    """(line, dotted module) for every absolute import in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def violations(package: str, root: Path = REPO) -> list[str]:
    bad = []
    for path in sorted((root / package).rglob("*.py")):
        for line, module in imported_modules(path.read_text()):
            top = module.split(".")[0]
            if top in FORBIDDEN[package] and (package, module) not in ALLOWED_EXCEPTIONS:
                bad.append(f"{path.relative_to(root)}:{line} imports {module}")
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


def test_importing_the_runtime_loads_no_upper_layer():
    """At run time too: `import engine` (the public API) pulls in none of the layers above it."""
    import subprocess
    import sys
    code = ("import sys, engine, engine.loop, engine.backends.ort; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'export', 'benchmarks', 'server', 'cli'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]"
