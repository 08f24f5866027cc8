"""benchmarks/gpu_check.py, the one command for every GPU check: its CPU twin runs every step end to end here and
writes every figure beside its table; its CUDA plan runs what the GPU issue asks for."""

import json
import subprocess
import sys
from pathlib import Path
from typing import Callable, List

import pytest
import torch

from tests.helpers import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
STEP_ROWS = {  # each step and the start of the rows it writes
    "tests": "pytest tests/test_sync.py",
    "loss": "fused loss vs float64",
    "overhead": "training step",
    "large_k": "alr top_k=",
    "imagenet": "imagenet recipe",
}


def gpu_check(*args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


def gpu_check_main() -> Callable[[List[str]], int]:
    """The script's ``main``, to run in this process what needs no process of its own (a dry run, a refusal)."""
    return load_script(SCRIPT).main


@pytest.mark.slow
def test_the_cpu_twin_of_every_step_passes_and_writes_every_figure(tmp_path):
    # Every step but large_k, whose twin is test_large_k_benchmark's run (the same script, its figures through the
    # same large_k_rows): one benchmark subprocess fewer, 25 s of the suite's 10 minutes.
    result = gpu_check("--device", "cpu", "--out", str(tmp_path), "--steps", *(step for step in STEP_ROWS
                                                                             if step != "large_k"))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    rows = report["rows"]
    assert [each["status"] for each in rows] == ["pass"] * len(rows)
    for step, start in STEP_ROWS.items():
        if step != "large_k":
            assert any(each["check"].startswith(start) for each in rows), f"no row of the {step} step in {rows}"
    # The table printed and written beside the JSON holds every row with its figure.
    table = (tmp_path / "gpu_check.md").read_text()
    assert all(f"| {each['check']} | pass | {each['figure']} |" in table for each in rows)
    assert table.strip().splitlines()[-1] in result.stdout
    # The JSON keeps the figures behind each row: every case of the loss check, the benchmarks' own rows.
    losses = [each for each in rows if each["check"].startswith(STEP_ROWS["loss"])]
    assert [each["check"].split(",")[1].split("(")[0].strip() for each in losses] == [
        "float32", "bfloat16 autocast", "float16 autocast"]
    for each in losses:
        assert set(each["details"]) == {"K=10", "K=1000", "K=1000 compiled"}
        assert all(0 <= error["gradient"] < 1e-2 for error in each["details"].values())
    (step,) = [each for each in rows if each["check"].startswith(STEP_ROWS["overhead"])]
    assert {entry["loop"] for entry in step["details"]["training"]} >= {"plain F.cross_entropy", "AdaLabel preset=alr"}
    (imagenet,) = [each for each in rows if each["check"].startswith(STEP_ROWS["imagenet"])]
    assert imagenet["details"]["resumed"] and imagenet["details"]["num_refreshes"] == 2
    assert report["environment"]["torch"] == torch.__version__
    assert "imagenet" in (tmp_path / "gpu_check.log").read_text()


def test_the_cuda_plan_runs_what_the_gpu_issue_asks_for(tmp_path, capsys):
    """A dry run prints each step's commands without running them: the CUDA sizes are the issue's."""
    assert gpu_check_main()(["--device", "cuda", "--dry-run", "--out", str(tmp_path)]) == 0
    plan = capsys.readouterr().out
    assert "-m pytest tests -m gpu" in plan
    assert "(32000, False)" in plan and "(1000, True)" in plan
    overhead = next(line for line in plan.splitlines() if "overhead.py" in line)
    for setting in ("--device cuda", "--model resnet50", "--precision bf16-mixed", "--channels-last",
                    "--num-classes 1000", "--image-size 224", "--micro-classes 10 1000 32000"):
        assert setting in overhead, setting
    large_k = next(line for line in plan.splitlines() if "large_k.py" in line)
    assert "--device cuda --num-classes 100000 --top-k 64" in large_k
    fits = [line for line in plan.splitlines() if "examples.cli fit --config imagenet" in line]
    assert len(fits) == 2 and fits[1].endswith("--trainer.max_epochs 2 --ckpt_path last")
    assert all("--trainer.accelerator gpu" in line and "--trainer.precision bf16-mixed" in line for line in fits)
    assert not (tmp_path / "gpu_check.md").exists()  # nothing ran, so no table


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_is_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_status:
        gpu_check_main()(["--device", "cuda", "--out", str(tmp_path)])
    assert exit_status.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "--device cuda, but torch sees no CUDA device (`--device cpu` runs the CPU twin of every step)")
