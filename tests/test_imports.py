"""The project's imports point one way and go round nowhere.

Every ``.py`` file of npd_core, tasks and flows is parsed with ``ast``; every import counts,
including the lazy ones inside functions (relative imports resolved). Among the project's own
modules the test fails on

- a cycle (named module by module): ``flows.cli → flows.bench → flows.headline → flows.cli``
  was one, through a lazy import;
- an import against the layers ``flows → tasks → npd_core`` (npd_core importing tasks or flows,
  tasks importing flows);
- npd_core importing Prefect, MLflow or typer (it is a plain library);
- an import against the layers inside npd_core (``CORE_RULES``): ``method/`` imports no
  ``store``, ``pipeline``, ``bench`` or ``baselines`` and no config at run time (the method runs
  with torch and transformers alone); ``store/`` imports no ``method``; the root modules
  (``config``, ``data``, ``models``, …) import no subpackage at run time.

A cycle counts whether its imports run or sit under ``if TYPE_CHECKING:`` (a circle of types is
still a circle a reader walks); the layers and the third-party rule apply to TYPE_CHECKING
imports as well, except where a rule says "at run time". The checker's own tests below feed it
tiny graphs and a tiny package with a lazy relative cycle, so a broken checker cannot pass
silently.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("npd_core", "tasks", "flows")
LAYER = {"npd_core": 0, "tasks": 1, "flows": 2}  # an import may only point to a lower layer
PLAIN_LIBRARY = ("npd_core", ("prefect", "mlflow", "typer"))  # npd_core imports none of these
SUBPACKAGES = ("method", "store", "pipeline", "bench", "baselines", "backends", "toy")
TOP = "(top)"  # a module at npd_core's top level (the config package counts as one)


@dataclass(frozen=True)
class Rule:
    """Modules of group ``source`` import none of group ``targets`` (groups: a subpackage of
    npd_core, ``config``, or ``TOP``); ``runtime_only``: TYPE_CHECKING imports are allowed."""

    source: str
    targets: tuple[str, ...]
    runtime_only: bool = False


CORE_RULES = (
    Rule("method", ("store", "pipeline", "bench", "baselines")),
    Rule("method", ("config",), runtime_only=True),
    Rule("store", ("method",)),
    Rule(TOP, SUBPACKAGES, runtime_only=True),
)


@dataclass(frozen=True)
class Import:
    source: str  # importing module, dotted
    target: str  # imported module, dotted (absolute)
    line: int
    type_checking: bool  # under ``if TYPE_CHECKING:``: never executed


def module_names(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name → file, for every .py file of ``packages`` under ``root``."""
    out = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, guarded: bool = False):
    """Every node with whether it sits under ``if TYPE_CHECKING:`` (not its ``else``)."""
    yield node, guarded
    if isinstance(node, ast.If) and _is_type_checking(node.test):
        for child in node.body:
            yield from _walk(child, True)
        for child in node.orelse:
            yield from _walk(child, guarded)
        return
    for child in ast.iter_child_nodes(node):
        yield from _walk(child, guarded)


