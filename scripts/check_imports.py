"""Import check: every ``biaslens`` module imports on its own, the import graph has no cycle,
and every module says which of its names are public.

Three checks (docs/architecture.md says what the graph should look like):

1. **Alone.** Each module ``biaslens.*`` is imported by itself in a fresh interpreter (``python -c
   "import biaslens.x"``); any failure is an error. This catches a module that only works because
   some other module happened to be imported first.
2. **Cycles.** The static import graph is read from the source with :mod:`ast`: every import of a
   ``biaslens`` module, at module level (what runs on import, ``try``/``if`` blocks and class
   bodies included) and inside functions (what runs on first call), ``if TYPE_CHECKING:`` blocks
   left out. ``from biaslens.a import b`` is an edge to ``biaslens.a.b`` where that is a module,
   else to the module that defines ``b`` (a package's re-exports and lazy attributes are followed
   to their home). A cycle among module-level imports is an error (it can fail at import time,
   depending on which module is imported first); a cycle that needs a function-level import is
   reported separately and is an error too, unless named with ``--allow``: the layers should only
   ever import downwards.
3. **Public names.** Every module keeps a literal ``__all__``, every name in it exists, and no
   module, benchmark or script imports from a biaslens module a name that module does not list
   (its private helpers stay private).

Usage: ``python scripts/check_imports.py [--no-alone] [--graph] [--allow A,B] [--jobs N]``.
``--graph`` prints the package-level edges (who imports whom), module-level and function-level
apart. Exit status 0 when clean, 1 on any failure or cycle. Standard library only; run it with the
interpreter that has biaslens installed.
"""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

__all__ = ["ROOT", "PACKAGE", "modules", "import_edges", "cycles", "import_alone",
           "public_api_problems", "private_uses", "main"]

REPO = Path(__file__).resolve().parents[1]
#: the folder whose files are the package ``biaslens`` (pyproject: package-dir biaslens = src)
ROOT = REPO / "src"
PACKAGE = "biaslens"


