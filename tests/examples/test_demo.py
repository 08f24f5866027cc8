"""`adalabel demo`: the digits comparison, its files, and an output short enough to read."""

import csv
import os
import subprocess
import sys

import pytest

from lightning_adalabel.examples.demo import default_out_dir, parse_args


def test_import_does_not_import_torchvision_itself():
    """Our modules never import torchvision; only Lightning's own imports (torchmetrics) may pull it in."""
    code = (
        "import sys, lightning.pytorch, torchmetrics; before = 'torchvision' in sys.modules; "
        "import lightning_adalabel, lightning_adalabel.examples.demo; "
        "print(before, 'torchvision' in sys.modules)"
    )
    before, after = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert after == before


def test_demo_command_prints_the_table_and_writes_csv_and_heatmap(tmp_path):
    from lightning_adalabel.examples.cli import main

    out = tmp_path / "demo"
    code = main(["demo", "--seeds", "2", "--epochs", "1", "--methods", "none", "alr", "--noise", "0.3",
                 "--out", str(out), "--no-progress-bar"])
    assert code == 0
    summary = (out / "summary.csv").read_text().splitlines()
    assert summary[0].startswith("method,seeds,noise,accuracy") and len(summary) == 3
    assert len((out / "runs.csv").read_text().splitlines()) == 5
    assert os.path.getsize(out / "alr_label_matrix.png") > 10_000


def test_demo_rejects_bad_arguments():
    from lightning_adalabel.examples.cli import main

    with pytest.raises(SystemExit):
        main(["demo", "--noise", "1.5"])
    assert main(["frobnicate"]) == 2


def test_each_noise_setting_has_its_own_default_folder(tmp_path):
    assert parse_args([]).out == default_out_dir(0.0) == "adalabel_demo"
    assert parse_args(["--noise", "0.3"]).out == default_out_dir(0.3) == "adalabel_demo_flip30"
    assert parse_args(["--noise", "0.3", "--out", str(tmp_path)]).out == str(tmp_path)  # --out still wins


def test_demo_output_is_a_short_table_and_lands_in_the_noise_folder(tmp_path):
    """No per-run banners, progress bars or model summaries from Lightning: a header, one row per run, the summary."""
    result = subprocess.run(
        [sys.executable, "-m", "lightning_adalabel.examples.cli", "demo", "--seeds", "1", "--epochs", "1",
         "--methods", "none", "alr", "--noise", "0.3"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert len(output.splitlines()) < 60, output
    for line in ("| 1/2 | none | 0 |", "| 2/2 | alr | 0 |", "| method | test accuracy (%)"):
        assert line in output
    for noise in ("GPU available", "Trainer.fit` stopped", "LOCAL_RANK", "Warning"):
        assert noise not in output
    assert (tmp_path / "adalabel_demo_flip30" / "summary.csv").is_file()
    assert not (tmp_path / "adalabel_demo").exists()  # the clean run's folder is left alone


def test_demo_with_noise_tells_how_many_flipped_labels_each_model_finds(tmp_path, capsys):
    from lightning_adalabel.examples.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--seeds", "1", "--epochs", "2", "--methods", "alr", "--noise", "0.3", "--out", str(out),
                 "--no-progress-bar"]) == 0
    printed = capsys.readouterr().out
    with open(out / "label_issues.csv", newline="") as file:
        (row,) = list(csv.DictReader(file))
    assert row["method"] == "alr" and row["flipped"] == "300"
    precision, recall, auroc = (float(row[name]) for name in ("precision", "recall", "auroc"))
    assert 0.5 < precision <= 1 and 0.5 < recall <= 1 and 0.8 < auroc <= 1  # a trained model finds most of them
    assert "The 300 flipped training labels, as find_label_issues finds them" in printed
    assert f"| alr | {row['flagged']} | {100 * precision:.1f} | {100 * recall:.1f} | {auroc:.3f} |" in printed