def imports_of(module: str, path: Path) -> list[Import]:
    """Every import in ``path`` (module ``module``), lazy ones included, as absolute names.

    ``from a import b`` yields ``a.b``: :func:`_resolve` makes it module ``a.b`` if there is one,
    else ``a`` (``b`` is a name defined in ``a``).
    """
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node, guarded in _walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [Import(module, a.name, node.lineno, guarded) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" for a in node.names if a.name != "*"] or [target]
            found += [Import(module, name, node.lineno, guarded) for name in names]
    return found


def _resolve(target: str, modules: dict[str, Path]) -> str | None:
    """The project module an import name lands in (its longest known prefix), else None."""
    parts = target.split(".")
    for n in range(len(parts), 0, -1):
        name = ".".join(parts[:n])
        if name in modules:
            return name
    return None


def project_graph(imports: list[Import], modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module → the project modules it imports (TYPE_CHECKING imports included)."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for imp in imports:
        target = _resolve(imp.target, modules)
        if target is not None and target != imp.source:
            graph[imp.source].add(target)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component that has one, as ``[a, b, …, a]``.

    Tarjan's algorithm finds the components; a depth-first walk inside each names a cycle.
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)

    def cycle_from(start: str, members: set[str]) -> list[str]:
        path, seen = [start], {start}
        while True:
            nxt = sorted(w for w in graph[path[-1]] if w in members)
            back = [w for w in nxt if w == start]
            if back:
                return [*path, start]
            step = next((w for w in nxt if w not in seen), None)
            if step is None:  # dead end inside the component: step back and try elsewhere
                members = members - {path.pop()}
                if not path:
                    raise AssertionError(f"no cycle through {start}")
                continue
            path.append(step)
            seen.add(step)

    return [cycle_from(c[0], set(c)) for c in sorted(components)]


def layer_violations(imports: list[Import], modules: dict[str, Path], root: Path) -> list[str]:
    """Imports against ``flows → tasks → npd_core`` and third-party imports npd_core must not
    make, one line each (file:line and what it imports)."""
    bad = []
    core, forbidden = PLAIN_LIBRARY
    for imp in imports:
        src_layer = LAYER[imp.source.split(".")[0]]
        target = _resolve(imp.target, modules)
        where = f"{modules[imp.source].relative_to(root).as_posix()}:{imp.line}"
        if target is not None and LAYER[target.split(".")[0]] > src_layer:
            bad.append(f"{where}: {imp.source} imports {target} (a higher layer)")
        top = imp.target.split(".")[0]
        if imp.source.split(".")[0] == core and top in forbidden:
            bad.append(f"{where}: {imp.source} imports {top} (npd_core is a plain library)")
    return sorted(set(bad))


def core_group(module: str, modules: dict[str, Path]) -> str | None:
    """The group of an npd_core module: its subpackage, ``config``, or ``TOP`` (None: the
    package's own ``__init__`` or outside npd_core)."""
    parts = module.split(".")
    if parts[0] != "npd_core" or len(parts) == 1:
        return None
    if parts[1] == "config":
        return "config"
    if parts[1] in SUBPACKAGES:
        return parts[1]
    return TOP if modules[module].name != "__init__.py" else None


def core_violations(imports: list[Import], modules: dict[str, Path], root: Path) -> list[str]:
    """Imports inside npd_core against ``CORE_RULES``, one line each (file:line, what, rule).
    ``config`` is a root module for the root rule too."""
    bad = []
    for imp in imports:
        target = _resolve(imp.target, modules)
        src = core_group(imp.source, modules)
        dst = None if target is None else core_group(target, modules)
        if src is None or dst is None or src == dst:
            continue
        for rule in CORE_RULES:
            sources = (TOP, "config") if rule.source == TOP else (rule.source,)
            if (
                src in sources
                and dst in rule.targets
                and not (rule.runtime_only and imp.type_checking)
            ):
                where = f"{modules[imp.source].relative_to(root).as_posix()}:{imp.line}"
                bad.append(f"{where}: {imp.source} imports {target} ({src} → {dst})")
    return sorted(set(bad))


def _project() -> tuple[dict[str, Path], list[Import]]:
    modules = module_names(ROOT, PACKAGES)
    return modules, [imp for m, p in modules.items() for imp in imports_of(m, p)]


# ------------------------------------------------------------------- the project


def test_no_import_cycle() -> None:
    modules, imports = _project()
    assert len(modules) > 50 and len(imports) > 300  # the walk really found the project
    graph = project_graph(imports, modules)
    assert "flows.headline" in graph["flows.bench"]  # a lazy import inside a function counts
    cycles = find_cycles(graph)
    assert cycles == [], "import cycles:\n" + "\n".join(" → ".join(c) for c in cycles)


def test_layers_and_plain_library() -> None:
    modules, imports = _project()
    assert layer_violations(imports, modules, ROOT) == []


def test_layers_inside_npd_core() -> None:
    modules, imports = _project()
    assert core_violations(imports, modules, ROOT) == []


# ------------------------------------------------------------------- the checker itself


def test_find_cycles_names_each_cycle() -> None:
    graph = {
        "a": {"b"},
        "b": {"c", "d"},
        "c": {"a"},
        "d": set(),
        "e": {"e"},  # imports itself
        "f": {"a", "g"},
        "g": {"f"},
    }
    assert find_cycles(graph) == [["a", "b", "c", "a"], ["e", "e"], ["f", "g", "f"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_find_cycles_steps_back_from_dead_ends() -> None:
    """From a, the walk tries b → c first; c leads only back to b (already on the path), so it
    steps back and closes the cycle through d."""
    graph = {"a": {"b"}, "b": {"c", "d"}, "c": {"b"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "d", "a"]]


def test_checker_finds_lazy_relative_cycle_and_layer_breaks(tmp_path: Path) -> None:
    """A tiny project: npd_core.x imports flows.y inside a function (relative import of a
    sibling too), flows.y imports npd_core.x at the top: one cycle and one layer break; a
    TYPE_CHECKING import is an edge of the graph and breaks the layers; npd_core importing
    mlflow lazily is caught."""
    for pkg in ("npd_core", "flows", "npd_core/sub"):
        (tmp_path / pkg).mkdir(parents=True)
        (tmp_path / pkg / "__init__.py").write_text("")
    (tmp_path / "npd_core" / "x.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "from .sub import z\n"
        "if TYPE_CHECKING:\n"
        "    import tasks.t\n"
        "def f():\n"
        "    from flows import y\n"
        "    import mlflow.tracking\n"
    )
    (tmp_path / "npd_core" / "sub" / "z.py").write_text("from ..x import f\n")
    (tmp_path / "flows" / "y.py").write_text("import npd_core.x\n")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "t.py").write_text("")
    modules = module_names(tmp_path, PACKAGES)
    imports = [imp for m, p in modules.items() for imp in imports_of(m, p)]
    graph = project_graph(imports, modules)
    assert graph["npd_core.x"] == {"npd_core.sub.z", "flows.y", "tasks.t"}
    # one component {flows.y, npd_core.x, npd_core.sub.z}, named by one cycle through it
    assert find_cycles(graph) == [["flows.y", "npd_core.x", "flows.y"]]
    bad = layer_violations(imports, modules, tmp_path)
    assert bad == [
        "npd_core/x.py:4: npd_core.x imports tasks.t (a higher layer)",
        "npd_core/x.py:6: npd_core.x imports flows.y (a higher layer)",
        "npd_core/x.py:7: npd_core.x imports mlflow (npd_core is a plain library)",
    ]


def test_checker_finds_breaks_of_the_layers_inside_npd_core(tmp_path: Path) -> None:
    """A tiny npd_core: the method importing the store (under TYPE_CHECKING: still a break)
    and the config (at run time only), the store importing the method, a root module and the
    config package importing subpackages lazily: each break named once; what the rules allow
    (a root module's TYPE_CHECKING import, the method's TYPE_CHECKING config import, imports
    inside one group) is not. The TYPE_CHECKING edge closes a cycle method → store → method."""
    files = {
        "npd_core/__init__.py": "",
        "npd_core/method/__init__.py": "",
        "npd_core/method/a.py": "from typing import TYPE_CHECKING\n"
        "from npd_core.method import b\n"
        "if TYPE_CHECKING:\n"
        "    from npd_core.store.s import S\n"
        "    from npd_core.config import C\n",
        "npd_core/method/b.py": "def f():\n    import npd_core.config\n",
        "npd_core/store/__init__.py": "",
        "npd_core/store/s.py": "from npd_core.method.a import f\nS = 1\n",
        "npd_core/config/__init__.py": "def g():\n    from npd_core.toy import w\n",
        "npd_core/toy/__init__.py": "",
        "npd_core/toy/w.py": "",
        "npd_core/data.py": "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from npd_core.store import s\n"
        "def h():\n"
        "    from .method import a\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    modules = module_names(tmp_path, PACKAGES)
    imports = [imp for m, p in modules.items() for imp in imports_of(m, p)]
    assert core_violations(imports, modules, tmp_path) == [
        "npd_core/config/__init__.py:2: npd_core.config imports npd_core.toy.w (config → toy)",
        "npd_core/data.py:5: npd_core.data imports npd_core.method.a ((top) → method)",
        "npd_core/method/a.py:4: npd_core.method.a imports npd_core.store.s (method → store)",
        "npd_core/method/b.py:2: npd_core.method.b imports npd_core.config (method → config)",
        "npd_core/store/s.py:1: npd_core.store.s imports npd_core.method.a (store → method)",
    ]
    graph = project_graph(imports, modules)
    assert find_cycles(graph) == [["npd_core.method.a", "npd_core.store.s", "npd_core.method.a"]]


def test_config_store_and_status_load_without_torch() -> None:
    """`npd status`, `npd sql` and a bad config's error read the config and the store only:
    neither imports torch or transformers (seconds on a small box)."""
    import subprocess
    import sys

    code = (
        "import sys, npd_core.config, npd_core.store, npd_core.store.lineage, flows.cli; "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
