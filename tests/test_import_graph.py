"""Import directions, read from the source with ``ast`` (every ``import`` statement, including
the ones inside functions): no import circle between the package's modules or packages (an
import of ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` first, so those count), imports that
only run down the layers (:data:`LAYERS`), no module importing a command module, nothing under
``core/`` importing outside ``core/`` (besides the standard library and the numeric libraries it
is built on), and no import inside a function but for an optional dependency or a documented
start-up cost (:data:`FUNCTION_LEVEL`)."""
import ast
import sys
from pathlib import Path
from typing import Dict, List, Optional, Set

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


def imported_names(name: str, path: Path, tree: Optional[ast.AST] = None) -> List[str]:
    """Absolute names of everything ``name`` imports (module level or in functions; or in
    ``tree``, a part of it); for ``from X import y`` the submodule ``X.y`` when it exists, else
    ``X``."""
    is_package = path.name == "__init__.py"
    found = []
    tree = ast.parse(path.read_text(), str(path)) if tree is None else tree
    for node in ast.walk(tree):
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


def ancestors(name: str) -> List[str]:
    """The packages above ``name`` (without the root package, which every import runs)."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(2, len(parts))]


def graph(packages: bool = True) -> Dict[str, Set[str]]:
    """Module -> the package's modules it imports; with ``packages``, also the packages whose
    ``__init__`` such an import runs first (those above the target that are not above the
    importer)."""
    edges = {}
    for name, path in MODULES.items():
        targets = {package_module(i) for i in imported_names(name, path)}
        if packages:
            own = set(ancestors(name)) | ({name} if path.name == "__init__.py" else set())
            targets |= {a for t in list(targets) if t for a in ancestors(t)
                        if a not in own and a in MODULES}
        edges[name] = {t for t in targets if t and t != name}
    return edges


#: the layers, lowest first: a module imports its own layer and those below, never above
LAYERS = (
    ("core", ("nformer_plugin.core", "nformer_plugin.synthetic_dataset", "nformer_plugin._moved")),
    ("report", ("nformer_plugin.report",)),  # pages and PNGs over core
    ("config", ("nformer_plugin.config",)),  # every wing's keys composed
    ("evaluation", ("nformer_plugin.evaluation", "nformer_plugin.modeling")),  # the one path
    ("fastreid_ext", ("nformer_plugin.fastreid_ext",)),
    ("app", ("nformer_plugin.app",)),
    ("studies", ("nformer_plugin.studies",)),
    ("cli", ("nformer_plugin.cli",)),
    ("console", ("nformer_plugin.console", "nformer_plugin")),  # the face and the entry points
)


def layer_of(name: str) -> int:
    best = None
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if name == prefix or name.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (rank, len(prefix))
    assert best is not None, f"{name} is in no layer (tests/test_import_graph.py LAYERS)"
    return best[0]


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
    for packages in (False, True):
        cycles = find_cycles(graph(packages))
        assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_imports_run_down_the_layers():
    order = " < ".join(n for n, _ in LAYERS)
    bad = [f"{name} ({LAYERS[layer_of(name)][0]}) -> {target} ({LAYERS[layer_of(target)][0]})"
           for name, targets in graph().items() for target in sorted(targets)
           if layer_of(target) > layer_of(name)]
    assert not bad, f"imports up the layers ({order}):\n" + "\n".join(bad)


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


#: third-party libraries a function may import: optional dependencies (``nformer_plugin`` works
#: without them until the feature that needs them is used; faiss comes as the [cpu] or [gpu]
#: extra, and without it the console names the one to install)
OPTIONAL_LIBRARIES = {"fastreid", "faiss", "ray", "onnx", "onnxruntime", "matplotlib"}
#: modules whose functions import more, each with the start-up cost that is avoided
START_UP = {
    "nformer_plugin.cli": "nformer --help answers before torch, faiss and FastReID load",
    "nformer_plugin.console": "each entry point loads only its own command",
    "nformer_plugin.fastreid_ext.compat": "FastReID's modules load after the fixes are applied",
    "nformer_plugin.core.nformer.training.events": "TensorBoard's writer takes seconds to load",
    "nformer_plugin.studies.tsne": "scikit-learn's t-SNE loads for the tsne study alone",
}


def function_level_imports():
    """``(module, imported name)`` of every import statement inside a function."""
    out = set()
    for name, path in MODULES.items():
        for fn in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = ast.Module(body=fn.body, type_ignores=[])
                out |= {(name, i) for i in imported_names(name, path, body)}
    return sorted(out)


def lazy_import_allowed(module: str, imported: str) -> bool:
    if imported.split(".")[0] in OPTIONAL_LIBRARIES:
        return True
    fastreid_side = PACKAGE + ".fastreid_ext"
    if imported.startswith(fastreid_side) and not module.startswith(fastreid_side):
        return True  # FastReID is optional outside its glue
    return any(module == m or module.startswith(m + ".") for m in START_UP)


def test_function_level_imports_are_for_optional_dependencies_or_start_up():
    found = function_level_imports()
    assert any(m.startswith(PACKAGE + ".cli") for m, _ in found)  # the walk sees them
    bad = [f"{m}: {i}" for m, i in found if not lazy_import_allowed(m, i)]
    assert not bad, ("imports inside functions that are neither an optional dependency nor a "
                     "documented start-up cost (START_UP):\n" + "\n".join(bad))


def test_no_private_name_crosses_a_module():
    bad = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith(
                    PACKAGE)):
                bad += [f"{name}: {a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")
                        and a.name != "_moved"]
    assert not bad, "private names imported from another module:\n" + "\n".join(bad)


def test_the_layer_check_catches_an_upward_import():
    assert layer_of(PACKAGE + ".core.nformer.model") < layer_of(PACKAGE + ".fastreid_ext.trainer")
    assert layer_of(PACKAGE + ".app.stage") < layer_of(PACKAGE + ".cli.index")
    assert layer_of(PACKAGE + ".evaluation.pipeline") < layer_of(PACKAGE + ".fastreid_ext")
    assert lazy_import_allowed(PACKAGE + ".app.extract", PACKAGE + ".fastreid_ext.extract")
    assert not lazy_import_allowed(PACKAGE + ".core.io", PACKAGE + ".core.writable")
