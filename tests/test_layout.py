"""The package's layout stays a tree of concerns: no import cycle among mpp's modules (their top-level imports),
and no function-level import inside mpp/data, where one would only be there to dodge a cycle."""

import ast
from pathlib import Path

MPP = Path(__file__).parents[1] / "mpp"


def module_name(path: Path) -> str:
    parts = path.relative_to(MPP.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def mpp_imports(nodes, modules: set[str]) -> set[str]:
    """The mpp modules these import statements name (`from mpp.x import y` names mpp.x.y when that is a module)."""
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found & modules


def import_graph(root: Path = MPP) -> dict[str, set[str]]:
    """module -> the mpp modules its top-level statements import."""
    files = {module_name(p): p for p in root.rglob("*.py")}
    return {name: mpp_imports(ast.parse(p.read_text()).body, set(files)) for name, p in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module, or a module importing itself (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_planted_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_mpp_modules():
    graph = import_graph()
    assert len(graph) > 50 and graph["mpp.training.pretrain"], "the graph must see the package"
    assert cycles(graph) == []


def test_mpp_data_imports_at_the_top():
    """Inside mpp/data every mpp import is a top-level one."""
    data = MPP / "data"
    modules = set(import_graph())
    late = []
    for path in data.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for function in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)):
            late += [f"{path.name}:{function.name}" for _ in mpp_imports(ast.walk(function), modules)]
    assert late == []
