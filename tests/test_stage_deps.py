"""dvc.yaml declares, for every stage, exactly the code it runs and every param it reads: a change to any of
them reruns the stage, and nothing else does. And every params group has one owner: a stage reads its own group
and the shared keys (ctdiff.params.SHARED), never another stage's."""

import ast
import dataclasses
import os
import runpy
import sys
from pathlib import Path

import pytest
import yaml
from paramkit import TINY_PIPELINE as TINY

import ctdiff.params as params_module
from ctdiff.params import SHARED

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
ORDER = ("fetch_data", "preprocess", "slab", "fetch_weights", "vae_fit", "vae_check", "train", "sr_reference",
         "calibrate", "evaluate")
# The group each stage owns. fetch_weights and vae_fit are the VAE's two stages: fetch_weights reads only the keys that
# choose the download (the arm, pretrained, the hub pins, the released architecture), vae_fit the rest.
OWNS = {"fetch_data": "data", "preprocess": "preprocess", "slab": "slab", "fetch_weights": "vae", "vae_fit": "vae",
        "vae_check": "vae_check", "train": "train", "sr_reference": "sr_reference", "calibrate": "calibrate",
        "evaluate": "evaluate"}


# Declared params a scratch-VAE run (the offline one here) does not read: fetch_weights reads them to download the
# released weights (vae.pretrained=true; tests/test_hub.py runs that path).
READ_WHEN_PRETRAINED = {"fetch_weights": {"vae.latent_channels", "vae.maisi.hub", "vae.maisi.arch", "vae.sd.hub"}}


def declared_params(stage: str) -> list[str]:
    return [p if isinstance(p, str) else next(iter(p)) for p in STAGES[stage]["params"]]


def test_every_stage_declares_only_its_own_group_and_the_shared_keys():
    assert sorted(STAGES) == sorted(OWNS)
    foreign = {stage: [p for p in declared_params(stage) if p.split(".")[0] not in (OWNS[stage], *SHARED)]
               for stage in STAGES}
    assert not any(foreign.values()), f"stages declare params of other stages' groups: {foreign}"
    groups = {f.name for f in dataclasses.fields(params_module.Params)} - set(SHARED)
    assert groups == set(OWNS.values()), "every params group has an owning stage"


def module_file(name: str) -> Path | None:
    """``ctdiff.models.vae.weights`` -> its file under src/, or None when ``name`` is not a module of the package."""
    base = SRC.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def docstring_only(path: Path) -> bool:
    """A package ``__init__`` that runs nothing (a docstring, at most a version string): no dependency."""
    body = ast.parse(path.read_text()).body
    return path.name == "__init__.py" and all(
        isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        or isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) for node in body)


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
                # "from ctdiff.data import fetch" names a module too
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
    return {p for p in seen if not docstring_only(p)}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_code_deps_are_exactly_the_code_it_imports(name):
    stage = STAGES[name]
    script = REPO / stage["cmd"].split()[-1]
    deps = {d if isinstance(d, str) else next(iter(d)) for d in stage["deps"]}
    assert str(script.relative_to(REPO)) in deps
    needed = {str(p.relative_to(REPO)) for p in ctdiff_imports(script)}
    code_deps = {d for d in deps if d.startswith("src/")}
    assert not sorted(needed - code_deps), f"dvc.yaml stage {name!r} runs code it does not depend on: add " \
                                           f"{sorted(needed - code_deps)}"
    assert not sorted(code_deps - needed), f"dvc.yaml stage {name!r} depends on code it never runs: drop " \
                                           f"{sorted(code_deps - needed)}"


# ---------------------------------------------------------------------------------------------- params
class ParamsReads:
    """Records every params leaf (``train.device``) read while installed: ``__getattribute__`` of the params
    dataclasses looks the object up in the tree :func:`ctdiff.params.load_params` returned."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.paths: dict[int, str] = {}
        self.read: set[str] = set()
        load = params_module.load_params

        def recording_load(*args, **kwargs):
            params = load(*args, **kwargs)
            self._map(params, "")
            return params

        monkeypatch.setattr(params_module, "load_params", recording_load)
        for cls in vars(params_module).values():
            if isinstance(cls, type) and dataclasses.is_dataclass(cls) and cls.__module__ == params_module.__name__:
                monkeypatch.setattr(cls, "__getattribute__", self._getter(cls))

    def _map(self, obj, prefix: str) -> None:
        self.paths[id(obj)] = prefix
        for f in dataclasses.fields(obj):
            value = object.__getattribute__(obj, f.name)
            if dataclasses.is_dataclass(value):
                self._map(value, f"{prefix}.{f.name}".lstrip("."))

    def _getter(self, cls):
        def getattribute(obj, name):
            value = object.__getattribute__(obj, name)
            prefix = self.paths.get(id(obj))
            if prefix is not None and name in cls.__dataclass_fields__ and not dataclasses.is_dataclass(value):
                self.read.add(f"{prefix}.{name}".lstrip("."))
            return value
        return getattribute


def covered(read: str, declared: list[str]) -> bool:
    return any(read == d or read.startswith(d + ".") for d in declared)


@pytest.mark.slow
@pytest.mark.parametrize("use_maisi", [False, True], ids=["sd", "maisi"])
def test_every_param_a_stage_reads_is_declared_for_it(tmp_path, monkeypatch, use_maisi):
    """Each stage script runs in-process on tiny phantoms (the experiments test's sizes) while the params
    leaves it reads are recorded; every one must be in its dvc.yaml ``params``."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for dotted, value in {**TINY, "vae.use_maisi": use_maisi}.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing, unused = {}, {}
    for stage in ORDER:
        reads = ParamsReads(monkeypatch)
        monkeypatch.setattr(sys, "argv", [stage])
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(REPO / "stages" / f"{stage}.py"), run_name="__main__")
        assert done.value.code == 0, f"stage {stage} failed"
        monkeypatch.undo()  # the recorder's patches: the next stage gets fresh ones
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        declared = declared_params(stage)
        undeclared = sorted(r for r in reads.read if not covered(r, declared))
        if undeclared:
            missing[stage] = undeclared
        unread = [d for d in declared if not any(covered(r, [d]) for r in reads.read)
                  and d not in READ_WHEN_PRETRAINED.get(stage, ())]
        if unread:
            unused[stage] = unread
        assert reads.read, f"the recorder saw no params read by {stage}"
    assert not missing, f"dvc.yaml stages read params they do not declare: {missing}"
    assert not unused, f"dvc.yaml stages declare params they never read (a change would rerun them for nothing): " \
                       f"{unused}"
    assert os.path.isdir(tmp_path / "dvclive" / "evaluate")
