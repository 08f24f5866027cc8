"""A newcomer's first hour with the recipes: loaders sized to the machine, `--help` that shows the recipe's own
options, and a dry run of a Hugging Face recipe with nothing downloaded."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from lightning.fabric.utilities.data import suggested_max_num_workers

from lightning_adalabel.examples.cli import main
from lightning_adalabel.examples.recipes.lightning_cli import run
from tests.examples.test_recipes import write_text_csvs

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_recipe_loaders_use_the_cpus_there_are_and_pin_memory_only_for_a_gpu(tmp_path):
    """agnews asks for 4 workers and pinned memory; on a CPU-only machine with few cores neither torch nor Lightning
    has anything to warn about."""
    root = write_text_csvs(tmp_path / "ag_news_csv", num_classes=4, num_fields=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = run([
            "fit", "--config", "agnews", "--data.root", str(root), "--trainer.accelerator", "cpu",
            "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path / "run"),
            "--data.num_buckets", "4096", "--model.num_buckets", "4096", "--data.batch_size", "4",
        ])
    assert cli.datamodule.num_workers == 4 and cli.datamodule.pin_memory  # the recipe's values, as asked
    loader = cli.trainer.train_dataloader
    assert loader.num_workers == min(4, suggested_max_num_workers(1)) and not loader.pin_memory
    about_loading = [str(warning.message) for warning in caught
                     if "worker" in str(warning.message) or "pin_memory" in str(warning.message)]
    assert about_loading == []


def test_fit_help_lists_the_recipes_model_and_data_options(capsys):
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", "agnews", "--help"])
    assert done.value.code == 0
    shown = capsys.readouterr().out
    assert "--trainer.max_epochs" in shown and "--adalabel.alpha" in shown  # LightningCLI's own help
    assert "The recipe's model and data (FastTextClassifier, TextClassificationDataModule)" in shown
    for option in ("--model.embed_dim EMBED_DIM", "--model.lr LR", "--data.root ROOT", "--data.num_workers"):
        assert option in shown, option
    assert "default: 1048576" in shown  # the recipe's num_buckets, not the class's default

    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    assert "`adalabel fit --config <recipe> --help`" in capsys.readouterr().out


@pytest.mark.slow
def test_a_hugging_face_recipe_dry_runs_offline_on_a_tiny_local_checkpoint(tmp_path):
    """The two commands of docs/recipes.md's offline dry run, with the Hub unreachable (HF_HUB_OFFLINE=1)."""
    pytest.importorskip("transformers")
    root = write_text_csvs(tmp_path / "ag_news_csv", num_classes=4, num_fields=2)
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    commands = [
        [sys.executable, "-m", "lightning_adalabel.examples.recipes.tiny_checkpoint", "tiny_bert"],
        [sys.executable, "-m", "lightning_adalabel.examples.cli", "fit", "--config", "agnews_bert",
         "--data.root", str(root), "--model.checkpoint", "tiny_bert", "--trainer.fast_dev_run", "2",
         "--data.batch_size", "4", "--trainer.accelerator", "cpu"],
    ]
    for command in commands:
        result = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    written = {path.name for path in (tmp_path / "tiny_bert").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= written, written
    assert "`Trainer.fit` stopped: `max_steps=2` reached." in result.stdout + result.stderr
