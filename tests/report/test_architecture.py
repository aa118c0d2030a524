"""The report's layering: no import circle, a leaf data model, sections that import only the model and the
registry, and a registry that lists modules, not functions.

The import graph is read from the source (``ast``), every ``import`` counted — at module level or inside a
function — except those under ``if TYPE_CHECKING:``, which never run. Importing ``a.b.c`` runs ``a`` and
``a.b`` too, so an import also counts as an edge to each enclosing package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import stethoscope.report.registry as registry
from stethoscope.report.model import Section

PACKAGE = Path(__file__).resolve().parents[2] / "stethoscope"

# modules that must stay out of every import circle
GUARDED_PREFIXES = ("stethoscope.report",)
GUARDED = {
    "stethoscope.memory.report",
    "stethoscope.checks.report",
    "stethoscope.attention.report",
    "stethoscope.probe.report",
    "stethoscope.probe.figures",
    "stethoscope.probe.fingerprint",
    "stethoscope.probe.pipeline",
}
# what a section module may import from stethoscope
SECTION_MAY_IMPORT = {
    "stethoscope",  # the package itself (``from stethoscope import rundir``)
    "stethoscope._format",
    "stethoscope.report",  # the package of the two modules below
    "stethoscope.report.model",
    "stethoscope.report.registry",
    "stethoscope.run",
    "stethoscope.rundir",
}


def _modules() -> dict[str, tuple[Path, bool]]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_pkg = path.name == "__init__.py"
        if is_pkg:
            parts = parts[:-1]
        mods[".".join(parts)] = (path, is_pkg)
    return mods


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _imports(name: str, path: Path, is_pkg: bool, mods: dict) -> set[str]:
    """The stethoscope modules ``name`` imports anywhere in its source (not under TYPE_CHECKING)."""
    found: set[str] = set()
    here = name.split(".") if is_pkg else name.split(".")[:-1]

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit_one(other)
            else:
                visit_one(child)

    def visit_one(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for a in node.names:
                sub = f"{module}.{a.name}"
                found.add(sub if sub in mods else module)
        else:
            visit(node)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {m for m in found if m in mods and m != name}


def _graph(parents: bool = True) -> dict[str, set[str]]:
    mods = _modules()
    graph = {name: _imports(name, path, is_pkg, mods) for name, (path, is_pkg) in mods.items()}
    if parents:
        for name, deps in graph.items():
            for dep in list(deps):
                parts = dep.split(".")
                for i in range(1, len(parts)):
                    pkg = ".".join(parts[:i])
                    if pkg in mods and pkg != name and not name.startswith(pkg + "."):
                        deps.add(pkg)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def _guarded(name: str) -> bool:
    return name in GUARDED or any(name == p or name.startswith(p + ".") for p in GUARDED_PREFIXES)


@pytest.mark.parametrize("parents", [False, True], ids=["modules", "with-packages"])
def test_no_report_module_is_part_of_an_import_cycle(parents):
    bad = [c for c in _cycles(_graph(parents)) if any(_guarded(m) for m in c)]
    assert not bad, f"import cycles through report modules: {bad}"


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_model_and_the_registry_are_leaves():
    graph = _graph(parents=False)
    assert graph["stethoscope.report.model"] <= {"stethoscope._format"}
    assert graph["stethoscope.report.registry"] == set()


def test_sections_import_only_the_model_and_the_registry():
    graph = _graph(parents=False)
    for module in registry.SECTION_MODULES:
        extra = graph[module] - SECTION_MAY_IMPORT
        assert not extra, f"{module} imports {sorted(extra)}"


def test_every_section_module_registers_a_section_in_page_order():
    names = [b.name for b in registry.section_builders()]
    assert names[:11] == [
        "dumps",
        "preflight",
        "training",
        "gradients",
        "activations",
        "updates",
        "attention",
        "moe",
        "memory",
        "perf",
        "timing",
    ]
    modules = {b.build.__module__ for b in registry.section_builders()}
    assert set(registry.SECTION_MODULES) <= modules


def test_a_new_section_is_one_registered_function(tmp_path):
    import stethoscope as st
    from stethoscope.report import build

    from .conftest import write_run

    @registry.register_section("extra-test-section", order=15)
    def extra(run):
        return Section("extra-test-section", "Extra", "registered by a test")

    try:
        ids = [s.id for s in build(st.load_run(write_run(tmp_path / "run", []))).sections]
    finally:
        registry._REGISTERED.pop("extra-test-section")
    assert ids[0] == "extra-test-section"


def test_a_section_module_that_fails_to_import_becomes_a_note(tmp_path):
    import stethoscope as st
    from stethoscope.report import build

    from .conftest import write_run

    modules = (*registry.SECTION_MODULES, "stethoscope.report.sections.no_such_section")
    builders = registry.section_builders(modules)
    assert builders[-1].name == "no_such_section"
    with pytest.raises(ModuleNotFoundError):
        builders[-1].build(st.load_run(write_run(tmp_path / "run", [])))
    assert "no_such_section" not in [s.id for s in build(st.load_run(tmp_path / "run")).sections]
