"""The package layers and the house rules of the source (issue 19, item 3), read from the source with ``ast``
(nothing is imported, so the test takes a fraction of a second).

1. Layers, lowest first (``LAYERS``): a module imports only from its own layer or an earlier one. One layer
   may hold peers (a tuple): within ``PEERS_ORDERED`` layers the order of the tuple is binding too (a later
   peer may import an earlier one, never the reverse); within the others the peers may import each other as
   long as their packages form no circle. Every module of ``patchrec`` has a layer; the package root
   (``patchrec/__init__.py``) imports nothing of ``patchrec``. No import circles between modules either.
2. No ``patchrec`` / ``patchrec_kernels`` import inside a function, except ``LAZY_OK``: the command modules
   and ``patchrec.cli`` import their library lazily so that ``patchrec --help`` stays fast (and a broken
   optional command never hides the others), and the kernels' public functions dispatch to their pure-PyTorch
   reference from inside the function (DESIGN: the Triton module never imports the reference;
   ``tests/test_patch_embed_checks.py`` pins it). Third-party imports of optional extras (matplotlib, peft,
   ...) may stay inside functions: the rule is about the project's own modules.
3. No private name (``_x``) of one module used by another (``from m import _x`` or ``m._x``), in ``patchrec``,
   ``patchrec_kernels`` and ``benches``. Tests may reach into privates (white-box tests).
4. No function over ``MAX_FUNCTION_LINES`` lines and no module over ``MAX_MODULE_LINES`` lines in ``patchrec``
   and ``patchrec_kernels``.

``python tests/test_layers.py`` prints every violation.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("patchrec", "patchrec_kernels")
PRIVATE_SCOPE = ("patchrec", "patchrec_kernels", "benches")

LAYERS: list[tuple[str, ...]] = [
    ("patchrec_kernels",),  # tensors only: knows nothing of patchrec
    ("patchrec.data",),
    ("patchrec.batching",),
    ("patchrec.model",),
    ("patchrec.persrec", "patchrec.eval", "patchrec.train", "patchrec.baselines"),
    ("patchrec.experiments", "patchrec.reports", "patchrec.serve"),
    ("patchrec.commands", "patchrec.cli", "patchrec.__main__"),
]
PEERS_ORDERED = {("patchrec.persrec", "patchrec.eval", "patchrec.train", "patchrec.baselines")}
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 500
# (module, function) -> why a project import inside that function is fine; a module name alone: all of it.
LAZY_OK = {
    "patchrec.cli": "the commands load lazily: `patchrec --help` stays fast",
    "patchrec.commands": "the commands load their library lazily: `patchrec --help` stays fast",
    ("patchrec_kernels.patch_embed", "patch_embed"): "dispatch to the reference; the Triton module never "
                                                      "imports it at module level",
}


@dataclass
class Module:
    name: str  # dotted, ``pkg`` for ``pkg/__init__.py``
    path: Path
    tree: ast.Module
    lines: int
    imports: list[tuple[str, int, str | None]] = field(default_factory=list)  # (target, line, function)


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _is_project(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in PACKAGES)


def _exists(name: str, known: frozenset[str] = frozenset()) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return name in known or path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _resolve(module: Module, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.name.split(".") if module.path.name == "__init__.py" else module.name.split(".")[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(module: Module, node: ast.Import | ast.ImportFrom, known: frozenset[str]) -> list[str]:
    """The project modules an import statement names: ``from pkg import sub`` is ``pkg.sub`` (the package's
    ``__init__`` runs first for any submodule: not counted), ``from pkg import name`` is ``pkg``."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if _is_project(a.name)]
    base = _resolve(module, node)
    if not _is_project(base):
        return []
    subs = [f"{base}.{a.name}" for a in node.names if _exists(f"{base}.{a.name}", known)]
    return subs + ([base] if len(subs) < len(node.names) else [])


def _walk(node: ast.AST, function: str | None = None) -> Iterator[tuple[ast.AST, str | None]]:
    """Every node with the outermost function it is in (None at module level, class bodies included)."""
    for child in ast.iter_child_nodes(node):
        inner = function
        if function is None and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inner = getattr(child, "name", "<lambda>")
        yield child, inner
        yield from _walk(child, inner)


