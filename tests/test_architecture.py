"""The module map in ARCHITECTURE.md is the code's: checked, not just written down.

ARCHITECTURE.md has one table row per module (or package) of ``monomail/``, with its
layer. These tests read that table and the code's ``import`` statements (with ``ast``,
nothing is imported) and check what DESIGN.md and issue 8 ask of the layout:

- every module is on the map, and everything on the map exists;
- a module imports only modules of its own layer or a lower one;
- there is no import cycle;
- no module imports another module's private (``_name``) names;
- each third-party library is imported in one module only;
- no file in ``monomail/`` is over 600 lines.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "monomail"
LAYERS = ("vocabulary", "pure", "adapter", "engine", "face")
MAX_LINES = 600
# A third-party library is imported in one module (or one package) only.
ONE_HOME = {
    "aiosmtpd": "server",
    "aiosmtplib": "remote",
    "dns": "resolver",
    "tomllib": "config",
    "tomli_w": "importer",
    "dkim": "dkimsig",
    "nacl": "dkimsig",
    "cryptography": "dkimsig",
    "spf": "spfcheck",
    "authheaders": "dmarc",
    "authres": "authresults",
    "prometheus_client": "metrics",
}
_ROW = re.compile(r"^\|\s*`monomail/([\w/]+?)(?:\.py)?/?`\s*\|\s*(\w+)\s*\|", re.MULTILINE)


def module_name(path: Path) -> str:
    """``monomail/procmail/engine.py`` → ``procmail.engine``; ``__init__`` → the package."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@functools.cache
def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if module_name(p)}


@functools.cache
def parsed(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"))


def the_map() -> dict[str, str]:
    """module or package name → layer, from ARCHITECTURE.md's table rows."""
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    return {name.replace("/", "."): layer for name, layer in _ROW.findall(text)}


def layer_of(module: str, mapping: dict[str, str]) -> str | None:
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        layer = mapping.get(".".join(parts[:i]))
        if layer:
            return layer
    return None


def home_of(module: str, mapping: dict[str, str]) -> str:
    """The map entry a module belongs to (itself, or the package listed for it)."""
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in mapping:
            return ".".join(parts[:i])
    return module


def imports(path: Path, module: str) -> list[tuple[str, list[str], int]]:
    """(our module imported, names taken from it, line) for every import of ours, anywhere
    in the file (function-level imports included)."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    modules = all_modules()
    out = []
    for node in ast.walk(parsed(path)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package[: len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
                target = ".".join(parts)
            elif node.module and node.module.split(".")[0] == "monomail":
                target = node.module.partition(".")[2]
            else:
                continue
            names = []
            for alias in node.names:  # ``from . import x``, ``from .pkg import sub``: submodules
                sub = f"{target}.{alias.name}" if target else alias.name
                if sub in modules:
                    out.append((sub, [], node.lineno))
                else:
                    names.append(alias.name)
            if names and target:
                out.append((target, names, node.lineno))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "monomail" and "." in a.name:
                    out.append((a.name.partition(".")[2], [], node.lineno))
    return out


def third_party(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(parsed(path)):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found & set(ONE_HOME)


def test_every_module_is_on_the_map_and_the_map_is_true():
    mapping = the_map()
    assert mapping, "ARCHITECTURE.md has no module table"
    for layer in mapping.values():
        assert layer in LAYERS, f"unknown layer {layer!r} in ARCHITECTURE.md"
    modules = all_modules()
    missing = [m for m in modules if m not in ("__main__",) and layer_of(m, mapping) is None]
    assert not missing, f"modules not on ARCHITECTURE.md's map: {missing}"
    stale = [m for m in mapping if m not in modules]
    assert not stale, f"ARCHITECTURE.md lists modules that do not exist: {stale}"


def test_imports_go_down_the_layers_only():
    mapping = the_map()
    wrong = []
    for module, path in all_modules().items():
        mine = layer_of(module, mapping)
        if mine is None:
            continue
        for target, _, line in imports(path, module):
            theirs = layer_of(target, mapping)
            if theirs is not None and LAYERS.index(theirs) > LAYERS.index(mine):
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {mine} {module} imports {theirs} {target}")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    mapping = the_map()
    graph: dict[str, set[str]] = {}
    for module, path in all_modules().items():
        home = home_of(module, mapping)
        for target, _, _ in imports(path, module):
            there = home_of(target, mapping)
            if there != home:
                graph.setdefault(home, set()).add(there)
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, trail: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle.extend([*trail[trail.index(nxt):], nxt] if nxt in trail else [node, nxt])
                return True
            if state.get(nxt) is None and visit(nxt, [*trail, nxt]):
                return True
        state[node] = 2
        return False

    for start in sorted(graph):
        if state.get(start) is None and visit(start, [start]):
            break
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_no_module_takes_another_modules_private_names():
    mapping = the_map()
    wrong = []
    for module, path in all_modules().items():
        for target, names, line in imports(path, module):
            if home_of(target, mapping) == home_of(module, mapping) and "." in module:
                continue  # inside one package, its modules share what they like
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                wrong.append(f"{path.relative_to(ROOT)}:{line}: from {target} import {', '.join(private)}")
    assert not wrong, "\n".join(wrong)


def test_each_library_is_imported_in_one_place():
    mapping = the_map()
    wrong = []
    for module, path in all_modules().items():
        for lib in third_party(path):
            if home_of(module, mapping) != ONE_HOME[lib] and module.split(".")[0] != ONE_HOME[lib]:
                wrong.append(f"{path.relative_to(ROOT)} imports {lib} (its one home is {ONE_HOME[lib]})")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_file_over_600_lines(path: Path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines"
