"""The accuracy benchmark runs end to end on both tasks from its command line (one short run each)."""

import subprocess
import sys
from pathlib import Path

import pytest

# Each test runs a benchmark script in a process of its own.
pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "accuracy.py"


@pytest.mark.parametrize("task", ["digits", "superclasses"])
def test_accuracy_benchmark_runs_and_tabulates(task, tmp_path):
    pytest.importorskip("sklearn")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--task", task, "--seeds", "1", "--epochs", "1", "--settings", "clean",
         "flip-40", "--variants", "none", "alr[prior_strength=0.3]", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    runs = (tmp_path / "runs.csv").read_text().splitlines()
    assert runs[0].startswith("setting,method,seed") and len(runs) == 1 + 2 * 2
    assert "alr[prior_strength=0.3]" in result.stdout