def _collect_imports(module: Module, known: frozenset[str]) -> Module:
    for node, function in _walk(module.tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            module.imports += [(t, node.lineno, function) for t in _targets(module, node, known)]
    return module


@lru_cache(maxsize=1)
def load() -> dict[str, Module]:
    paths = [path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))]
    known = frozenset(_module_name(p) for p in paths)
    modules = {}
    for path in paths:
        text = path.read_text()
        module = Module(_module_name(path), path, ast.parse(text, str(path)), len(text.splitlines()))
        modules[module.name] = _collect_imports(module, known)
    return modules


def layer_of(name: str) -> tuple[int, int, str] | None:
    """(layer, position among its peers, the peer's prefix) of a module, or None."""
    best = None
    for i, peers in enumerate(LAYERS):
        for j, prefix in enumerate(peers):
            inside = name == prefix or name.startswith(prefix + ".")
            if inside and (best is None or len(prefix) > len(best[2])):
                best = (i, j, prefix)
    return best


def _where(module: Module, line: int) -> str:
    return f"{module.path.relative_to(ROOT)}:{line}"


def layer_violations(modules: dict[str, Module]) -> list[str]:
    found = []
    for module in modules.values():
        if module.name == "patchrec":
            found += [f"{_where(module, line)}: the package root imports {target}"
                      for target, line, _ in module.imports]  # fmt: skip
            continue
        mine = layer_of(module.name)
        if mine is None:
            found.append(f"{module.path.relative_to(ROOT)}: {module.name} is in no layer (LAYERS)")
            continue
        for target, line, _ in module.imports:
            theirs = layer_of(target)
            if target == "patchrec" or theirs is None:
                continue
            upward = theirs[0] > mine[0] or (
                theirs[0] == mine[0] and LAYERS[mine[0]] in PEERS_ORDERED and theirs[1] > mine[1])
            if upward:
                found.append(f"{_where(module, line)}: {module.name} ({mine[2]}) imports {target} "
                             f"({theirs[2]}), a later layer")
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node, or a node importing itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def circle_violations(modules: dict[str, Module]) -> list[str]:
    """Circles among modules (module-level imports), and among the layers' packages."""
    graph = {m.name: {t for t, _, f in m.imports if f is None and t in modules and t != m.name}
             for m in modules.values()}  # fmt: skip
    found = [f"import circle between modules: {' <-> '.join(c)}" for c in _cycles(graph)]
    packages: dict[str, set[str]] = {}
    for m in modules.values():
        mine = layer_of(m.name)
        for t, _, _ in m.imports:
            theirs = layer_of(t)
            if mine and theirs and mine[2] != theirs[2]:
                packages.setdefault(mine[2], set()).add(theirs[2])
    found += [f"import circle between packages: {' <-> '.join(c)}" for c in _cycles(packages)]
    return found


def _lazy_allowed(module: str, function: str | None) -> bool:
    return any(
        (isinstance(key, str) and (module == key or module.startswith(key + ".")))
        or key == (module, function)
        for key in LAZY_OK
    )


def function_import_violations(modules: dict[str, Module]) -> list[str]:
    return [f"{_where(m, line)}: {m.name}.{function} imports {target} inside the function"
            for m in modules.values() for target, line, function in m.imports
            if function is not None and not _lazy_allowed(m.name, function)]  # fmt: skip


def stale_exemptions(modules: dict[str, Module]) -> list[str]:
    """A (module, function) exemption that no longer has a lazy import is dropped from LAZY_OK."""
    used = {(m.name, f) for m in modules.values() for _, _, f in m.imports if f is not None}
    return [f"LAZY_OK lists {key}, which imports nothing inside the function" for key in LAZY_OK
            if isinstance(key, tuple) and key not in used]  # fmt: skip


