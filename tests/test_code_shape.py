"""Static checks of the code's shape, read with ``ast`` (nothing is imported):

- no function in mmerase/ or eval/ is longer than 80 lines;
- no module in mmerase/, eval/ or benchmarks/ imports a name starting with ``_`` (or reads one as an attribute of an
  imported module) from a module of mmerase/ or eval/ other than itself;
- the module-level imports of the ``mmerase`` package (eval/ installs as ``mmerase.eval``) form no cycle. Imports
  inside functions are not edges; imports under ``if TYPE_CHECKING:`` are (a cycle of types is still a cycle).

Each list of known exceptions below names why the exception is there; an entry that no longer applies fails
:func:`test_no_stale_exceptions`, so the lists only shrink.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 80

# Where each package lives in the repository (eval/ installs as mmerase.eval: see pyproject.toml).
PACKAGES = {"mmerase": REPO / "mmerase", "mmerase.eval": REPO / "eval"}

# "path:qualified.name" -> reason.
LONG_FUNCTIONS: dict[str, str] = {
}

# (importing file, imported module, name) -> reason.
PRIVATE_IMPORTS: dict[tuple[str, str, str], str] = {
}

# frozenset of the modules on a cycle -> reason.
CYCLES: dict[frozenset[str], str] = {
}


def module_files() -> Iterator[tuple[str, Path]]:
    """``(module name, file)`` for every module of the mmerase package, mmerase.eval included."""
    for package, root in PACKAGES.items():
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join([package, *parts])
            if name.startswith("mmerase.eval") and package == "mmerase":
                continue
            yield name, path


MODULES = dict(module_files())


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


@functools.cache
def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


# ------------------------------------------------------------------------------------------------ function length
def functions(tree: ast.AST, prefix: str = "") -> Iterator[tuple[str, ast.AST]]:
    """``(qualified name, node)`` of every function, methods and nested functions included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node
            yield from functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from functions(node, f"{prefix}{node.name}.")
        else:
            yield from functions(node, prefix)


def lengths(tree: ast.AST) -> dict[str, int]:
    """Lines of each function, from its ``def`` to its last line."""
    return {name: node.end_lineno - node.lineno + 1 for name, node in functions(tree)}


def long_functions() -> dict[str, int]:
    return {f"{rel(path)}:{name}": n for path in MODULES.values() for name, n in lengths(parse(path)).items()
            if n > MAX_LINES}


# ------------------------------------------------------------------------------------------------ imports
def module_of(path: Path) -> str | None:
    """The module name of a file of the mmerase package; None for a file elsewhere (benchmarks/)."""
    return next((name for name, p in MODULES.items() if p == path), None)


