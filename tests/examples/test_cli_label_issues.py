"""`adalabel label-issues`: a recipe trained by `adalabel fit` on a training file with two wrong labels, then the
command's CSV (every row of train.csv, most suspect first, by the margins that the fit averaged over its training
steps), each as a real process on generated files; a checkpoint written before the training margins existed; a
hold-out split, whose training samples keep their rows in the file."""

import csv
import math
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_adalabel.examples.recipes.data import split_indices
from lightning_adalabel.examples.recipes.lightning_cli import run
from lightning_adalabel.examples.recipes.text import FastTextClassifier, TextClassificationDataModule, read_labeled_csv
from tests.examples.test_cli_resume import adalabel, adalabel_in_process, tiny_agnews
from tests.examples.test_recipes import write_text_csvs

WRONG_ROWS = (5, 18)  # train.csv rows whose label is replaced by the next class


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``(cwd, data, checkpoint)``: agnews on 24 generated rows, two of them mislabelled, trained for 15 epochs."""
    cwd = tmp_path_factory.mktemp("label_issues")
    data = write_text_csvs(cwd / "ag_news_csv", num_classes=4, num_fields=2, num_train=24, num_test=8)
    with open(data / "train.csv", newline="", encoding="utf-8") as file:
        rows = list(csv.reader(file))
    for row in WRONG_ROWS:
        rows[row][0] = str(int(rows[row][0]) % 4 + 1)
    with open(data / "train.csv", "w", newline="", encoding="utf-8") as file:
        csv.writer(file, quoting=csv.QUOTE_ALL).writerows(rows)
    result = adalabel(["fit", *tiny_agnews(cwd), "--trainer.limit_train_batches", "6", "--trainer.max_epochs", "15",
                       "--model.lr", "0.01", "--trainer.default_root_dir", "run"], cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    (checkpoint,) = (cwd / "run").glob("lightning_logs/version_*/checkpoints/last.ckpt")
    return cwd, data, checkpoint


def adalabel_state(checkpoint: Path) -> Dict[str, Any]:
    """The AdaLabel callback's state in a checkpoint of `adalabel fit`."""
    (state,) = [value for key, value in torch.load(checkpoint, map_location="cpu", weights_only=False)["callbacks"]
                .items() if key.startswith("AdaLabel")]
    return state