def private_violations(scope=PRIVATE_SCOPE) -> list[str]:
    found = []
    for package in scope:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            here = Module(_module_name(path), path, tree, 0)
            aliases: dict[str, str] = {}  # local name -> project module it is bound to
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom):
                    base = _resolve(here, node)
                    if not _is_project(base):
                        continue
                    for a in node.names:
                        if a.name.startswith("_") and not a.name.startswith("__") and base != here.name:
                            found.append(f"{_where(here, node.lineno)}: imports {base}.{a.name}")
                        if _exists(f"{base}.{a.name}"):  # ``from pkg import module``
                            aliases[a.asname or a.name] = f"{base}.{a.name}"
                elif isinstance(node, ast.Import):
                    for a in node.names:
                        if _is_project(a.name) and a.asname:
                            aliases[a.asname] = a.name
            for node in ast.walk(tree):
                if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                        and node.value.id in aliases and node.attr.startswith("_")
                        and not node.attr.startswith("__") and aliases[node.value.id] != here.name):
                    found.append(f"{_where(here, node.lineno)}: uses {aliases[node.value.id]}.{node.attr}")
    return found


def size_violations(modules: dict[str, Module]) -> list[str]:
    found = [f"{m.path.relative_to(ROOT)}: {m.lines} lines > {MAX_MODULE_LINES}"
             for m in modules.values() if m.lines > MAX_MODULE_LINES]  # fmt: skip
    for m in modules.values():
        for node in ast.walk(m.tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    found.append(f"{_where(m, node.lineno)}: {node.name} is {n} lines > {MAX_FUNCTION_LINES}")
    return found


def all_violations() -> list[str]:
    modules = load()
    return (layer_violations(modules) + circle_violations(modules) + function_import_violations(modules)
            + stale_exemptions(modules) + private_violations() + size_violations(modules))  # fmt: skip


# ---- the tests ---------------------------------------------------------------------------------------------
def test_layer_order():
    assert layer_violations(load()) == []


def test_no_import_circles():
    assert circle_violations(load()) == []


def test_no_project_import_inside_functions():
    modules = load()
    assert function_import_violations(modules) == []
    assert stale_exemptions(modules) == []


def test_no_private_names_across_modules():
    assert private_violations() == []


def test_sizes():
    assert size_violations(load()) == []


# ---- the checks themselves catch what they are for ---------------------------------------------------------
def _fake(name: str, source: str, known: frozenset[str] = frozenset()) -> Module:
    module = Module(name, ROOT.joinpath(*name.split(".")).with_suffix(".py"), ast.parse(source),
                    len(source.splitlines()))  # fmt: skip
    return _collect_imports(module, known)


def test_checks_catch_violations():
    up = _fake("patchrec.batching.x", "from patchrec.model.decoder import PackedDecoder\n")
    assert len(layer_violations({up.name: up})) == 1
    peer_up = _fake("patchrec.eval.x", "import patchrec.train.loop\n")
    peer_down = _fake("patchrec.train.x", "from patchrec.eval import metrics\n")
    assert len(layer_violations({peer_up.name: peer_up})) == 1
    assert layer_violations({peer_down.name: peer_down}) == []
    homeless = _fake("patchrec.demo", "x = 1\n")
    assert len(layer_violations({homeless.name: homeless})) == 1
    kernels = _fake("patchrec_kernels.x", "from patchrec.data.dataset import Dataset\n")
    assert len(layer_violations({kernels.name: kernels})) == 1
    known = frozenset({"patchrec.data.a", "patchrec.data.b"})
    a = _fake("patchrec.data.a", "from patchrec.data.b import f\n", known)
    b = _fake("patchrec.data.b", "from patchrec.data import a\n", known)
    assert len(circle_violations({a.name: a, b.name: b})) == 1
    lazy = _fake("patchrec.train.x", "def f():\n    from patchrec.eval.metrics import ranking_metrics\n")
    assert len(function_import_violations({lazy.name: lazy})) == 1
    command = _fake("patchrec.commands.x", "def run():\n    from patchrec.train.loop import train\n")
    assert function_import_violations({command.name: command}) == []
    long = _fake("patchrec.data.x", "def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES)
    assert len(size_violations({long.name: long})) == 1


if __name__ == "__main__":
    problems = all_violations()
    print("\n".join(problems) or "no violations")
    print(f"{len(problems)} violation(s)")
