"""The bench scripts import one another without a circle (each may run as __main__ and be imported by another; a
circle half-initialises one of them)."""
import ast
from pathlib import Path
from typing import Dict, List, Set

BENCH = Path(__file__).resolve().parents[1] / "bench"


def bench_imports(source: str, scripts: Set[str]) -> Set[str]:
    """The bench scripts a script imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & scripts


def circles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Each import circle once, as the path that closes it (depth-first search)."""
    found, done = [], set()

    def visit(name: str, path: List[str]) -> None:
        for imported in sorted(graph[name]):
            if imported in path:
                found.append(path[path.index(imported):] + [imported])
            elif imported not in done:
                visit(imported, path + [imported])
        done.add(name)

    for name in sorted(graph):
        if name not in done:
            visit(name, [name])
    return found


def bench_graph() -> Dict[str, Set[str]]:
    scripts = {p.stem for p in BENCH.glob("*.py")}
    return {p.stem: bench_imports(p.read_text(), scripts) for p in BENCH.glob("*.py")}


def test_no_bench_script_imports_one_that_imports_it_back():
    graph = bench_graph()
    assert graph["bench_memory"] == {"bench_common"} and "bench_common" in graph["gpu_check"]  # the check sees imports
    assert circles(graph) == []


def test_the_circle_finder_finds_a_circle_through_a_function_level_import():
    scripts = {"a", "b", "c"}
    graph = {"a": bench_imports("from b import x\n", scripts),
             "b": bench_imports("def f():\n    import c\n", scripts),
             "c": bench_imports("from a import y  # back\nimport torch\n", scripts)}
    assert circles(graph) == [["a", "b", "c", "a"]]
