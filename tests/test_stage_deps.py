"""dvc.yaml lists, for every stage, the code it runs: a change to any module a stage imports reruns it."""

import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"


def module_file(name: str) -> Path | None:
    """``ctdiff.vae.load`` -> its file under src/, or None when ``name`` is not a module of the package."""
    base = SRC.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def ctdiff_imports(path: Path) -> set[Path]:
    """Files of the ``ctdiff`` modules ``path`` imports, directly or through other ctdiff modules (any depth,
    function-level imports included)."""
    seen: set[Path] = set()
    todo = [path]
    while todo:
        tree = ast.parse(todo.pop().read_text())
        names: list[str] = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # "from ctdiff.vae import load" names a module too
                names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            if name.split(".")[0] != "ctdiff":
                continue
            parts = name.split(".")
            # a package's __init__ runs too when one of its modules is imported
            files = [module_file(".".join(parts[:i])) for i in range(1, len(parts) + 1)]
            for file in files:
                if file is not None and file not in seen:
                    seen.add(file)
                    todo.append(file)
    return seen


STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_cover_the_code_it_imports(name):
    stage = STAGES[name]
    script = REPO / stage["cmd"].split()[-1]
    deps = {d if isinstance(d, str) else next(iter(d)) for d in stage["deps"]}
    assert str(script.relative_to(REPO)) in deps
    needed = {str(p.relative_to(REPO)) for p in ctdiff_imports(script)}
    needed.discard("src/ctdiff/__init__.py")  # the version string only
    missing = sorted(needed - deps)
    assert not missing, f"dvc.yaml stage {name!r} runs code it does not depend on: add {missing}"
