"""What every test gets: the environment the session started with."""

import os
from typing import Iterator

import pytest


@pytest.fixture(autouse=True)
def environment_of_its_own() -> Iterator[None]:
    """Lightning's ddp_spawn launcher sets ``MASTER_PORT`` in the launching process, this one. Left there, it would
    send a later test's subprocess (a recipe with ``strategy: ddp``) to that port, which may be taken by then (it was,
    in CI: EADDRINUSE). Each test starts from the session's environment."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
