"""The import contract: comneck's layers, read from the source (AST), so the house stays as README's Architecture
section draws it. A module imports only from its own layer or the ones below; subpackages never import each
other in a cycle; only the Click layer imports click; the container stays stdlib + numpy."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "comneck_cli"

# Bottom to top. A unit is a subpackage or a top-level module of comneck_cli (README -> Architecture).
LAYERS: list[set[str]] = [
    {"errors", "defaults", "formats"},
    {"weights", "modelfiles", "hub", "io"},
    {"codecs", "clip", "models"},
    {"coding", "features"},
    {"mllm"},
    {"train", "eval", "batch", "serve"},
    {"cli", "__main__"},
]
LAYER_OF = {unit: level for level, units in enumerate(LAYERS) for unit in units}
FOLDERS = {"formats": REPO / "formats", "weights": REPO / "weights"}  # installed as comneck_cli.formats / .weights


def _sources() -> dict[str, Path]:
    """Every module of the installed package by its dotted name (the mapped folders included)."""
    found = {}
    for path in sorted((REPO / PACKAGE).rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for unit, folder in FOLDERS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = (PACKAGE, unit, *path.relative_to(folder).with_suffix("").parts)
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(module: str, path: Path) -> set[str]:
    """Absolute names of what a module imports (relative imports resolved), at any depth of the file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _unit(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if parts[0] == PACKAGE and len(parts) > 1 else None


SOURCES = _sources()
EDGES = {module: {u for name in _imports(module, path) if (u := _unit(name)) in LAYER_OF}
         for module, path in SOURCES.items()}


def test_every_unit_has_a_layer():
    """A new subpackage or module must be placed in a layer (and in README's diagram) before it lands."""
    units = {_unit(m) for m in SOURCES} - {None}
    assert units <= set(LAYER_OF), f"not in any layer: {sorted(units - set(LAYER_OF))}"


@pytest.mark.parametrize("module", sorted(m for m in SOURCES if _unit(m)))
def test_imports_run_downwards(module):
    unit = _unit(module)
    upward = sorted(u for u in EDGES[module] if LAYER_OF[u] > LAYER_OF[unit])
    assert not upward, f"{module} (layer {LAYER_OF[unit]}) imports {upward} from above"


def test_no_cycles_between_units():
    graph = defaultdict(set)
    for module, units in EDGES.items():
        if _unit(module) is None:  # the package root re-exports lazily, by name
            continue
        graph[_unit(module)].update(u for u in units if u != _unit(module))
    seen, stack = set(), []

    def visit(node: str) -> None:
        if node in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(node):] + [node]))
        if node in seen:
            return
        stack.append(node)
        for nxt in sorted(graph[node]):
            visit(nxt)
        stack.pop()
        seen.add(node)

    for node in sorted(graph):
        visit(node)


def test_only_the_click_layer_imports_click():
    """The library raises typed errors and prints nothing of its own: options, messages and exit codes are the CLI's."""
    offenders = sorted(m for m, p in SOURCES.items() if _unit(m) not in ("cli", "__main__")
                       and any(n == "click" or n.startswith("click.") for n in _imports(m, p)))
    assert not offenders, f"click imported outside comneck_cli.cli: {offenders}"


def test_the_container_is_stdlib_and_numpy():
    allowed_roots = {"numpy", "__future__", PACKAGE}
    import sys

    for module, path in SOURCES.items():
        if _unit(module) != "formats":
            continue
        roots = {name.split(".")[0] for name in _imports(module, path)}
        foreign = {r for r in roots if r not in allowed_roots and r not in sys.stdlib_module_names}
        inside = {n for n in _imports(module, path) if _unit(n) not in (None, "formats", "errors")}
        assert not foreign and not inside, f"{module} imports {sorted(foreign | inside)}"


def test_the_contract_catches_an_upward_import(tmp_path):
    """The checker itself: a codec module that imports the CLI is reported."""
    fake = tmp_path / "bad.py"
    fake.write_text("from comneck_cli.cli import main\nfrom ..coding import encode\n")
    assert _imports("comneck_cli.codecs.bad", fake) >= {"comneck_cli.cli.main", "comneck_cli.coding.encode"}
    assert {_unit(n) for n in _imports("comneck_cli.codecs.bad", fake)} >= {"cli", "coding"}
