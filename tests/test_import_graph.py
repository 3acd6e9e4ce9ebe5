"""soarbench's modules import each other without cycles: every `import` and `from ... import` in the package,
at module level or inside a function, is an edge, and the graph has no strongly connected component of more
than one module. (The package's own __init__ is left out: Python imports it before any of its submodules.)"""
from __future__ import annotations

import ast
from pathlib import Path

import soarbench

ROOT = Path(soarbench.__file__).parent


def _modules(root: Path) -> dict[str, Path]:
    out = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the package's modules it imports (a `from pkg import name` names pkg.name where that is a module,
    else pkg itself)."""
    modules = _modules(root)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
                targets = subs + ([node.module] if len(subs) < len(node.names) else [])
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t not in (name, root.name)}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_hand_made_cycle_and_nothing_else():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": {"e"}, "e": set(), "f": {"f2"}, "f2": {"f"}}
    assert sorted(cycles(graph)) == [["a", "b", "c"], ["f", "f2"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_reads_function_level_imports(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "one.py").write_text("def f():\n    from pkg.two import g\n    return g\n")
    (pkg / "two.py").write_text("from pkg import one\n\ndef g():\n    return one\n")
    graph = import_graph(pkg)
    assert graph["pkg.one"] == {"pkg.two"} and graph["pkg.two"] == {"pkg.one"}
    assert cycles(graph) == [["pkg.one", "pkg.two"]]


def test_soarbench_has_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 50 and "soarbench.report.tables" in graph["soarbench.report.paper"]
    assert cycles(graph) == []


def package_pairs(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """Pairs of soarbench's sub-packages (or top-level modules) whose modules import each other, in either
    direction: soarbench.a.x -> soarbench.b.y and soarbench.b.z -> soarbench.a.w make the pair (a, b)."""
    def package(module: str) -> str:
        return module.split(".")[1] if module.count(".") else module

    edges = {(package(a), package(b)) for a, targets in graph.items() for b in targets if package(a) != package(b)}
    return {tuple(sorted(edge)) for edge in edges if edge[::-1] in edges}


def test_no_two_packages_import_each_other():
    """What each package may import is one way round: models below sampling and rl (LoRA and CFG live in models/),
    the method table's reader (method_info.py), the fault hook (faults.py) and the CLIP tokenizer files
    (clip_tokenizer.py) at the top level, the GenEval metric inside geneval/."""
    assert package_pairs({"soarbench.a.x": {"soarbench.b.y"}, "soarbench.b.z": {"soarbench.a.w"},
                          "soarbench.a.w": {"soarbench.c"}}) == {("a", "b")}
    assert package_pairs(import_graph()) == set()
