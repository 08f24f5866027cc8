"""What every test gets: the environment the session started with; and the suite's one DDP launch, for the tests
that compare 2 processes with one."""

import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from tests.helpers import launch_env

DDP_LAUNCH = Path(__file__).parent / "scripts" / "ddp_launch.py"


@pytest.fixture(autouse=True)
def environment_of_its_own() -> Iterator[None]:
    """Lightning's ddp_spawn launcher sets ``MASTER_PORT`` in the launching process, this one. Left there, it would
    send a later test's subprocess (a recipe with ``strategy: ddp``) to that port, which may be taken by then (it was,
    in CI: EADDRINUSE). Each test starts from the session's environment."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def ddp_launch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder where ``tests/scripts/ddp_launch.py``, run once, left each rank's record of each DDP run."""
    out = tmp_path_factory.mktemp("ddp_launch")
    result = subprocess.run([sys.executable, str(DDP_LAUNCH), str(out)], cwd=DDP_LAUNCH.parents[2], env=launch_env(),
                            capture_output=True, text=True, timeout=420)
    assert result.returncode == 0, f"DDP launch failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return out
