"""Import directions, read from the source with ``ast`` (every ``import`` statement, including
the lazy ones inside functions): no import circle between the package's modules, no module
importing a command module, and nothing under ``core/`` importing outside ``core/`` (besides the
standard library and the numeric libraries it is built on)."""
import ast
import sys
from pathlib import Path
from typing import Dict, List, Set

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "nformer_plugin"

#: the command modules: the ``nformer`` command and ``fastreid-train``, and the console-script
#: wrappers that call them (``console``)
COMMANDS = ("nformer_plugin.cli", "nformer_plugin.fastreid_ext.train_net", "nformer_plugin.console")
#: third-party libraries ``core`` may import: the numeric stack, and for its PNGs / tables /
#: progress bars only, matplotlib, PIL, tabulate and tqdm (never yacs, FastReID, scikit-learn);
#: ray for ``core.distributed`` only (lazily, an optional extra)
CORE_LIBRARIES = {"torch", "torchvision", "numpy", "scipy", "faiss",
                  "matplotlib", "PIL", "tabulate", "tqdm", "ray"}
STDLIB = set(getattr(sys, "stdlib_module_names", ())) | {"__future__"}


def modules() -> Dict[str, Path]:
    """Module name -> file, for every module of the package (a package is its ``__init__``)."""
    out = {}
    for path in (REPO / PACKAGE).rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = modules()


def imported_names(name: str, path: Path) -> List[str]:
    """Absolute names of everything ``name`` imports (module level or in functions); for
    ``from X import y`` the submodule ``X.y`` when it exists, else ``X``."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append(sub if sub in MODULES else target)
    return found


def package_module(imported: str) -> str:
    """The package's module an imported name lives in (``a.b.c`` -> ``a.b`` if only that exists)."""
    while imported not in MODULES and "." in imported:
        imported = imported.rsplit(".", 1)[0]
    return imported if imported in MODULES else ""


def graph() -> Dict[str, Set[str]]:
    edges = {}
    for name, path in MODULES.items():
        targets = {package_module(i) for i in imported_names(name, path)}
        edges[name] = {t for t in targets if t and t != name}
    return edges


def is_command(name: str) -> bool:
    return any(name == c or name.startswith(c + ".") for c in COMMANDS)


def find_cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """One cycle (as a closed path) per strongly connected component with more than one module."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v):  # Tarjan, iterative enough for this graph's depth
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    cycles = []
    for component in components:  # a closed path through the component, for the message
        start = min(component)
        path, seen = [start], {start}
        while True:
            nxt = min(w for w in edges[path[-1]] if w in component)
            if nxt in seen:
                cycles.append(path[path.index(nxt):] + [nxt])
                break
            path.append(nxt)
            seen.add(nxt)
    return cycles


def test_the_walk_sees_the_package_and_its_lazy_imports():
    edges = graph()
    assert len(edges) > 80
    # function-level imports count: the app reads FastReID's config defaults lazily
    assert "nformer_plugin.fastreid_ext.config" in edges["nformer_plugin.app.config"]
    assert "nformer_plugin.cli.study" in edges["nformer_plugin.cli.main"]


def test_no_import_cycle():
    cycles = find_cycles(graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_module_imports_a_command_module():
    bad = [f"{name} -> {target}" for name, targets in graph().items() if not is_command(name)
           for target in sorted(targets) if is_command(target)]
    assert not bad, "imports of a command module:\n" + "\n".join(bad)


def test_core_imports_only_core_and_its_libraries():
    bad = []
    for name, path in MODULES.items():
        if not name.startswith(PACKAGE + ".core"):
            continue
        for imported in imported_names(name, path):
            root = imported.split(".")[0]
            inside = imported == PACKAGE + ".core" or imported.startswith(PACKAGE + ".core.")
            if not (inside or root in STDLIB or root in CORE_LIBRARIES):
                bad.append(f"{name} -> {imported}")
    assert not bad, "core imports outside core:\n" + "\n".join(bad)


def test_the_checks_catch_what_they_check():
    """The cycle finder and the command check on a made-up graph."""
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(edges) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
    assert is_command("nformer_plugin.cli.index") and not is_command("nformer_plugin.client")
