"""The library's shape: each package imports only the packages before it (ctdiff/__init__.py), no cycles."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "ctdiff"
CORE = {"params", "io", "device"}  # importable from anywhere
# package -> the packages it may import (besides itself and CORE)
ALLOWED = {
    "data": set(),
    "metrics": {"data"},
    "models": {"data"},
    "training": {"data", "metrics", "models"},
    "inference": {"data", "metrics", "models"},
    "evaluation": {"data", "metrics", "models", "inference"},
    "presets": set(),
    "cli": {"data", "metrics", "models", "training", "inference", "evaluation", "presets"},
}


def imported_ctdiff_modules(path: Path) -> set[str]:
    """Dotted ``ctdiff.*`` names a module imports (top level and inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.startswith("ctdiff.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ctdiff") and not node.level:
            names.add(node.module)
    return names


def part(module: str) -> str:
    """``ctdiff.models.vae.sd`` -> ``models``; ``ctdiff.params`` -> ``params``."""
    return module.split(".")[1]


MODULES = {".".join(("ctdiff", *p.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__"): p
           for p in SRC.rglob("*.py")}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_each_module_imports_only_what_its_package_may(module):
    own = part(module) if module != "ctdiff" else "ctdiff"
    if own in CORE or own == "ctdiff":
        allowed = CORE - {own}
    else:
        allowed = ALLOWED[own] | CORE | {own}
    bad = sorted(m for m in imported_ctdiff_modules(MODULES[module]) if part(m) not in allowed)
    assert not bad, f"{module} ({own}) imports {bad}; {own} may import only {sorted(allowed)}"


def test_no_import_cycles():
    graph = {m: {i for i in imported_ctdiff_modules(p) if i in MODULES} for m, p in MODULES.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_every_package_says_what_it_holds():
    for init in SRC.rglob("__init__.py"):
        tree = ast.parse(init.read_text())
        assert ast.get_docstring(tree), f"{init} has no docstring"
