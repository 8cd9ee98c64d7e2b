"""Learners' pages name only files they have: every repository path a notebook, the README, a docs page or
data/README.md mentions exists, and none points at the developers' design notes (which are not in the repository)."""
from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
PAGES = [ROOT / "README.md", ROOT / "data" / "README.md", ROOT / "data" / "paper_cost_per_token.csv",
         *sorted((ROOT / "docs").glob("*.md")),
         *sorted((ROOT / "notebooks" / "build").glob("[0-9]*.py"))]
# Files of the developers' workspace that learners never get.
NOT_IN_REPO = re.compile(r"REFERENCE\.md|EXPERIMENTS\.md|DESIGN\.md|STYLE\.md|(?<![\w.-])shared/")
MD_LINK = re.compile(r"\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
TOP = {p.name for p in ROOT.iterdir() if not p.name.startswith(".")}
GENERATED = {"html", ".venv"}  # made by make html / make env


def _texts():
    for nb in NOTEBOOKS:
        cells = json.loads(nb.read_text())["cells"]
        yield nb, ROOT / "notebooks", "\n".join("".join(c["source"]) for c in cells)
    for page in PAGES:  # a builder's links are relative to the notebook it writes
        yield page, ROOT / "notebooks" if page.parent.name == "build" else page.parent, page.read_text()


def _expand(path: str) -> list[str]:
    """`data/moe/moe_lm_{none,aux}.safetensors` -> both names."""
    parts = re.split(r"\{([^{}]*)\}", path)
    fixed, choices = parts[0::2], [p.split(",") for p in parts[1::2]]
    return ["".join(x for pair in itertools.zip_longest(fixed, combo, fillvalue="") for x in pair)
            for combo in itertools.product(*choices)]


def repo_paths(text: str, base: Path) -> list[tuple[str, Path]]:
    """(as written, resolved) for markdown links to local files and for `code spans` that name a repository path."""
    found = []
    for target in MD_LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a web link or an anchor on the same page
        found += [(target, (base / t.split("#")[0]).resolve()) for t in _expand(target)]
    for span in CODE_SPAN.findall(text):
        span = span.strip().split(" ")[0].rstrip(",.:;)")
        first = span.split("/")[0]
        if "/" not in span or first not in TOP | GENERATED or first in GENERATED:
            continue
        if re.search(r"[*<>]|\bNN\b|NN_", span):
            continue  # a pattern, not a file
        found += [(span, (ROOT / p).resolve()) for p in _expand(span)]
    return found


def test_repo_paths_are_found():
    text = ("see [refs](../docs/references.md#ch3), `data/moe/moe_lm_{none,bias}.safetensors` and "
            "`notebooks/build/NN_x.py`")
    got = [str(p.relative_to(ROOT)) for _, p in repo_paths(text, ROOT / "notebooks")]
    assert got == ["docs/references.md", "data/moe/moe_lm_none.safetensors", "data/moe/moe_lm_bias.safetensors"]
    assert NOT_IN_REPO.search("see REFERENCE.md §2") and NOT_IN_REPO.search("the project's `shared/` folder")
    assert not NOT_IN_REPO.search("dslib.sparse/")


@pytest.mark.parametrize("path,base,text", list(_texts()), ids=lambda x: x.name if isinstance(x, Path) else "")
def test_learner_pages_name_only_files_in_the_repository(path, base, text):
    bad = NOT_IN_REPO.findall(text)
    assert not bad, f"{path.relative_to(ROOT)} refers to files learners do not have: {sorted(set(bad))}; " \
                    "cite docs/references.md instead"
    missing = [written for written, resolved in repo_paths(text, base) if not resolved.exists()]
    assert not missing, f"{path.relative_to(ROOT)} names paths that are not in the repository: {missing}"


def test_anchors_of_the_references_page_exist():
    page = (ROOT / "docs" / "references.md").read_text()
    anchors = set(re.findall(r'<a id="([^"]+)"></a>', page))
    for path, _, text in _texts():
        for target in MD_LINK.findall(text):
            if "references.md#" in target:
                anchor = target.split("#", 1)[1]
                assert anchor in anchors, f"{path.relative_to(ROOT)} links to #{anchor}, which docs/references.md lacks"