def modules(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Every module of the package: dotted name → source file (``__init__.py`` for packages)."""
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if "__pycache__" in rel.parts or any(p.startswith(".") for p in rel.parts):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        elif not all((root.joinpath(*parts[:i]) / "__init__.py").exists() for i in range(1, len(parts))):
            continue  # a loose script in a data folder, not importable as a module
        found[".".join([package, *parts])] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` is or lies in (``biaslens.a.f`` → ``biaslens.a``)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def _absolute(node: ast.ImportFrom, here: str, is_pkg: bool) -> str:
    """The absolute module name of ``from X import ...`` written in module ``here``."""
    if not node.level:
        return node.module or ""
    base = here.split(".") if is_pkg else here.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _ours(mod: str) -> bool:
    return mod == PACKAGE or mod.startswith(PACKAGE + ".")


def _walk(tree: ast.AST, on_import, in_function: bool = False) -> None:
    """Call ``on_import(node, in_function)`` for each import, ``if TYPE_CHECKING:`` left out."""
    if isinstance(tree, ast.If) and _is_type_checking(tree.test):
        for child in tree.orelse:
            _walk(child, on_import, in_function)
        return
    if isinstance(tree, (ast.Import, ast.ImportFrom)):
        on_import(tree, in_function)
        return
    inner = in_function or isinstance(tree, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
    for child in ast.iter_child_nodes(tree):
        _walk(child, on_import, inner)


class _Facade:
    """What a package's ``__init__`` makes of a name: ``from pkg import name`` loads the modules
    ``homes[name]`` (a submodule, a re-export's source, a lazy attribute's module, or what a
    function defined there imports); any other name is the package body itself."""

    def __init__(self, name: str, tree: ast.Module, known: dict[str, Path]):
        self.name = name
        self.homes: dict[str, set[str]] = {}
        for node in tree.body:
            if isinstance(node, ast.ImportFrom):
                mod = _absolute(node, name, True)
                if _ours(mod):
                    for alias in node.names:
                        sub = f"{mod}.{alias.name}"
                        home = sub if sub in known else _resolve(mod, known)
                        if home:
                            self.homes[alias.asname or alias.name] = {home}
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                used: set[str] = set()

                def grab(imp, _fn, used=used):
                    used.update(_plain_targets(imp, name, True, known))

                _walk(node, grab, True)
                self.homes[node.name] = used - {name}
        for node in ast.walk(tree):  # lazy attribute maps: {"attr": "biaslens.x.y", ...}
            if isinstance(node, ast.Dict):
                for k, v in zip(node.keys, node.values):
                    if (isinstance(k, ast.Constant) and isinstance(v, ast.Constant)
                            and isinstance(v.value, str) and v.value in known):
                        self.homes[k.value] = {v.value}
            elif (isinstance(node, ast.DictComp) and isinstance(node.value, ast.Constant)
                  and node.value.value in known and len(node.generators) == 1
                  and isinstance(node.generators[0].iter, (ast.Tuple, ast.List))):
                for elt in node.generators[0].iter.elts:
                    if isinstance(elt, ast.Constant):
                        self.homes[elt.value] = {node.value.value}

    def targets(self, attr: str, known: dict[str, Path]) -> set[str]:
        sub = f"{self.name}.{attr}"
        if sub in known:
            return {sub}
        return set(self.homes.get(attr, {self.name}))


def _plain_targets(node: ast.Import | ast.ImportFrom, here: str, is_pkg: bool,
                   known: dict[str, Path]) -> set[str]:
    """The biaslens modules one import statement names, packages taken as they are."""
    out: set[str] = set()
    if isinstance(node, ast.Import):
        for alias in node.names:
            if _ours(alias.name) and (t := _resolve(alias.name, known)) is not None:
                out.add(t)
        return out
    mod = _absolute(node, here, is_pkg)
    if _ours(mod):
        for alias in node.names:
            sub = f"{mod}.{alias.name}"
            t = sub if sub in known else _resolve(mod, known)
            if t is not None:
                out.add(t)
    return out


def _attributes_of(tree: ast.AST, alias: str) -> set[str]:
    """Every ``attr`` in ``alias.attr`` anywhere in ``tree``."""
    return {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Name) and n.value.id == alias}


def import_edges(known: dict[str, Path] | None = None) -> dict[str, dict[str, set[str]]]:
    """``{"module": {a: {b, ...}}, "function": {...}}``: which biaslens modules each module
    imports at module level and inside functions (type-checking-only imports left out).

    An import of a package is taken name by name (:class:`_Facade`): ``from biaslens.edit import
    lsdm`` is an edge to ``biaslens.edit.least_squares``, where the package's lazy attribute
    sends it, and ``import biaslens`` followed by ``biaslens.load(...)`` an edge to what ``load``
    imports. A package's own edges are its module-level imports; what its functions import counts
    for their callers."""
    known = modules() if known is None else known
    trees = {name: ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
             for name, path in known.items()}
    facades = {name: _Facade(name, trees[name], known)
               for name, path in known.items() if path.name == "__init__.py"}
    edges: dict[str, dict[str, set[str]]] = {"module": {}, "function": {}}
    for name, path in known.items():
        tree = trees[name]
        is_pkg = path.name == "__init__.py"
        levels: dict[bool, set[str]] = {False: set(), True: set()}

        def on_import(node, in_function, tree=tree, name=name, is_pkg=is_pkg, levels=levels):
            if is_pkg and in_function:
                return  # counted for the callers of the package's functions
            found: set[str] = set()
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if not _ours(alias.name) or (t := _resolve(alias.name, known)) is None:
                        continue
                    if alias.asname is None and alias.name == PACKAGE or (
                            alias.asname is not None and t in facades):
                        local = alias.asname or alias.name
                        for attr in _attributes_of(tree, local):
                            found |= facades[t].targets(attr, known)
                    else:
                        found.add(t)
            else:
                mod = _absolute(node, name, is_pkg)
                if not _ours(mod):
                    return
                for alias in node.names:
                    sub = f"{mod}.{alias.name}"
                    if sub in known:
                        found.add(sub)
                    elif mod in facades:
                        found |= facades[mod].targets(alias.name, known)
                    elif (t := _resolve(mod, known)) is not None:
                        found.add(t)
            levels[in_function].update(found - {name})

        _walk(tree, on_import)
        edges["module"][name] = levels[False]
        edges["function"][name] = levels[True] - levels[False]
    return edges


def _top_level_names(tree: ast.Module) -> set[str]:
    """Names a module binds at its top level (definitions, assignments, imports), ``if``/``try``
    branches included."""
    names: set[str] = set()

    def bind(target: ast.expr) -> None:
        if isinstance(target, ast.Name):
            names.add(target.id)
        elif isinstance(target, (ast.Tuple, ast.List)):
            for elt in target.elts:
                bind(elt)

    def scan(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Assign):
                for t in node.targets:
                    bind(t)
            elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
                bind(node.target)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                for alias in node.names:
                    names.add(alias.asname or alias.name.split(".")[0])
            elif isinstance(node, ast.If):
                scan(node.body)
                scan(node.orelse)
            elif isinstance(node, ast.Try):
                scan(node.body)
                scan(node.orelse)
                scan(node.finalbody)
                for h in node.handlers:
                    scan(h.body)

    scan(tree.body)
    return names


def public_api_problems(known: dict[str, Path] | None = None) -> list[str]:
    """Modules without a literal ``__all__``, and names in an ``__all__`` the module does not
    bind (a package's lazy attributes and submodules count as bound)."""
    known = modules() if known is None else known
    problems = []
    for name, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        listed = None
        for node in tree.body:
            if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__"
                                                     for t in node.targets)):
                try:
                    listed = list(ast.literal_eval(node.value))
                except ValueError:
                    problems.append(f"{name}: __all__ is not a literal list of names")
                    listed = []
        if listed is None:
            problems.append(f"{name}: no __all__ (list its public names)")
            continue
        bound = _top_level_names(tree)
        if path.name == "__init__.py":
            bound |= set(_Facade(name, tree, known).homes)
            bound |= {m.rpartition(".")[2] for m in known if m.rpartition(".")[0] == name}
        missing = [n for n in listed if n not in bound]
        if missing:
            problems.append(f"{name}: __all__ names what it does not define: {', '.join(missing)}")
    return problems


