"""docs/architecture.md stays true: the modules it lists are the library's, its layering is the imports' order, the
tests it names exist, and the public API it gives is ``lightning_adalabel.__all__``."""

import ast
import re
from pathlib import Path
from typing import Dict, List, Set

import lightning_adalabel

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "lightning_adalabel"
PAGE = (ROOT / "docs" / "architecture.md").read_text()


def library_modules() -> Set[str]:
    return {path.name for path in LIBRARY.glob("*.py")}


def section(title: str) -> str:
    return PAGE.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def layers() -> List[List[str]]:
    """The lines of the layering block, bottom first, as lists of file names."""
    block = section("Dependencies run one way").split("```\n", 2)[1]
    return [re.findall(r"([a-z_]+\.py)", line.split("  ")[0]) for line in block.splitlines() if line.strip()]


def library_imports(module: str) -> Set[str]:
    """The library modules that ``module`` imports, anywhere in its code (function-level imports included)."""
    tree = ast.parse((LIBRARY / module).read_text())
    names: Set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lightning_adalabel"):
            parts = node.module.split(".")
            if len(parts) > 1:
                names.add(parts[1])
            else:  # from lightning_adalabel import name
                names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name.split(".")[1] for alias in node.names
                         if alias.name.startswith("lightning_adalabel."))
    return {f"{name}.py" for name in names if (LIBRARY / f"{name}.py").exists()} - {module}


def test_the_library_table_lists_every_library_module_and_nothing_else():
    listed = set(re.findall(r"^\| `lightning_adalabel/([a-z_]+\.py)` \|", section("The library"), flags=re.M))
    assert listed == library_modules()


def test_the_layering_lists_every_library_module_once():
    placed = [module for layer in layers() for module in layer]
    assert sorted(placed) == sorted(library_modules())


def test_each_module_imports_only_from_the_layers_below_it():
    below: Set[str] = set()
    wrong: Dict[str, Set[str]] = {}
    for layer in layers():
        for module in layer:
            above = library_imports(module) - below
            if above:
                wrong[module] = above
        below.update(layer)
    assert wrong == {}, f"imports from the same layer or above it: {wrong}"


def test_the_library_never_imports_the_examples():
    for module in library_modules():
        assert "examples" not in {name.split(".")[0] for name in library_imports(module)}
        assert "lightning_adalabel.examples" not in (LIBRARY / module).read_text(), module


def test_every_test_file_the_page_names_exists():
    named = set(re.findall(r"`(test_[a-z_]+)`", PAGE)) | set(re.findall(r"tests/(test_[a-z_]+)\.py", PAGE))
    assert named, "the page names no test file"
    missing = [name for name in sorted(named) if not (ROOT / "tests" / f"{name}.py").exists()]
    assert missing == []


def test_the_public_api_is_the_one_the_page_gives():
    public = section("The public API").split(". ", 1)[0]
    assert set(re.findall(r"`([A-Za-z_]+)`", public)) - {"lightning_adalabel"} == set(lightning_adalabel.__all__)
