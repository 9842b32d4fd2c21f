"""The package layout: no import circles between modules, and every stage says what it offers."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import onnxcut

ROOT = Path(onnxcut.__file__).parent
STAGES = ["graph", "channels", "grad", "attribution", "train", "assemble", "evaluation", "report"]


def _module_name(path: Path) -> str:
    parts = ["onnxcut", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every onnxcut module `path` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import name` imports the submodule pkg.name when one exists.
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in modules else node.module)
    return {m for m in found if m in modules}


def _graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in ROOT.rglob("*.py")}
    return {m: _imports(p, set(paths)) - {m} for m, p in paths.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return [*stack[stack.index(n) :], n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycles():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_each_stage_documents_itself():
    for stage in STAGES:
        if not (ROOT / stage).is_dir():
            continue
        module = importlib.import_module(f"onnxcut.{stage}")
        assert module.__doc__ and len(module.__doc__.strip()) > 40, stage
        assert module.__all__, stage
        for name in module.__all__:
            assert hasattr(module, name), f"onnxcut.{stage} lacks {name}"


def test_modules_stay_small():
    long = {
        _module_name(p): n
        for p in ROOT.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 420
    }
    assert not long, f"modules over 420 lines: {long}"