def _listed(tree: ast.Module) -> list[str] | None:
    for node in tree.body:
        if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__"
                                                 for t in node.targets)):
            try:
                return list(ast.literal_eval(node.value))
            except ValueError:
                return None
    return None


def private_uses(known: dict[str, Path] | None = None,
                 extra: list[Path] | None = None) -> list[str]:
    """``from biaslens.m import name`` (in the package, or in ``extra`` files such as the
    benchmarks and scripts) where ``name`` is neither in ``m.__all__`` nor a submodule of ``m``:
    a use of something ``m`` keeps private. Imports within one module's own package ``__init__``
    are not checked (a package may import its submodules' internals to re-export them)."""
    known = modules() if known is None else known
    exported = {name: _listed(ast.parse(path.read_text(encoding="utf-8"))) for name, path in known.items()}
    sources = [(name, path) for name, path in known.items()]
    sources += [(None, path) for path in (extra or [])]
    problems = []
    for here, path in sources:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_pkg = path.name == "__init__.py"
        where = here or str(path.relative_to(REPO) if path.is_relative_to(REPO) else path)
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            mod = _absolute(node, here, is_pkg) if here else (node.module or "")
            if not _ours(mod) or mod not in known or mod == here:
                continue
            public = set(exported.get(mod) or ())
            for alias in node.names:
                if alias.name in public or f"{mod}.{alias.name}" in known or alias.name == "__version__":
                    continue
                problems.append(f"{where}:{node.lineno}: imports {alias.name!r} from {mod}, "
                                f"which does not list it in __all__")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of ``graph`` that hold a cycle (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:  # iterative: the graph may be deep
        work = [(v, iter(sorted(graph.get(v, ()))))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        while work:
            node, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    advanced = True
                    break
                if w in on_stack:
                    low[node] = min(low[node], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1 or node in graph.get(node, ()):
                    found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return sorted(found)


def _path_in(comp: list[str], graph: dict[str, set[str]]) -> list[str]:
    """One concrete cycle inside a component, for the message (``a → b → a``)."""
    members = set(comp)
    start = comp[0]
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, ())):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, v, start]
                if w in members and w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return comp


