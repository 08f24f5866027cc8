"""The documentation: the README's usage example runs as written, links resolve, the front page stays short."""

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
TESTED_MARKER = "<!-- tested: tests/test_readme.py -->"
MAX_README_LINES = 180

# [text](target) links, and the targets of reference-style definitions `[name]: target`.
INLINE_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
REFERENCE_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.MULTILINE)
FENCED_BLOCK = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def usage_example() -> str:
    """The ```python block right below the README's `tested` marker."""
    text = README.read_text(encoding="utf-8")
    assert TESTED_MARKER in text, f"README.md lost the {TESTED_MARKER!r} marker above its usage example."
    after = text.split(TESTED_MARKER, 1)[1]
    match = re.match(r"\s*```python\n(.*?)^```", after, re.DOTALL | re.MULTILINE)
    assert match, f"The {TESTED_MARKER!r} marker must sit right above a ```python block."
    return match.group(1)


def heading_anchors(path: Path) -> set:
    """GitHub's anchors for the headings of ``path``: lower case, punctuation dropped, spaces to hyphens."""
    text = FENCED_BLOCK.sub("", path.read_text(encoding="utf-8"))
    headings = re.findall(r"^#+\s+(.*?)\s*$", text, re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def relative_links(path: Path) -> list:
    """Link targets in ``path`` that point into the repository (no scheme, not a bare #anchor), code blocks skipped."""
    text = FENCED_BLOCK.sub("", path.read_text(encoding="utf-8"))
    targets = INLINE_LINK.findall(text) + REFERENCE_LINK.findall(text)
    return [target for target in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", target) and not target.startswith("#")]


def test_readme_usage_example_trains_and_refreshes_the_label_matrix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Lightning writes lightning_logs/ and checkpoints into the working directory
    namespace = {"__name__": "readme_usage_example"}
    exec(compile(usage_example(), "README.md (usage example)", "exec"), namespace)

    trainer, adalabel = namespace["trainer"], namespace["adalabel"]
    assert trainer.state.finished and trainer.current_epoch == trainer.max_epochs
    assert adalabel in trainer.callbacks
    matrix = adalabel.engine.matrix.cpu()
    num_classes = matrix.shape[0]
    # Refreshed: no longer the uniform start 1/(K-1) off the diagonal, and still a residual label matrix.
    uniform = (torch.ones(num_classes, num_classes) - torch.eye(num_classes)) / (num_classes - 1)
    assert not torch.allclose(matrix, uniform)
    assert torch.isfinite(matrix).all() and (matrix >= 0).all()
    assert torch.allclose(matrix.sum(dim=1), torch.ones(num_classes))
    assert torch.count_nonzero(matrix.diagonal()) == 0


def test_readme_is_a_front_page():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move detail into docs/."


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda path: str(path.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(path):
    missing = []
    for target in relative_links(path):
        file_part = target.split("#", 1)[0]
        if not (path.parent / file_part).exists():
            missing.append(target)
    assert not missing, f"{path.relative_to(ROOT)} links to missing files: {missing}"


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda path: str(path.relative_to(ROOT)))
def test_anchors_point_to_existing_headings(path):
    text = FENCED_BLOCK.sub("", path.read_text(encoding="utf-8"))
    targets = [t for t in INLINE_LINK.findall(text) if "#" in t and not re.match(r"^[a-z][a-z0-9+.-]*:", t)]
    missing = []
    for target in targets:
        file_part, anchor = target.split("#", 1)
        linked = (path.parent / file_part) if file_part else path
        if linked.suffix == ".md" and linked.exists() and anchor not in heading_anchors(linked):
            missing.append(target)
    assert not missing, f"{path.relative_to(ROOT)} links to headings that do not exist: {missing}"


def test_every_docs_page_is_linked_from_readme_and_index():
    readme_links = {(README.parent / t.split("#", 1)[0]).resolve() for t in relative_links(README)}
    index = ROOT / "docs" / "README.md"
    index_links = {(index.parent / t.split("#", 1)[0]).resolve() for t in relative_links(index)}
    pages = [page for page in DOCS if page != index]
    assert pages, "docs/ holds no pages"
    not_in_readme = [page.name for page in pages if page.resolve() not in readme_links]
    not_in_index = [page.name for page in pages if page.resolve() not in index_links]
    assert not not_in_readme, f"README.md does not link these docs pages: {not_in_readme}"
    assert not not_in_index, f"docs/README.md does not link these pages: {not_in_index}"