def read_rows(path: Path) -> List[Dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def column(rows: List[Dict[str, str]], name: str) -> List[float]:
    return [float(row[name]) for row in rows]


@pytest.mark.slow
def test_label_issues_writes_every_training_row_most_suspect_first(trained):
    cwd, data, checkpoint = trained
    # The fit kept each training sample's margin: 24 samples, each seen once in each of the 15 epochs.
    margins = adalabel_state(checkpoint)["training_margins"]
    assert margins["num_samples"] == 24 and margins["epochs"] == 15
    assert margins["count"].tolist() == [15.0] * 24

    result = adalabel(["label-issues", *tiny_agnews(cwd), "--ckpt_path", str(checkpoint), "--output", "issues.csv"],
                      cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_rows(cwd / "issues.csv")
    assert "training samples flagged (margin cut-off); wrote 24 rows, most suspect first (by margin), to" \
           " issues.csv" in result.stderr
    assert list(rows[0]) == ["index", "given", "suggested", "score", "margin", "is_issue"]
    assert sorted(int(row["index"]) for row in rows) == list(range(24))
    assert {int(row["index"]) for row in rows[:2]} == set(WRONG_ROWS)  # the two wrong labels come first
    written_margins = column(rows, "margin")
    assert written_margins == sorted(written_margins)
    assert [int(row["is_issue"]) for row in rows] == [int(margin < 0) for margin in written_margins]
    by_row = torch.tensor([float(row["margin"]) for row in sorted(rows, key=lambda row: int(row["index"]))])
    torch.testing.assert_close(by_row, margins["total"] / margins["count"], rtol=1e-5, atol=1e-6)  # row i: sample i

    model = FastTextClassifier.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    data_module = TextClassificationDataModule(str(data), 4, num_buckets=4096, num_workers=0)
    data_module.setup("fit")
    inputs, labels = next(iter(DataLoader(data_module.train_set, batch_size=24, collate_fn=data_module.collate_fn)))
    with torch.no_grad():
        probabilities = model(inputs).softmax(dim=1)
    by_index = {int(row["index"]): row for row in rows}
    assert [int(by_index[index]["given"]) for index in range(24)] == labels.tolist()
    expected = probabilities.gather(1, labels[:, None]).squeeze(1)
    written = torch.tensor([float(by_index[index]["score"]) for index in range(24)])
    torch.testing.assert_close(written, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("extra, message", [
    ([], "adalabel: error: adalabel label-issues needs the trained model: --ckpt_path"),
    (["--ckpt_path", "missing.ckpt"], "adalabel: error: --ckpt_path missing.ckpt: no such file"),
])
def test_label_issues_without_a_checkpoint_is_one_line(extra, message, tmp_path, monkeypatch, capsys):
    status, line = adalabel_in_process(["label-issues", "--config", "agnews", *extra], tmp_path, monkeypatch, capsys)
    assert status == 1 and line.startswith(message)


@pytest.mark.slow
def test_a_checkpoint_without_training_margins_ranks_by_score(trained, tmp_path, monkeypatch, capsys):
    """A checkpoint of the AdaLabel state format before the training margins (version 2): ranked by the model's
    probability, no margin column; `--cut_off margin` is refused in one line."""
    cwd, _, checkpoint = trained
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state = next(value for key, value in saved["callbacks"].items() if key.startswith("AdaLabel"))
    del state["training_margins"]
    state["version"] = 2
    old = tmp_path / "old.ckpt"
    torch.save(saved, old)
    status, _ = adalabel_in_process(["label-issues", *tiny_agnews(cwd), "--ckpt_path", str(old), "--output",
                                     str(tmp_path / "old.csv")], cwd, monkeypatch, capsys)
    assert status == 0
    rows = read_rows(tmp_path / "old.csv")
    assert list(rows[0]) == ["index", "given", "suggested", "score", "is_issue"]
    assert {int(row["index"]) for row in rows[:2]} == set(WRONG_ROWS)
    assert column(rows, "score") == sorted(column(rows, "score"))

    status, line = adalabel_in_process(["label-issues", *tiny_agnews(cwd), "--ckpt_path", str(old), "--cut_off",
                                        "margin"], cwd, monkeypatch, capsys)
    assert status == 1 and line.startswith(f"adalabel: error: --cut_off margin needs the training margins, and {old}"
                                           " has none")


@pytest.mark.slow
def test_a_hold_out_split_keeps_the_margins_of_its_training_rows(trained, monkeypatch, capsys):
    """With --data.val_fraction the training set is a Subset of train.csv: the margins count its 18 samples, and each
    CSV row is the train.csv row of the sample whose margin it carries."""
    cwd, data, _ = trained
    split = [*tiny_agnews(cwd), "--data.val_fraction", "0.25"]
    run(["fit", *split, "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "1.0",
         "--trainer.default_root_dir", str(cwd / "split")])
    (checkpoint,) = (cwd / "split").glob("lightning_logs/version_*/checkpoints/last.ckpt")
    margins = adalabel_state(checkpoint)["training_margins"]
    train_rows, _ = split_indices(24, 0.25, seed=0)
    assert margins["num_samples"] == len(train_rows) == 18
    assert margins["count"].sum() == 2 * 4 * 4  # 2 epochs of 4 full batches of 4 (drop_last)

    status, _ = adalabel_in_process(["label-issues", *split, "--ckpt_path", str(checkpoint), "--output", "split.csv"],
                                    cwd, monkeypatch, capsys)
    assert status == 0
    rows = {int(row["index"]): row for row in read_rows(cwd / "split.csv")}
    assert sorted(rows) == sorted(train_rows)
    _, labels = read_labeled_csv(str(data / "train.csv"), num_classes=4)
    mean = (margins["total"] / margins["count"]).tolist()  # NaN for a sample that no step drew
    for position, row in enumerate(train_rows):
        assert int(rows[row]["given"]) == labels[row]
        written = float(rows[row]["margin"])
        assert (math.isnan(written) and math.isnan(mean[position])) or written == pytest.approx(mean[position], 1e-5)

    status, line = adalabel_in_process(["label-issues", *tiny_agnews(cwd), "--ckpt_path", str(checkpoint)], cwd,
                                       monkeypatch, capsys)
    assert status == 1 and line.startswith(f"adalabel: error: {checkpoint} was trained on 18 training samples, but the"
                                           " recipe's training set has 24 now")
