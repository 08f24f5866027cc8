"""The large-label-set benchmark runs end to end from its command line at a tiny K and prints both tables; its JSON
figures make the GPU check's large-K row (the suite's run of the GPU check's CPU twin leaves that step to this test)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import load_script

# The benchmark runs each method in a process of its own.
pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "large_k.py"


def test_large_k_benchmark_prints_its_tables_and_recovers_the_groups(tmp_path):
    figures = tmp_path / "large_k.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--num-classes", "64", "--top-k", "4", "--steps", "12", "--refresh-every", "6",
         "--batch-size", "32", "--dense-up-to", "0", "--error", "--error-classes", "64", "--error-group-size", "8",
         "--error-top-k", "2", "--json", str(figures)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rows = {line.split(" | ")[1]: line.strip("| ").split(" | ") for line in result.stdout.splitlines()
            if line.startswith("| 64 |")}
    # Two speed rows, each in a process of its own; the dense engine's speed row is left out (one interpreter start,
    # 7 s of the suite): the error table below runs the dense engine, and the suite runs it everywhere else.
    assert set(rows) == {"ce", "alr top_k=4"}
    # Classes in groups of 4 start confused within their group: the sparse rows hold the group mates.
    precision, recall = float(rows["alr top_k=4"][6]), float(rows["alr top_k=4"][7])
    assert precision > 0.9 and recall > 0.9
    errors = [line for line in result.stdout.splitlines() if line.startswith("| 2 | 2 |")]
    assert len(errors) == 2  # after the second refresh: the two statistics sizes
    for line in errors:
        l1, held = (float(cell) for cell in line.strip("| ").split(" | ")[4:6])
        assert 0 < l1 < 2 and 0 < held <= 1
    # The GPU check's large-K row, from these figures: as `gpu_check.py` builds it from its own run.
    (row,) = load_script(SCRIPT.parent / "gpu_check.py").large_k_rows(json.loads(figures.read_text()))
    assert row["status"] == "pass" and row["check"].startswith("alr top_k=4 at K=64"), row
    assert row["details"]["top_k"]["precision"] > 0.9
