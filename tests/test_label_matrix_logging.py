"""Logging Q at each refresh (lightning_adalabel/label_matrix_logging.py): a TensorBoard figure and text, a Weights
& Biases image and table (offline), MLflow artifacts (file store), or a PNG and a CSV beside other loggers; global
rank 0 only. Each is read back from what the logger wrote."""

import csv
import json
import os
from types import SimpleNamespace

import lightning as L
import pytest
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_adalabel import AdaLabel, top_correlated_pairs
from lightning_adalabel.label_matrix import initial_label_matrix
from lightning_adalabel.label_matrix import LabelMatrix
from lightning_adalabel.label_matrix_logging import label_matrix_dir, log_heatmap_and_pairs
from tests.helpers import TinyClassifier, fit, make_loader, trainer_kwargs

NUM_CLASSES = 5
NAMES = ["ant", "bee", "cat", "dog", "eel"]


def test_tensorboard_gets_the_heatmap_and_the_top_pairs(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="tb")
    callback = AdaLabel(preset="alr", samples="all", log_label_matrix=True, class_names=NAMES, top_pairs=3)
    trainer, _ = fit(callback, loader=make_loader(64), max_epochs=2, logger=logger)
    logger.experiment.flush()

    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "tensors": 0}).Reload()
    images = events.Images("adalabel/label_matrix")
    assert [image.step for image in images] == [4, 8]  # one per refresh: 4 batches per epoch, 2 epochs
    text = events.Tensors("adalabel/top_pairs/text_summary")
    assert len(text) == 2
    table = text[-1].tensor_proto.string_val[0].decode()
    first = top_correlated_pairs(callback.engine.matrix, 1, NAMES)[0]
    assert f"| {first[0]} | {first[1]} |" in table and table.count("\n") == 2 + 3 - 1
    assert not os.path.exists(label_matrix_dir(trainer))  # the figure went to TensorBoard, no PNG fallback