def import_alone(names: list[str], jobs: int, timeout: float = 300.0) -> list[tuple[str, str]]:
    """Import each module in its own fresh interpreter; ``(module, last error line)`` per failure."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

    def one(name: str) -> tuple[str, str] | None:
        try:
            r = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True,
                               text=True, timeout=timeout, env=env, cwd=REPO)
        except subprocess.TimeoutExpired:
            return name, f"import took longer than {timeout:.0f} s"
        if r.returncode != 0:
            lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
            return name, lines[-1] if lines else f"exit status {r.returncode}"
        return None

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        return [f for f in pool.map(one, names) if f is not None]


def _package_of(name: str, known: dict[str, Path]) -> str:
    """``biaslens.edit.covariance`` → ``edit``; top-level modules stay themselves."""
    parts = name.split(".")
    if len(parts) >= 3 or (len(parts) == 2 and known[name].name == "__init__.py"):
        return parts[1]
    return parts[1] if len(parts) == 2 else PACKAGE


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-alone", action="store_true", help="skip importing each module alone")
    ap.add_argument("--graph", action="store_true", help="print the package-level import edges")
    ap.add_argument("--allow", action="append", default=[], metavar="A,B,...",
                    help="a known cycle through function-level imports (its modules, comma-"
                         "separated) to report without failing; module-level cycles always fail")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                    help="interpreters to run at once for the import-alone check")
    args = ap.parse_args(argv)

    known = modules()
    edges = import_edges(known)
    failed = 0

    mod_cycles = cycles(edges["module"])
    both = {k: edges["module"][k] | edges["function"][k] for k in known}
    fn_cycles = [c for c in cycles(both) if c not in mod_cycles]
    for comp in mod_cycles:
        print("cycle (module-level imports): " + " -> ".join(_path_in(comp, edges["module"])))
    allowed = [sorted(a.split(",")) for a in args.allow]
    for comp in fn_cycles:
        known_one = comp in allowed
        print(f"cycle (through function-level imports, {len(comp)} modules"
              + (", allowed" if known_one else "") + "): " + " -> ".join(_path_in(comp, both)))
        failed += not known_one
    failed += len(mod_cycles)
    extra = sorted((REPO / "benchmarks").glob("*.py")) + sorted((REPO / "scripts").glob("*.py"))
    for problem in public_api_problems(known) + private_uses(known, extra):
        print(problem)
        failed += 1

    if args.graph:
        for level, graph in (("module-level", edges["module"]), ("function-level", edges["function"])):
            pkg_edges: dict[str, set[str]] = {}
            for a, targets in graph.items():
                for b in targets:
                    pa, pb = _package_of(a, known), _package_of(b, known)
                    if pa != pb:
                        pkg_edges.setdefault(pa, set()).add(pb)
            print(f"package edges through {level} imports:")
            for a in sorted(pkg_edges):
                print(f"  {a} -> {', '.join(sorted(pkg_edges[a]))}")

    if not args.no_alone:
        for name, err in import_alone(sorted(known), args.jobs):
            print(f"import {name} alone failed: {err}")
            failed += 1

    n_edges = sum(len(v) for v in both.values())
    print(f"{len(known)} modules, {n_edges} import edges: "
          + ("OK" if not failed else f"{failed} problem(s)"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
