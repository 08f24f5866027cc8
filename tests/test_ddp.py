"""AdaLabel under real 2-process CPU DDP (gloo), compared with a single-process run that sees the same global batches.

The DDP runs are ``tests/scripts/ddp_adalabel.py``'s configs in the session's one DDP launch (``ddp_launch.py``, in a
subprocess; Lightning re-executes it for rank 1); the single-process references run here, in-process, through the
same ``run_config``.
"""

import subprocess
import sys
from pathlib import Path
from typing import Any, Dict

import pytest
import torch

from tests.scripts.ddp_adalabel import CONFIGS, GLOBAL_BATCH, MAX_EPOCHS, NUM_CLASSES, NUM_SAMPLES, run_config
from tests.helpers import launch_env

# Every test here launches 2 DDP processes (or reads what one launch recorded).
pytestmark = pytest.mark.slow

ACCUMULATOR_SHAPE = (NUM_CLASSES * (NUM_CLASSES + 4),)  # K x 4 tallies and K x K sums, flat (label_matrix.py)
STEPS_PER_EPOCH = NUM_SAMPLES // GLOBAL_BATCH


@pytest.fixture(scope="module")
def ddp_records(ddp_launch: Path) -> Dict[str, list]:
    """``{config: [rank 0 record, rank 1 record]}`` from the session's 2-process DDP launch (``ddp_launch.py``)."""
    return {
        name: [torch.load(ddp_launch / f"dense-{name}-rank{rank}.pt", weights_only=False) for rank in (0, 1)]
        for name in CONFIGS
    }


@pytest.fixture(scope="module")
def single_records() -> Dict[str, Dict[str, Any]]:
    return {name: run_config(name, devices=1) for name in CONFIGS}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ddp_matches_single_process_after_every_refresh(name, ddp_records, single_records):
    single, ranks = single_records[name], ddp_records[name]
    assert [record["world_size"] for record in ranks] == [2, 2]
    assert len(single["refreshes"]) >= 2
    assert len(ranks[0]["refreshes"]) == len(single["refreshes"])
    for expected, rank0, rank1 in zip(single["refreshes"], *(record["refreshes"] for record in ranks)):
        assert rank0["global_step"] == expected["global_step"]
        # The statistics are sums: the two shards' accumulators add up to the single-process one.
        torch.testing.assert_close(
            rank0["local_accumulator"] + rank1["local_accumulator"], expected["local_accumulator"], rtol=0, atol=1e-5
        )
        assert (rank0["matrix"] - expected["matrix"]).abs().max() < 1e-6
    assert (ranks[0]["matrix"] - single["matrix"]).abs().max() < 1e-6
    # DDP averages the two shards' mean-loss gradients: the same update as the single-process mean, up to rounding.
    assert (ranks[0]["weight"] - single["weight"]).abs().max() < 1e-5


@pytest.mark.parametrize("name", list(CONFIGS))
def test_all_ranks_hold_the_same_q_after_every_refresh(name, ddp_records):
    rank0, rank1 = ddp_records[name]
    assert len(rank0["refreshes"]) == len(rank1["refreshes"]) > 0
    for first, second in zip(rank0["refreshes"], rank1["refreshes"]):
        assert torch.equal(first["matrix"], second["matrix"])
        assert torch.isfinite(first["matrix"]).all()
        # Each rank saw only its own shard before the reduction.
        assert not torch.equal(first["local_accumulator"], second["local_accumulator"])
    assert torch.equal(rank0["weight"], rank1["weight"])


def test_label_matrix_is_not_a_ddp_buffer(ddp_records):
    for name, ranks in ddp_records.items():
        for record in ranks:
            wrapped = record["wrapped_module"]
            assert wrapped["is_ddp"], name
            # DDP broadcasts buffers from rank 0 before every forward: Q and the accumulator must not be among them,
            # nor in the module's state.
            assert wrapped["buffer_names"] == [], name
            assert not wrapped["holds_label_matrix"], name
            assert wrapped["state_keys"] == ["module.net.weight", "module.net.bias"], name


def test_exactly_one_all_reduce_per_refresh_and_none_per_step(ddp_records):
    outside_counts = {}
    for name, ranks in ddp_records.items():
        for record in ranks:
            for refresh in record["refreshes"]:
                assert refresh["reduced_shapes"] == [ACCUMULATOR_SHAPE], name
            inside = [shape for refresh in record["refreshes"] for shape in refresh["reduced_shapes"]]
            outside = list(record["reduced_shapes"])
            for shape in inside:
                outside.remove(shape)
            # Whatever Lightning reduces itself (data length, stop decisions) is scalar and once per fit.
            assert all(shape == () for shape in outside), (name, outside)
            outside_counts[name] = len(outside)
    assert len(set(outside_counts.values())) == 1, outside_counts  # 16-step and 8-step runs alike: not per step
    assert next(iter(outside_counts.values())) < STEPS_PER_EPOCH


@pytest.mark.parametrize("devices", [1, 2])
def test_refresh_every_n_optimizer_steps_with_gradient_accumulation(devices, ddp_records, single_records):
    config = CONFIGS["alr_accumulate"]
    every, accumulate = config["refresh_every_n_steps"], config["accumulate_grad_batches"]
    records = ddp_records["alr_accumulate"] if devices == 2 else [single_records["alr_accumulate"]]
    optimizer_steps = MAX_EPOCHS * STEPS_PER_EPOCH // accumulate
    for record in records:
        refreshes = record["refreshes"]
        assert [r["global_step"] for r in refreshes] == list(range(every, optimizer_steps + 1, every))
        for refresh in refreshes:
            # On the last micro-batch of an optimizer step, never between micro-batches.
            assert (refresh["batch_idx"] + 1) % accumulate == 0
            # Every micro-batch since the last refresh entered the statistics.
            seen = refresh["local_seen"]
            assert seen == every * accumulate * GLOBAL_BATCH // devices


def test_refresh_every_n_steps_without_accumulation_counts_steps(ddp_records):
    every = CONFIGS["alr"]["refresh_every_n_steps"]
    for record in ddp_records["alr"]:
        steps = [refresh["global_step"] for refresh in record["refreshes"]]
        assert steps == list(range(every, MAX_EPOCHS * STEPS_PER_EPOCH + 1, every))


def test_uneven_ranks_stop_with_a_clear_error_on_every_rank():
    """Rank 0 with 5 batches an epoch, rank 1 with 4 (a custom sampler): both ranks raise our error at the epoch's
    start instead of waiting in the refresh's all-reduce until the process group times out (30 minutes)."""
    script = Path(__file__).parent / "scripts" / "ddp_uneven.py"
    result = subprocess.run([sys.executable, str(script), "adalabel"], capture_output=True, text=True, timeout=240,
                            cwd=Path(__file__).resolve().parents[1], env=launch_env())
    assert result.returncode != 0
    for rank in (0, 1):
        assert f"rank {rank} error: RuntimeError: The training processes have different numbers of batches" \
               " this epoch (per rank: [5, 4])" in result.stdout, result.stdout + result.stderr[-3000:]
