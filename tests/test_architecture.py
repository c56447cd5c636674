"""The package layout is the architecture: imports go one way (cli -> studies, bench -> training -> model -> cells,
data), with no circles. Computed from the source with `ast`, every import counted (top-level, inside functions, under
TYPE_CHECKING): a newcomer can trust the tree."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "mlstm"

# a module belongs to the longest prefix listed; it may import its own group and any lower rank, never a higher one
LAYERS = {
    "mlstm.errors": 0,
    "mlstm.atomic": 0,
    "mlstm.config": 1,
    "mlstm.data": 1,
    "mlstm.cells.kernels": 1,
    "mlstm.cells": 2,
    "mlstm.model": 3,
    "mlstm.evaluate": 3,
    "mlstm.sampling": 3,
    "mlstm.dynamic_eval": 3,
    "mlstm.training": 4,
    "mlstm.studies": 5,
    "mlstm.bench": 5,
    "mlstm.cli": 6,
}
FACADE = "mlstm"  # mlstm/__init__.py: the public API, loaded lazily; no module of the package imports it


def module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("mlstm", *path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports; `from pkg import sub` counts as importing pkg.sub when that is a module."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "mlstm")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "mlstm":
                continue
            subs = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known]
            found.update(subs if len(subs) == len(node.names) else [base, *subs])
    return {m for m in found if m in known and m != name}


def layer_of(name: str) -> tuple[str, int]:
    group = max((g for g in LAYERS if name == g or name.startswith(g + ".")), key=len)
    return group, LAYERS[group]


def graph() -> dict[str, set[str]]:
    names = module_names()
    return {name: imports_of(name, path, set(names)) for name, path in names.items()}


def test_every_module_has_a_layer():
    unplaced = [n for n in module_names() if n != FACADE and not any(n == g or n.startswith(g + ".") for g in LAYERS)]
    assert not unplaced, f"modules outside every layer of LAYERS: {unplaced}"


def test_imports_go_one_way():
    upward = []
    for name, targets in graph().items():
        if name == FACADE:
            continue
        group, rank = layer_of(name)
        for target in targets:
            if target == FACADE:
                upward.append(f"{name} imports the facade mlstm/__init__")
                continue
            target_group, target_rank = layer_of(target)
            if target_group != group and target_rank > rank:
                upward.append(f"{name} ({group}, {rank}) imports {target} ({target_group}, {target_rank})")
    assert not upward, "imports from a higher layer:\n" + "\n".join(sorted(upward))


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles():
    # a package's __init__ importing its own modules is how a package exports; a module importing its own package's
    # __init__ back closes a circle and is counted
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


@pytest.mark.parametrize(
    "source, expected",
    [
        ("from mlstm.training import trainer, checkpoint\n", {"mlstm.training.trainer", "mlstm.training.checkpoint"}),
        ("from mlstm.training import train\n", {"mlstm.training"}),
        ("def f():\n    import mlstm.studies.runs\n", {"mlstm.studies.runs"}),
    ],
)
def test_imports_of_reads_every_form(tmp_path, source, expected):
    path = tmp_path / "probe.py"
    path.write_text(source)
    known = {"mlstm.training", "mlstm.training.trainer", "mlstm.training.checkpoint", "mlstm.studies.runs"}
    assert imports_of("mlstm.probe", path, known) == expected
