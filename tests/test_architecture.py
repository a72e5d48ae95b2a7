"""The package's shape: no import cycles between its modules, and every module imports on its own.

The module graph is read from the source (every `import` statement, those inside functions too: a
cycle hidden in a function is still a cycle), so this needs no Ray and runs in the fast lane. Then a
fresh interpreter imports every module, which catches a module that only worked because another one
happened to be imported first.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "raytune_app"


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports (a `from a import b` names module a.b when there is one)."""
    known = modules()
    graph: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                graph[name] |= {alias.name for alias in node.names if alias.name in known}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    target = f"{node.module}.{alias.name}"
                    if target in known:
                        graph[name].add(target)
                    elif node.module in known:
                        graph[name].add(node.module)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in graph[node]:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 50 and graph["raytune_app.cli"]  # the graph was really read
    assert cycles(graph) == [], "import cycles (move the shared helper below both sides)"


@pytest.mark.slow  # a second interpreter importing torch, Ray, transformers, TRL, MLflow...
def test_every_module_imports_in_a_fresh_interpreter():
    # vLLM is optional (the vllm teacher / serving backend import it inside functions only).
    names = sorted(modules())
    script = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    done = subprocess.run([sys.executable, "-c", script, *names], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_ci_runs_the_readme_test_command_with_lint_and_types_first():
    readme = (REPO / "README.md").read_text()
    assert "bash scripts/test.sh" in readme
    assert "exec bash scripts/test.sh" in (REPO / ".ci" / "run").read_text()
    test_sh = (REPO / "scripts" / "test.sh").read_text()
    assert test_sh.index("scripts/lint.sh") < test_sh.index("pytest")
    lint = (REPO / "scripts" / "lint.sh").read_text()
    assert "ruff check ." in lint and "ruff format --check ." in lint and ".venv/bin/mypy" in lint


def test_the_pre_commit_config_is_valid():
    done = subprocess.run(
        [str(Path(sys.executable).parent / "pre-commit"), "validate-config", ".pre-commit-config.yaml"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
