"""The package's metadata has one home each: the version in ``lightning_adalabel.__version__`` (read by the build), the
PEP 561 typing marker shipped in the wheel, a changelog entry for this version. .ci/run builds the wheel, checks it
with twine and smoke-tests it in a fresh virtualenv."""

import re
from pathlib import Path

import pytest

import lightning_adalabel

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib", reason="Python 3.11's TOML reader")


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_the_build_reads_the_version_from_the_package():
    project = pyproject()
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "lightning_adalabel.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+((a|b|rc)\d+)?(\.dev\d+)?", lightning_adalabel.__version__)


def test_the_wheel_carries_the_typing_marker_and_the_recipes():
    assert (Path(lightning_adalabel.__file__).parent / "py.typed").is_file()
    assert pyproject()["tool"]["setuptools"]["package-data"]["lightning_adalabel"] == [
        "py.typed", "examples/recipes/*.yaml"]


def test_the_changelog_has_this_version_and_the_first():
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    release = re.match(r"\d+\.\d+\.\d+", lightning_adalabel.__version__).group()
    headings = re.findall(r"^## (\S+)", changelog, re.MULTILINE)
    assert headings[0] == release and headings[-1] == "0.1.0", headings
    assert lightning_adalabel.__version__ in changelog.split("\n## ", 2)[1]  # the unreleased entry names the .dev
