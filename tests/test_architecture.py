"""The house rules of docs/architecture.md, checked on the source of every package.

- imports run one way: between packages (shared <- ground, onboard, flight_sim <- eoedge) and,
  inside a package, from library modules up to stages, commands and the CLI, never back down;
- no import cycle between modules;
- no private name (`_x`) imported from another module;
- imports sit at the top of a module; a function may import only a heavy optional dependency
  (OPTIONAL), or anything when it is the CLI's lazy dispatch (a `cli.py` module).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

PACKAGES = ("shared", "ground", "onboard", "flight_sim", "eoedge")
# Which packages each package may import (DESIGN.md's table).
MAY_IMPORT = {
    "shared": set(),
    "ground": {"shared"},
    "onboard": {"shared"},
    "flight_sim": {"shared"},
    "eoedge": {"shared", "ground", "onboard", "flight_sim"},
}
# Inside a package, the layer of a module is the index of the first of its path parts found here;
# everything else is library (layer 0). A module may import its own layer or below.
LAYERS = ("stages", "commands", "cli", "__main__")
# Third-party modules a function may import lazily: optional, heavy, or slow to import.
OPTIONAL = {"matplotlib", "rasterio", "PIL", "scipy", "tqdm", "nncf", "onnxruntime", "optuna",
            "cv2", "ctypes"}


def _modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            rel = path.relative_to(REPO).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _layer(module: str) -> int:
    parts = module.split(".")[1:]
    for i, name in enumerate(LAYERS, start=1):
        if name in parts:
            return i
    return 0


def _imports(module: str, path: Path):
    """(imported module, names, lineno, inside a function) for each import of our packages."""
    tree = ast.parse(path.read_text(), filename=str(path))
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    in_function.add(id(inner))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno, id(node) in in_function
        elif isinstance(node, ast.ImportFrom):
            if node.level:      # relative: resolve against this module's package
                base = module.split(".")
                is_pkg = path.name == "__init__.py"
                base = base if is_pkg else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            # `from pkg import submodule` imports the submodule
            subs = [n for n in names if f"{target}.{n}" in MODULES]
            for n in subs:
                yield f"{target}.{n}", [], node.lineno, id(node) in in_function
            rest = [n for n in names if n not in subs]
            if rest or not subs:
                yield target, rest, node.lineno, id(node) in in_function


def _own(target: str) -> str | None:
    """The module of ours that `target` names (or its nearest parent), else None."""
    parts = target.split(".")
    while parts:
        name = ".".join(parts)
        if name in MODULES:
            return name
        parts.pop()
    return None


def _graph():
    edges, problems = {}, []
    for module, path in MODULES.items():
        pkg = module.split(".")[0]
        edges[module] = set()
        for target, names, line, lazy in _imports(module, path):
            where = f"{path.relative_to(REPO)}:{line}"
            own = _own(target)
            top = target.split(".")[0]
            if own is None:
                if lazy and top not in OPTIONAL and not module.endswith(".cli") and top != "__future__":
                    problems.append(f"{where}: imports {target} inside a function (move it to the top)")
                continue
            other = own.split(".")[0]
            if other != pkg and other not in MAY_IMPORT[pkg]:
                problems.append(f"{where}: {pkg} may not import {other} ({target})")
            if other == pkg and _layer(own) > _layer(module):
                problems.append(f"{where}: imports upward, {module} -> {own}")
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private and own != module:
                problems.append(f"{where}: imports private {', '.join(private)} from {own}")
            if lazy and not module.endswith(".cli"):
                problems.append(f"{where}: imports {target} inside a function (move it to the top)")
            if own != module:
                edges[module].add(own)
    return edges, problems


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(edges):
        if v not in index:
            visit(v)
    return out


EDGES, PROBLEMS = _graph()


@pytest.mark.parametrize("pkg", PACKAGES)
def test_imports_follow_the_rules(pkg):
    mine = [p for p in PROBLEMS if p.startswith(f"{pkg}/")]
    assert not mine, "\n".join(mine)


def test_no_import_cycles():
    # a package's __init__ importing its submodules is not a cycle worth naming
    edges = {m: {t for t in ts if not (m.startswith(t + ".") and MODULES[t].name == "__init__.py")}
             for m, ts in EDGES.items()}
    cycles = _cycles(edges)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_checker_sees_what_it_should(tmp_path):
    """The rules bite: a planted upward, private, lazy and cyclic import is each found."""
    assert _layer("ground.stages.distill") == 1 and _layer("ground.cli") == 3 and _layer("onboard.__main__") == 4
    assert _layer("ground.models.size") == 0
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    src = tmp_path / "m.py"
    src.write_text("from shared.bands import _x\n\ndef f():\n    import json\n")
    found = list(_imports("shared.m", src))
    assert ("shared.bands", ["_x"], 1, False) in found
    assert ("json", [], 4, True) in found
