from pathlib import Path

import pytest

# Fixtures shared by several test modules: hf_env and fake_hub (the Hugging Face cache and a local fake Hub).
pytest_plugins = ["hf_fakes"]

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT
