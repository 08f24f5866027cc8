"""`adalabel label-issues`: a recipe trained by `adalabel fit` on a training file with two wrong labels, then the
command's CSV (every row of train.csv, most suspect first), each as a real process on generated files."""

import csv

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_adalabel.examples.recipes.text import FastTextClassifier, TextClassificationDataModule
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


@pytest.mark.slow
def test_label_issues_writes_every_training_row_most_suspect_first(trained):
    cwd, data, checkpoint = trained
    result = adalabel(["label-issues", *tiny_agnews(cwd), "--ckpt_path", str(checkpoint), "--output", "issues.csv"],
                      cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(cwd / "issues.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert "training samples flagged (misclassified cut-off); wrote 24 rows, most suspect first, to issues.csv" \
        in result.stderr
    assert list(rows[0]) == ["index", "given", "suggested", "score", "is_issue"]
    assert sorted(int(row["index"]) for row in rows) == list(range(24))
    assert {int(row["index"]) for row in rows[:2]} == set(WRONG_ROWS)  # the two wrong labels come first
    scores = [float(row["score"]) for row in rows]
    assert scores == sorted(scores)

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
