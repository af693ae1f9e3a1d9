"""A throwaway git + DVC repository holding a copy of this project's pipeline, for end-to-end tests.

The copy carries ``dvc.yaml``, ``params.yaml``, ``stages/`` and ``src/`` (the stages' code deps), and
runs with ``PYTHONPATH`` pointing at the copied ``src`` so DVC sees exactly the code it tracks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
COPIED = ("dvc.yaml", "params.yaml", "stages", "src")


def repo_env(root: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment every command in a test repository runs with (``extra`` on top)."""
    return {
        **os.environ,
        "PYTHONPATH": str(root / "src"),
        "GIT_AUTHOR_NAME": "ctdiff tests", "GIT_AUTHOR_EMAIL": "tests@ctdiff.invalid",
        "GIT_COMMITTER_NAME": "ctdiff tests", "GIT_COMMITTER_EMAIL": "tests@ctdiff.invalid",
        "HF_HUB_OFFLINE": "1",
        "DVC_NO_ANALYTICS": "1",
        **(extra or {}),
    }


class DvcRepo:
    def __init__(self, root: Path, param_overrides: dict[str, Any] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.root = root
        for name in COPIED:
            src = REPO_ROOT / name
            if src.is_dir():
                shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
            else:
                shutil.copy2(src, root / name)
        if param_overrides:
            self.set_params(param_overrides)
        self.env = repo_env(root, env)
        self.run("git", "init", "-q", "-b", "main")
        self.run("dvc", "init", "-q")
        self.run("dvc", "config", "core.analytics", "false")
        (root / ".gitignore").write_text("__pycache__/\n")
        self.commit("initial pipeline")

    @classmethod
    def clone(cls, url: str | Path, root: Path, env: dict[str, str] | None = None) -> DvcRepo:
        """``git clone url root`` of a repository holding this pipeline: what a second machine starts from.

        Nothing is copied or initialised; the clone runs its own ``src`` as the original does.
        """
        repo = cls.__new__(cls)
        repo.root = root
        repo.env = repo_env(root, env)
        proc = subprocess.run(["git", "clone", "-q", str(url), str(root)], env=repo.env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise AssertionError(f"git clone {url} failed ({proc.returncode}):\n{proc.stderr}")
        return repo

    def set_params(self, overrides: dict[str, Any]) -> None:
        """Apply dotted-key overrides (``{"data.phantom.n_cases": 4}``) to params.yaml."""
        path = self.root / "params.yaml"
        params = yaml.safe_load(path.read_text())
        for dotted, value in overrides.items():
            node = params
            *parents, leaf = dotted.split(".")
            for key in parents:
                node = node[key]
            if leaf not in node:
                raise KeyError(f"params.yaml has no key {dotted}")
            node[leaf] = value
        path.write_text(yaml.safe_dump(params, sort_keys=False))

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(args, cwd=self.root, env=self.env, capture_output=True, text=True)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def dvc(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run("dvc", *args, check=check)

    def commit(self, message: str) -> None:
        self.run("git", "add", "-A")
        self.run("git", "commit", "-q", "--allow-empty", "-m", message)
