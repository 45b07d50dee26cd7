"""The shape of the code, as tests: imports flow one way (cli -> jobs -> runner -> operators) without cycles or
cross-module private names, operators/ needs neither pipelines/ nor Ray, modules stay small, and the CLI's help
and `rayembed status` start without torch."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("operators", "pipelines")
MAX_LINES = 400
MAX_FUNCTION_LINES = 80


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _modules() -> dict[str, str]:
    out = {}
    for pkg in PACKAGES:
        for root, _dirs, files in os.walk(os.path.join(REPO, pkg)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(root, f)
                    rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                    out[rel.removesuffix(".__init__")] = path
    return out


def _imports(path: str, name: str, modules: dict[str, str]) -> list[tuple[str, list[str]]]:
    """(imported project module, names taken from it) for every import in the file, function-level ones included."""
    tree = ast.parse(_read(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.split(".")[0] in PACKAGES]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] not in PACKAGES:
                continue
            for a in node.names:  # `from pipelines import cli` imports the module pipelines.cli
                sub = f"{node.module}.{a.name}"
                found.append((sub, []) if sub in modules else (node.module, [a.name]))
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: {t for t, _ in _imports(p, m, modules) if t in modules and t != m} for m, p in modules.items()}


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(n) :] + [n]))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_private_name_imported_from_another_module():
    modules = _modules()
    bad = [
        f"{m} imports {n} from {t}"
        for m, p in modules.items()
        for t, names in _imports(p, m, modules)
        for n in names
        if n.startswith("_") and not n.startswith("__") and t != m and t.split(".")[0] == m.split(".")[0]
    ]
    assert not bad, bad


def test_operators_need_no_pipelines_and_no_ray():
    modules = _modules()
    for m, p in modules.items():
        if not m.startswith("operators"):
            continue
        tree = ast.parse(_read(p))
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not any(n.split(".")[0] in ("pipelines", "ray") for n in names), f"{m} imports {names}"


def test_modules_stay_small():
    big = {m: n for m, p in _modules().items() if (n := _read(p).count("\n")) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_functions_stay_small():
    long = [
        f"{m}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for m, p in _modules().items()
        for node in ast.walk(ast.parse(_read(p)))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_help_and_status_do_not_import_torch(tmp_path):
    code = (
        "import sys\nfrom pipelines import cli\n"
        "for argv in (['--help'], ['embed', '--help'], ['status', sys.argv[1]]):\n"
        "    try:\n        cli.main(argv)\n    except SystemExit:\n        pass\n"
        "heavy = [m for m in ('torch', 'ray', 'transformers', 'lancedb', 'psycopg') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr
