"""Markers given by place, for the places whose every test needs the examples' stack.

``tests/examples`` runs the ``adalabel`` command and the recipes (jsonargparse, torchvision, timm, transformers; many
in a process of their own), and the doctests of ``lightning_adalabel/examples`` and ``benchmarks`` import the same
stack: all of them are ``slow``, so ``python -m pytest -m "not slow"`` is the library's quick loop. CI runs them all.
"""

from pathlib import Path
from typing import List, Optional

import pytest
from _pytest.mark.expression import Expression

ROOT = Path(__file__).resolve().parent
SLOW_PLACES = ("tests/examples", "lightning_adalabel/examples", "benchmarks")


def in_a_slow_place(path: Path) -> bool:
    path = path.resolve()
    if path != ROOT and ROOT not in path.parents:
        return False
    place = path.relative_to(ROOT).as_posix()
    return any(place == each or place.startswith(each + "/") for each in SLOW_PLACES)


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> Optional[bool]:
    """Where ``-m`` deselects a test marked ``slow`` and nothing else (``-m "not slow"``), the slow places are not
    even collected: importing their stack would be a third of the quick loop's time."""
    expression = config.getoption("markexpr")
    if expression and in_a_slow_place(collection_path):
        if not Expression.compile(expression).evaluate(lambda name, **kwargs: name == "slow"):
            return True
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    for item in items:
        if in_a_slow_place(Path(str(item.path))):
            item.add_marker(pytest.mark.slow)
