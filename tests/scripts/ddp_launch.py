"""The suite's one 2-process CPU DDP launch: every run that a test compares with one process, in one process group.

    python tests/scripts/ddp_launch.py OUT_DIR     # Lightning re-executes this script for rank 1

Run once per session by the ``ddp_launch`` fixture (``tests/conftest.py``) for ``tests/test_ddp.py`` (the dense
engine's configs, ``ddp_adalabel.py``), ``tests/test_sparse_training.py`` (the ``top_k`` engine's,
``ddp_sparse_adalabel.py``) and ``tests/test_label_issues.py`` (``find_label_issues``' predict pass,
``ddp_label_issues.py``). One launch
instead of three: each launch is two interpreter starts and a process group, most of what those tests cost. Every
rank runs every run in the same order, so their collectives match, and writes ``OUT_DIR/<group>-<run>-rank<r>.pt``.
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `tests.*`

from tests.scripts import ddp_adalabel, ddp_label_issues, ddp_sparse_adalabel  # noqa: E402


def main(out_dir: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for group, script in (("dense", ddp_adalabel), ("sparse", ddp_sparse_adalabel)):
        for name in script.CONFIGS:
            record = script.run_config(name, devices=2)
            torch.save(record, out / f"{group}-{name}-rank{record['rank']}.pt")
    issues = ddp_label_issues.run(devices=2)
    torch.save(issues, out / f"label_issues-find-rank{torch.distributed.get_rank()}.pt")
    indexed = ddp_label_issues.run_indexed(devices=2)
    torch.save(indexed, out / f"label_issues-indexed-rank{torch.distributed.get_rank()}.pt")
    torch.distributed.barrier()  # rank 0 (the launcher) returns only once rank 1 has written its files too
    print(f"rank {os.environ.get('LOCAL_RANK', '0')} done")


if __name__ == "__main__":
    main(sys.argv[1])
