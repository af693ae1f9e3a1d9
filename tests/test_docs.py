"""The README is a front door and docs/ stays true to the repository: the README is short and opens with the two
fresh-machine commands, every relative link resolves, and every params key the docs name exists in params.yaml."""

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [README, *DOCS]
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())
GROUPS = set(PARAMS)  # seed, train_seed, device, hu_range and the stages' groups

# Names the pipeline used before and docs/measurements.md gives as the old name beside the new one.
HISTORICAL = {
    "docs/measurements.md": {
        "evaluate.steps", "evaluate.samples", "evaluate.decode", "evaluate.consistency", "evaluate.overlap",
        "evaluate.window_batch", "evaluate.slab_profile", "train.device", "vae.hu_range", "data.phantom.shape",
        "data.phantom.pixel_mm", "data.phantom.centre",
    },
}

FENCE = re.compile(r"^```.*?$(.*?)^```\s*$", re.M | re.S)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
INLINE_CODE = re.compile(r"`([^`\n]+)`")
KEY = re.compile(r"[a-z][a-z0-9_]*(?:\.(?:[a-z0-9_]+|\*|<[a-z_]+>|\{[a-z0-9_,]+\}))+")
OVERRIDE = re.compile(r"-S\s+'?\+?([a-z][a-z0-9_.]*)=")


def rel(page: Path) -> str:
    return page.relative_to(REPO).as_posix()


def prose(text: str) -> str:
    """The page without its fenced code blocks."""
    return FENCE.sub("", text)


def key_exists(key: str) -> bool:
    """Whether a dotted key names a node of params.yaml; ``*`` and ``<name>`` match any child, ``{a,b}`` each."""
    nodes = [PARAMS]
    for part in key.split("."):
        if part == "*" or part.startswith("<"):
            nodes = [v for n in nodes if isinstance(n, dict) for v in n.values()]
            names = None
        else:
            names = part.strip("{}").split(",")
            nodes = [n[name] for n in nodes for name in names if isinstance(n, dict) and name in n]
        if not nodes or (names is not None and len(nodes) < len(names)):
            return False
    return True


def params_keys(text: str) -> set[str]:
    """Dotted params keys in inline code spans (``train.sampling.steps``, ``slab.profile: fitted``,
    ``-S vae.use_maisi=true``) and in ``-S key=value`` overrides of code blocks."""
    keys = set()
    for span in INLINE_CODE.findall(prose(text)):
        for match in KEY.finditer(span):
            start = match.start()
            if start and (span[start - 1].isalnum() or span[start - 1] in "_./-$"):
                continue  # part of a path, a module or a longer name
            key = match.group(0)
            if key.split(".")[0] in GROUPS:
                keys.add(key)
    for block in FENCE.findall(text):
        keys.update(k for k in OVERRIDE.findall(block) if k.split(".")[0] in GROUPS)
    return keys


def test_the_readme_is_a_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) < 200, f"README.md has {len(lines)} lines: move detail into docs/"
    assert any(line.strip() == "## The verdict" for line in lines), "README.md lost its verdict section"


def test_the_first_code_block_holds_the_two_fresh_machine_commands():
    block = FENCE.search(README.read_text())
    assert block is not None, "README.md has no code block"
    commands = [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 2, f"the fresh-machine block should hold exactly two commands, got {commands}"
    run, test = commands
    assert run.startswith("python3 -m venv .venv") and run.endswith("&& dvc repro"), run
    assert test.startswith("python3 -m venv .venv") and test.endswith("&& python -m pytest -q"), test


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+\s+(.*?)\s*$", prose(page.read_text()), re.M)
    return {re.sub(r"[^a-z0-9 _-]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_relative_link_resolves(page):
    broken = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # a URL
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            broken.append(target)
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(target)
    assert not broken, f"{rel(page)} links to missing files or headings: {broken}"


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_every_params_key_the_docs_name_exists(page):
    allowed = HISTORICAL.get(rel(page), set())
    missing = sorted(k for k in params_keys(page.read_text()) if k not in allowed and not key_exists(k))
    assert not missing, f"{rel(page)} names params keys that params.yaml does not have: {missing}"


def test_the_key_finder_sees_what_it_should():
    text = "Set `train.sampling.steps`, `slab.profile: fitted`, `-S vae.use_maisi=true` and `ctdiff.data.slab`, " \
           "not `data/slab`.\n\n```bash\ndvc exp run -S 'train_seed=0,1' -S evaluate.samples=1\n```\n"
    assert params_keys(text) == {"train.sampling.steps", "slab.profile", "vae.use_maisi", "train_seed",
                                 "evaluate.samples"}
    assert key_exists("data.phantom.families.<family>.shape") and key_exists("train.sampling")
    assert key_exists("data.phantom.families.hilum.{shape,pixel_mm,centre}")
    assert not key_exists("evaluate.samples") and not key_exists("train.source")