def test_csv_logger_falls_back_to_png_and_csv(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    callback = AdaLabel(preset="alr", samples="all", log_label_matrix=True, top_pairs=4)
    trainer, _ = fit(callback, loader=make_loader(64), max_epochs=2, logger=logger)

    directory = os.path.join(logger.log_dir, "label_matrix")
    assert label_matrix_dir(trainer) == directory
    assert sorted(os.listdir(directory)) == [
        "step_4.png", "step_4_top_pairs.csv", "step_8.png", "step_8_top_pairs.csv",
    ]
    with open(os.path.join(directory, "step_8.png"), "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(directory, "step_8_top_pairs.csv"), newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["target_class", "soft_label_class", "q"]
    expected = top_correlated_pairs(callback.engine.matrix, 4)
    assert [(a, b, pytest.approx(float(q))) for a, b, q in rows[1:]] == [(a, b, q) for a, b, q in expected]


def test_without_a_logger_the_png_goes_under_default_root_dir(tmp_path):
    trainer, _ = fit(AdaLabel(log_label_matrix=True), loader=make_loader(64), default_root_dir=str(tmp_path))
    assert sorted(os.listdir(tmp_path / "label_matrix")) == ["step_4.png", "step_4_top_pairs.csv"]


def test_logging_is_off_by_default(tmp_path):
    fit(AdaLabel(), loader=make_loader(64), default_root_dir=str(tmp_path))
    assert not (tmp_path / "label_matrix").exists()


def test_only_global_rank_zero_writes(tmp_path):
    not_rank_zero = SimpleNamespace(is_global_zero=False, global_step=3, loggers=[], log_dir=str(tmp_path),
                                    default_root_dir=str(tmp_path))
    log_heatmap_and_pairs(not_rank_zero, LabelMatrix(3))  # type: ignore[arg-type]
    assert os.listdir(tmp_path) == []


def test_bad_logging_options_fail_early():
    with pytest.raises(ValueError, match="3 `class_names` for 5 classes"):
        AdaLabel(num_classes=5, class_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="`top_pairs` must be an integer >= 0"):
        AdaLabel(top_pairs=-1)



@pytest.mark.slow  # wandb starts its service process
def test_weights_and_biases_gets_an_image_and_a_table_per_refresh(tmp_path, monkeypatch):
    """W&B in offline mode (no network): the run's files are read back after it finishes."""
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(project="adalabel-test", save_dir=str(tmp_path), offline=True)
    callback = AdaLabel(preset="alr", samples="all", log_label_matrix=True, class_names=NAMES, top_pairs=3)
    try:
        trainer, _ = fit(callback, loader=make_loader(64), max_epochs=2, logger=logger)
    finally:
        wandb.finish()
    (run_dir,) = [os.path.join(tmp_path, "wandb", name) for name in os.listdir(os.path.join(tmp_path, "wandb"))
                  if name.startswith("offline-run-")]
    media = os.path.join(run_dir, "files", "media")
    images = sorted(os.listdir(os.path.join(media, "images", "adalabel")))
    tables = sorted(os.listdir(os.path.join(media, "table", "adalabel")))
    assert len(images) == 2 and all(name.startswith("label_matrix_") and name.endswith(".png") for name in images)
    assert len(tables) == 2
    last = max((os.path.join(media, "table", "adalabel", name) for name in tables), key=os.path.getmtime)
    with open(last) as handle:
        table = json.load(handle)
    assert table["columns"] == ["target_class", "soft_label_class", "q"]
    expected = top_correlated_pairs(callback.engine.matrix, 3, NAMES)
    assert [row[:2] for row in table["data"]] == [[row, column] for row, column, _ in expected]
    assert [row[2] for row in table["data"]] == pytest.approx([value for _, _, value in expected])
    assert not os.path.exists(label_matrix_dir(trainer))


@pytest.mark.slow  # mlflow's file store
def test_mlflow_gets_the_heatmap_and_the_pairs_as_artifacts(tmp_path, monkeypatch):
    """MLflow with a file store (no server, no database): the artifacts are listed and read back through MLflow's
    client."""
    pytest.importorskip("mlflow")
    from lightning.pytorch.loggers import MLFlowLogger

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store for those who ask

    logger = MLFlowLogger(experiment_name="adalabel-test", tracking_uri=f"file:{tmp_path / 'mlruns'}")
    callback = AdaLabel(preset="alr", samples="all", log_label_matrix=True, class_names=NAMES, top_pairs=3)
    trainer, _ = fit(callback, loader=make_loader(64), max_epochs=2, logger=logger)
    client, run_id = logger.experiment, logger.run_id
    names = sorted(artifact.path for artifact in client.list_artifacts(run_id, "adalabel/label_matrix"))
    assert names == [f"adalabel/label_matrix/step_{step}{suffix}" for step in (4, 8)
                     for suffix in (".png", "_top_pairs.csv")]
    local = client.download_artifacts(run_id, "adalabel/label_matrix/step_8_top_pairs.csv", str(tmp_path))
    with open(local, newline="") as handle:
        rows = list(csv.reader(handle))
    expected = top_correlated_pairs(callback.engine.matrix, 3, NAMES)
    assert rows[0] == ["target_class", "soft_label_class", "q"]
    assert [row[:2] for row in rows[1:]] == [[row, column] for row, column, _ in expected]
    assert not os.path.exists(label_matrix_dir(trainer))


@pytest.mark.parametrize("every, refresh_steps", [(None, [8, 16]), (3, [3, 6, 9, 12, 15])])
def test_the_scalars_are_logged_once_per_refresh_at_the_heatmaps_step(tmp_path, every, refresh_steps):
    """A CSV of the run says when Q changed: one row per refresh, at the step the heatmap file is named after."""
    logger = CSVLogger(tmp_path)
    trainer = L.Trainer(**trainer_kwargs(
        callbacks=[AdaLabel(refresh_every_n_steps=every, log_label_matrix=True)], max_epochs=2, logger=logger,
        log_every_n_steps=1,
    ))
    trainer.fit(TinyClassifier(), make_loader())
    rows = list(csv.DictReader(open(os.path.join(logger.log_dir, "metrics.csv"))))
    logged = [int(row["step"]) for row in rows if row.get("adalabel/entropy")]
    heatmaps = sorted(int(name[len("step_"):-len(".png")])
                      for name in os.listdir(os.path.join(logger.log_dir, "label_matrix")) if name.endswith(".png"))
    assert logged == heatmaps == refresh_steps
    assert float(trainer.callback_metrics["adalabel/nonfinite"]) == 0.0
