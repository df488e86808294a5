"""No import cycles among r3_rl's modules, counting the imports inside functions too.

A function-level import hides a cycle from Python (it runs after both modules loaded) but not from the
reader: two modules that import each other are one concept split in two, or a layering mistake (as
``learner/build.py`` and ``learner/ray_ranks.py`` were).  Imports under ``if TYPE_CHECKING:`` are
annotations only and do not count.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# package name -> folder (pyproject's package-dir: rewards/ and eval/ ship as r3_rl.rewards and r3_rl.eval)
ROOTS = {"r3_rl": REPO / "r3_rl", "r3_rl.rewards": REPO / "rewards", "r3_rl.eval": REPO / "eval"}


def modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for pkg, folder in ROOTS.items():
        for f in folder.rglob("*.py"):
            rel = f.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            if pkg == "r3_rl" and parts[:1] in (["rewards"], ["eval"]):
                continue  # not there in the source tree (package-dir maps them), but never count twice
            out[name] = f
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text())
    skip = _type_checking_nodes(tree)
    is_pkg = path.name == "__init__.py"
    base = name if is_pkg else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                anchor = base.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                mod = ".".join(anchor + ([mod] if mod else []))
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        for t in targets:
            while t and t not in known:  # `import r3_rl.x.y as z` or an attribute of a module
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_among_r3_rl_modules() -> None:
    mods = modules()
    known = set(mods)
    graph = {name: imports_of(name, path, known) for name, path in mods.items()}
    assert len(graph) > 100  # the walk found the package (r3_rl, rewards/, eval/)
    assert "r3_rl.learner.torch_learner" in graph["r3_rl.learner.ray_ranks"]  # function-level imports count
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path: Path) -> None:
    """The check can fail: two modules importing each other, one of them inside a function."""
    (tmp_path / "a.py").write_text("from pkg import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from pkg.a import x\n")
    known = {"pkg.a", "pkg.b"}
    graph = {"pkg.a": imports_of("pkg.a", tmp_path / "a.py", known),
             "pkg.b": imports_of("pkg.b", tmp_path / "b.py", known)}
    assert cycles(graph) == [["pkg.a", "pkg.b"]]
