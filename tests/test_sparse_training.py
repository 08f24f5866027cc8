"""AdaLabel(top_k=...) end to end: real Trainer fits against the dense callback, real 2-process CPU DDP against one
process, real checkpoints resumed, and what is logged at large K."""

import csv
import os
from pathlib import Path
from typing import Dict

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_adalabel import AdaLabel, top_correlated_pairs
from lightning_adalabel.label_matrix_logging import MAX_HEATMAP_CLASSES
from lightning_adalabel.sparse_label_matrix import SparseLabelMatrix
from tests.helpers import TinyClassifier, fit, make_loader
from tests.scripts.ddp_sparse_adalabel import CONFIGS, run_config
from tests.test_resume import MomentumClassifier
from tests.test_resume import fit as resumable_fit



@pytest.mark.parametrize("settings", [dict(preset="alr", samples="all"), dict(preset="ols"),
                                      dict(preset="alr", loss="mixed", alpha=0.3, momentum=0.5)])
def test_top_k_of_all_classes_trains_as_the_dense_callback(settings):
    """Same model, data and schedule: the sparse callback keeping every entry ends with the dense Q and weights."""
    runs = []
    for top_k in (None, 5):  # 5: clamped to the K - 1 other classes, or all K with the diagonal (ols)
        torch.manual_seed(0)
        callback = AdaLabel(top_k=top_k, refresh_every_n_steps=3, **settings)
        _, model = fit(callback, loader=make_loader(96), max_epochs=2)
        matrix = callback.engine.matrix if top_k is None else callback.engine.to_dense()
        runs.append((matrix, model.net.weight.detach()))
    assert callback.engine.num_refreshes == 4
    torch.testing.assert_close(runs[1][0], runs[0][0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(runs[1][1], runs[0][1], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(runs[0][0], runs[0][0].new_full(runs[0][0].shape, runs[0][0][0, 1].item()))


@pytest.mark.parametrize("preset", ["label_smoothing", "none"])
def test_presets_that_never_refresh_train_with_top_k_as_the_dense_callback(preset):
    """samples="none": the sparse engine counts the batches (for the invalid-target check) and Q stays as it started."""
    runs = []
    for top_k in (None, 2):
        torch.manual_seed(0)
        callback = AdaLabel(preset=preset, top_k=top_k)
        _, model = fit(callback, loader=make_loader(64), max_epochs=2)
        runs.append((callback.engine.to_dense(), model.net.weight.detach()))
    assert callback.engine.num_refreshes == 2
    torch.testing.assert_close(runs[1][0], runs[0][0])
    torch.testing.assert_close(runs[1][1], runs[0][1], atol=1e-5, rtol=1e-4)


def test_small_top_k_keeps_k_entries_per_row_and_trains():
    callback = AdaLabel(top_k=2, samples="all", num_classes=5)
    fit(callback, loader=make_loader(64), max_epochs=2)
    engine = callback.engine
    assert isinstance(engine, SparseLabelMatrix) and engine.indices.shape == (5, 2)
    torch.testing.assert_close(engine.values.sum(dim=1) + engine.residual_mass, torch.ones(5))
    assert (engine.values > 0).all() and (engine.indices != torch.arange(5)[:, None]).all()


# ---- distributed -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ddp_records(ddp_launch: Path) -> Dict[str, list]:
    """``{config: [rank 0 record, rank 1 record]}`` from the session's 2-process DDP launch (``ddp_launch.py``)."""
    return {name: [torch.load(ddp_launch / f"sparse-{name}-rank{rank}.pt", weights_only=False) for rank in (0, 1)]
            for name in CONFIGS}


@pytest.mark.slow  # one 2-process DDP launch, shared
@pytest.mark.parametrize("name", list(CONFIGS))
def test_ddp_equals_one_process_on_the_same_global_batches(name, ddp_records):
    single, ranks = run_config(name, devices=1), ddp_records[name]
    assert [record["world_size"] for record in ranks] == [2, 2]
    assert len(single["refreshes"]) >= 2 and len(ranks[0]["refreshes"]) == len(single["refreshes"])
    for expected, rank0, rank1 in zip(single["refreshes"], *(record["refreshes"] for record in ranks)):
        assert rank0["global_step"] == expected["global_step"]
        torch.testing.assert_close(rank0["local_tallies"] + rank1["local_tallies"], expected["local_tallies"])
        assert not torch.equal(rank0["local_tallies"], rank1["local_tallies"])  # each rank saw its own shard
        assert torch.equal(rank0["matrix"], rank1["matrix"])  # every rank holds the same Q
        assert torch.equal(rank0["indices"], expected["indices"])
        torch.testing.assert_close(rank0["matrix"], expected["matrix"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ranks[0]["weight"], single["weight"], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_one_fixed_size_all_gather_per_refresh_and_no_all_reduce(ddp_records):
    # K x (5 + 2c): tallies, uniform sums, c candidates' classes and sums; c = 4 * top_k clamped to the row's
    # 4 other classes (alr) or all 5 (ols, with the diagonal).
    expected_shapes = {"alr_top2": (5, 5 + 2 * 4), "ols_top3_epoch": (5, 5 + 2 * 5)}
    for name, ranks in ddp_records.items():
        for record in ranks:
            ours = [shape for shape in record["gathered_shapes"] if shape == expected_shapes[name]]
            assert len(ours) == len(record["refreshes"]), name
            # Besides ours, only the callback's once-an-epoch check of the ranks' batch counts gathers.
            others = [shape for shape in record["gathered_shapes"] if shape != expected_shapes[name]]
            assert others == [(1,)] * 2, name
            assert all(shape == () for shape in record["reduced_shapes"]), name


# ---- checkpoints ---------------------------------------------------------------------------------------------------

def engine_state(adalabel: AdaLabel) -> dict:
    return adalabel.engine.state_dict()


@pytest.mark.parametrize("every, save_every, crash_at", [(None, 3, 7), (3, 4, 7), (None, 4, 10)],
                         ids=["mid_epoch", "mid_epoch_every_3_steps", "epoch_boundary"])
def test_resume_equals_the_uninterrupted_run(every, save_every, crash_at, tmp_path):
    settings = dict(top_k=2, samples="all")
    expected_model, expected = resumable_fit(tmp_path / "reference", refresh_every_n_steps=every, **settings)
    resumable_fit(tmp_path, refresh_every_n_steps=every, save_every=save_every, crash_at=crash_at, **settings)
    model, adalabel = resumable_fit(tmp_path, refresh_every_n_steps=every, ckpt_path=tmp_path / "last.ckpt",
                                    model=MomentumClassifier(), **settings)
    assert expected.engine.num_refreshes >= 2
    for (name, got), want in zip(model.state_dict().items(), expected_model.state_dict().values()):
        assert torch.equal(got, want), name
    got_state, want_state = engine_state(adalabel), engine_state(expected)
    for key, want in want_state.items():
        assert torch.equal(got_state[key], want) if isinstance(want, torch.Tensor) else got_state[key] == want, key


def test_checkpoint_holds_the_sparse_state_only(tmp_path):
    resumable_fit(tmp_path, save_every=3, crash_at=4, top_k=2, samples="all")
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)
    (adalabel_state,) = [value for key, value in state["callbacks"].items() if key.startswith("AdaLabel")]
    assert adalabel_state["top_k"] == 2
    saved = adalabel_state["label_matrix"]
    assert saved["kind"] == "sparse" and saved["values"].shape == (5, 2)
    assert saved["tallies"][:, 1].sum() == 3 * 8  # three batches of 8 since the epoch's start
    with pytest.raises(ValueError, match="written with top_k=2, but the callback has top_k=None"):
        resumable_fit(tmp_path / "dense", ckpt_path=tmp_path / "last.ckpt", model=MomentumClassifier(),
                      samples="all")


def test_top_k_refuses_a_dense_initial_matrix_and_the_geometric_estimator():
    with pytest.raises(ValueError, match="neither `initial_matrix`"):
        AdaLabel(top_k=2, estimator="geometric")
    with pytest.raises(ValueError, match="`top_k` must be an integer >= 1"):
        AdaLabel(top_k=0)


# ---- logging ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_classes", [5, MAX_HEATMAP_CLASSES + 16])
def test_logging_draws_the_heatmap_at_small_k_and_only_the_pairs_above(num_classes, tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    callback = AdaLabel(top_k=3, samples="all", log_label_matrix=True, top_pairs=4)
    loader = make_loader(64, num_classes=num_classes)
    fit(callback, model=TinyClassifier(num_classes=num_classes), loader=loader, max_epochs=1, logger=logger)
    directory = os.path.join(logger.log_dir, "label_matrix")
    expected_files = ["step_4_top_pairs.csv"] + (["step_4.png"] if num_classes <= MAX_HEATMAP_CLASSES else [])
    assert sorted(os.listdir(directory)) == sorted(expected_files)
    with open(os.path.join(directory, "step_4_top_pairs.csv"), newline="") as handle:
        rows = list(csv.reader(handle))
    expected = top_correlated_pairs(callback.engine.to_dense(), 4)
    assert [(row[0], row[1]) for row in rows[1:]] == [(row[0], row[1]) for row in expected]
    assert [float(row[2]) for row in rows[1:]] == pytest.approx([row[2] for row in expected], abs=1e-6)