def resolve(importer: str | None, path: Path, level: int, module: str | None) -> str | None:
    """The absolute name of ``from <level dots><module> import ...`` written in ``importer``."""
    if level == 0:
        return module
    if importer is None:
        return None
    package = importer.split(".") if path.name == "__init__.py" else importer.split(".")[:-1]
    base = package[:len(package) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def imports(tree: ast.Module, importer: str | None, path: Path, module_level: bool
            ) -> Iterator[tuple[ast.stmt, str, list[str]]]:
    """``(statement, absolute module, imported names)`` of each import; ``import a.b`` gives ``("a.b", [])``.
    With ``module_level`` only the statements run when the module is imported (top level, and inside top-level
    ``if``/``try``/``with`` blocks)."""
    def walk(nodes: list[ast.stmt]) -> Iterator[ast.stmt]:
        for node in nodes:
            yield node
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and module_level:
                continue
            for field in ("body", "orelse", "finalbody", "handlers"):
                yield from walk(getattr(node, field, []) or [])

    nodes = walk(tree.body) if module_level else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node, alias.name, []
        elif isinstance(node, ast.ImportFrom):
            target = resolve(importer, path, node.level, node.module)
            if target is not None:
                yield node, target, [a.name for a in node.names]


def ours(module: str) -> bool:
    return module == "mmerase" or module.startswith("mmerase.")


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports() -> set[tuple[str, str, str]]:
    """Every ``(file, module, name)`` where a file of mmerase/, eval/ or benchmarks/ takes an underscore name from
    another module of ours."""
    found = set()
    for path in list(MODULES.values()) + sorted((REPO / "benchmarks").rglob("*.py")):
        found |= private_names(parse(path), module_of(path), path)
    return found


def private_names(tree: ast.Module, importer: str | None, path: Path) -> set[tuple[str, str, str]]:
    """The underscore names one file takes from other modules of ours: ``from m import _x``, and ``m._x`` where
    ``m`` was bound to one of our modules by an import."""
    found = set()
    bound: dict[str, str] = {}  # local name -> the module of ours it stands for
    for node, module, _names in imports(tree, importer, path, module_level=False):
        if not ours(module):
            continue
        for alias in node.names:
            if isinstance(node, ast.Import):
                if alias.asname:
                    bound[alias.asname] = alias.name
            elif f"{module}.{alias.name}" in MODULES:
                bound[alias.asname or alias.name] = f"{module}.{alias.name}"
            elif private(alias.name) and module != importer:
                found.add((rel(path), module, alias.name))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and private(node.attr):
            module = dotted(node.value, bound)
            if module is not None and module != importer:
                found.add((rel(path), module, node.attr))
    return found


def dotted(node: ast.expr, bound: dict[str, str]) -> str | None:
    """The module of ours an expression such as ``mmerase.demo`` or ``demo`` (bound by an import) names."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    head = bound.get(node.id, node.id if node.id == "mmerase" else None)
    if head is None:
        return None
    name = ".".join([head, *reversed(parts)])
    return name if name in MODULES else None


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of ours its module-level imports load."""
    return {m: edges(parse(path), m, path) for m, path in MODULES.items()}


def edges(tree: ast.Module, importer: str, path: Path) -> set[str]:
    """The modules of ours one module's module-level imports load: the module named, or for ``from m import x``
    the submodule ``m.x`` if there is one, else ``m`` (a package's ``__init__`` counts only when a name is taken
    from it, not for each of its submodules)."""
    out: set[str] = set()
    for node, module, names in imports(tree, importer, path, module_level=True):
        if not ours(module):
            continue
        targets = {module} if isinstance(node, ast.Import) or not names else set()
        targets |= {f"{module}.{name}" if f"{module}.{name}" in MODULES else module for name in names}
        out |= {t for t in targets if t in MODULES and t != importer}
    return out


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(frozenset(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


# ------------------------------------------------------------------------------------------------ the tests
def test_the_checks_see_the_code():
    """The walkers find what they must (a check that reads nothing would pass vacuously)."""
    assert {"mmerase.cli", "mmerase.influence.engine", "mmerase.eval", "mmerase.eval.cli"} <= set(MODULES)
    assert "mmerase.eval.errors" in import_graph()["mmerase.eval.judge"]

    body = "".join(f"        x{i} = {i}\n" for i in range(MAX_LINES))
    tree = ast.parse(f"def short():\n    pass\n\n\nclass C:\n    def long(self):\n{body}")
    assert lengths(tree) == {"short": 2, "C.long": MAX_LINES + 1}

    path = MODULES["mmerase.influence.precondition"]
    tree = ast.parse("from typing import TYPE_CHECKING\nfrom .engine import InfluenceEngine\nfrom . import vectors\n"
                     "import mmerase.options\nif TYPE_CHECKING:\n    from .problem import Problem\n"
                     "def f():\n    from .plan import resolve\n")
    assert edges(tree, "mmerase.influence.precondition", path) == {
        "mmerase.influence.engine", "mmerase.influence.vectors", "mmerase.options", "mmerase.influence.problem"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset("abc")]

    tree = ast.parse("from .demo import _split\nimport mmerase.demo as d\nimport mmerase.record\n"
                     "x = d._train_adapter, mmerase.record._jsonable, mmerase.cli._Parser, d.__name__\n")
    found = private_names(tree, "mmerase.cli", MODULES["mmerase.cli"])
    assert {(m, n) for _, m, n in found} == {("mmerase.demo", "_split"), ("mmerase.demo", "_train_adapter"),
                                             ("mmerase.record", "_jsonable")}


def test_functions_fit_on_a_screen():
    found = {k: v for k, v in long_functions().items() if k not in LONG_FUNCTIONS}
    assert not found, f"functions over {MAX_LINES} lines (split them): {found}"


def test_no_underscore_names_across_modules():
    found = sorted(private_imports() - set(PRIVATE_IMPORTS))
    assert not found, f"names starting with _ taken from another module (make them public or move them): {found}"


def test_no_import_cycles():
    found = [sorted(c) for c in cycles(import_graph()) if c not in CYCLES]
    assert not found, f"module-level import cycles: {found}"


def test_no_stale_exceptions():
    stale = [k for k in LONG_FUNCTIONS if k not in long_functions()]
    stale += [k for k in PRIVATE_IMPORTS if k not in private_imports()]
    stale += [sorted(k) for k in CYCLES if k not in cycles(import_graph())]
    assert not stale, f"fixed: remove these from the exception lists in {Path(__file__).name}: {stale}"


def test_every_package_is_installed():
    """pyproject.toml lists every package of the source tree (one left out would silently not ship) and maps
    mmerase.eval to eval/ as this test reads it."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    packages = {name for name, path in MODULES.items() if path.name == "__init__.py"}
    assert set(setuptools["packages"]) == packages
    assert setuptools["package-dir"] == {name: rel(root) for name, root in PACKAGES.items() if name != "mmerase"}
