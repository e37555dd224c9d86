"""The package's import rules: the layers contract (import-linter), no import cycles, torch-free modules,
and the server depending on the engine's interface rather than on AsyncEngine."""

from __future__ import annotations

import ast
import inspect
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

import glmkit
import glmkit.engine
from glmkit.engine.async_engine import AsyncEngine
from glmkit.engine.protocol import EngineClient
from glmkit.engine.scheduler import Scheduler

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "glmkit"

# Modules that tools, the scheduler's tests and API clients import without torch (or numpy).
TORCH_FREE = ["glmkit", "glmkit.engine", "glmkit.models.config", "glmkit.generation.sampling",
              "glmkit.engine.request", "glmkit.engine.scheduler", "glmkit.engine.protocol", "glmkit.serve.protocol",
              "glmkit.text.scripts"]
BLOCKED = ("torch", "numpy")

BLOCKER = """
import importlib, sys

class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"{{name}} is blocked: this import must work without it", name=name)
        return None

sys.meta_path.insert(0, Blocked())
"""


def _run_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


# ----- the layers contract


def test_import_linter_contracts_are_kept() -> None:
    """pyproject.toml's [tool.importlinter] layers; on failure the message is import-linter's report."""
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={str(ROOT / 'pyproject.toml')!r}, no_cache=True))")
    result = _run_python(code)
    assert result.returncode == 0, f"import-linter: a contract is broken\n{result.stdout}\n{result.stderr}"


# ----- import cycles


def _module_names() -> dict[str, Path]:
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Imports(ast.NodeVisitor):
    """Every import statement of a module, function-local ones too, outside `if TYPE_CHECKING:` blocks."""

    def __init__(self, module: str, is_package: bool) -> None:
        self.package = module if is_package else module.rpartition(".")[0]
        self.found: list[tuple[list[str], int]] = []  # (candidate targets, most specific first; line)

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.append(([alias.name], node.lineno))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            package = self.package.split(".")
            package = package[: len(package) - (node.level - 1)]
            base = ".".join([*package, *([node.module] if node.module else [])])
        for alias in node.names:
            self.found.append(([f"{base}.{alias.name}", base], node.lineno))


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported glmkit module: line of the first such import}; `from pkg import sub` is an
    import of pkg.sub (grimp's rule), `import a.b.c` one of the longest prefix that is a module."""
    names = _module_names()
    graph: dict[str, dict[str, int]] = {}
    for module, path in names.items():
        visitor = _Imports(module, path.name == "__init__.py")
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
        edges: dict[str, int] = {}
        for candidates, line in visitor.found:
            for candidate in candidates:
                parts = candidate.split(".")
                target = next((".".join(parts[:n]) for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in names),
                              None)
                if target is not None:
                    if target != module:
                        edges.setdefault(target, line)
                    break
        graph[module] = edges
    return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (a -> b -> ... -> a) per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, {}):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    cycles = []
    for component in components:
        members, start = set(component), component[0]
        paths = {start: [start]}
        queue = [start]
        while queue:  # breadth first from start, inside the component, back to start: a shortest cycle
            node = queue.pop(0)
            for nxt in sorted(graph[node]):
                if nxt == start:
                    queue = []
                    cycles.append([*paths[node], start])
                    break
                if nxt in members and nxt not in paths:
                    paths[nxt] = [*paths[node], nxt]
                    queue.append(nxt)
    return cycles


def _describe(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    return " -> ".join(f"{a} (l.{graph[a][b]})" for a, b in zip(cycle, cycle[1:], strict=False)) + f" -> {cycle[-1]}"


def test_the_cycle_finder_finds_cycles() -> None:
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3, "d": 4}, "d": {}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert _describe(["a", "b", "c", "a"], graph) == "a (l.1) -> b (l.2) -> c (l.3) -> a"
    assert find_cycles({"a": {"b": 1}, "b": {}}) == []


def test_the_import_graph_sees_function_local_imports_and_skips_type_checking_ones() -> None:
    graph = import_graph()
    assert "glmkit.models.glm" in graph["glmkit.checkpoints.hf"]
    assert "glmkit.pretrained" in graph["glmkit.serve.app"]  # imported inside model_name_for
    assert "glmkit.pretrained" not in graph["glmkit"]  # only under `if TYPE_CHECKING:`


def test_no_import_cycles() -> None:
    graph = import_graph()
    cycles = find_cycles(graph)
    assert not cycles, "import cycles between glmkit modules:\n" + "\n".join(_describe(c, graph) for c in cycles)


# ----- torch-free modules


@pytest.mark.parametrize("module", TORCH_FREE)
def test_imports_without_torch(module: str) -> None:
    code = BLOCKER.format(blocked=BLOCKED) + textwrap.dedent(f"""
        importlib.import_module({module!r})
        loaded = sorted(n for n in sys.modules if n.partition(".")[0] in {BLOCKED!r})
        assert not loaded, loaded
        print("ok")
    """)
    result = _run_python(code)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_lazy_exports() -> None:
    result = _run_python(BLOCKER.format(blocked=BLOCKED) + textwrap.dedent("""
        import glmkit
        assert set(glmkit.__all__) <= set(dir(glmkit)), dir(glmkit)
        print(glmkit.GLMConfig().hidden_size, glmkit.SamplingParams().top_p, glmkit.__version__)
    """))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["4096", "1.0", glmkit.__version__]
    from glmkit.generation.sampling import SamplingParams
    from glmkit.pretrained import GLMForCausalLM, load
    from glmkit.text.tokenizer import ChatGLMTokenizer

    assert (glmkit.SamplingParams, glmkit.GLMForCausalLM, glmkit.load, glmkit.ChatGLMTokenizer) == (
        SamplingParams, GLMForCausalLM, load, ChatGLMTokenizer)
    from glmkit.engine.engine import Engine

    assert glmkit.engine.Engine is Engine and set(glmkit.engine.__all__) <= set(dir(glmkit.engine))
    for package in (glmkit, glmkit.engine):
        with pytest.raises(AttributeError, match="no attribute 'nope'"):
            _ = package.nope


# ----- the server against the engine's interface


def test_async_engine_is_an_engine_client() -> None:
    idle = types.SimpleNamespace(scheduler=Scheduler(1, 0), has_work=lambda: False)
    engine = AsyncEngine(idle)  # its thread waits for commands that never come (a daemon)
    assert isinstance(engine, EngineClient)
    client: EngineClient = engine
    assert (client.queue_depth, client.running) == (0, 0)
    assert inspect.isasyncgenfunction(AsyncEngine.generate)
    assert inspect.signature(AsyncEngine.generate).parameters.keys() == inspect.signature(
        EngineClient.generate).parameters.keys()
    assert not isinstance(object(), EngineClient)


def test_the_server_does_not_import_the_concrete_engine() -> None:
    assert "glmkit.engine.async_engine" not in import_graph()["glmkit.serve.openai"]
    result = _run_python("import sys, glmkit.serve.openai; print('glmkit.engine.async_engine' in sys.modules)")
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr
