"""The LightningCLI recipes end to end: `adalabel fit/validate/test/predict --config <recipe>` on tiny generated data
written in each data set's real on-disk format (CIFAR pickles, an ImageFolder of PNGs, Zhang et al. CSVs)."""

import csv
import pickle
import subprocess
import sys
import warnings
import zlib
from pathlib import Path
from typing import Dict, List

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image

from lightning_adalabel import AdaLabel
from lightning_adalabel.examples.cli import main
from lightning_adalabel.examples.recipes import format_recipe_list, recipe_paths, resolve_config_args
from lightning_adalabel.examples.recipes.lightning_cli import run
from lightning_adalabel.examples.recipes.text import NGRAM_HASH_MULTIPLIER, HashingTokenizer, TextClassificationDataModule, read_labeled_csv
from lightning_adalabel.examples.recipes.vision import ImageClassifier
from lightning_adalabel.examples.recipes.vision_data import CIFAR10DataModule, CIFAR100DataModule, ImageNetDataModule

REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPES = [
    "agnews", "agnews_bert", "cifar10", "cifar100", "conll2003", "imagenet", "imagenet_convnext", "yahoo", "yahoo_bert",
    "yelp_full", "yelp_full_bert",
]
ALR_SCALARS = ("adalabel/entropy", "adalabel/counted_fraction")


# ---- data in the real on-disk formats ---------------------------------------------------------------------------


def _pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as file:
        pickle.dump(obj, file)


def write_cifar10(root: Path, per_batch: int = 8) -> Path:
    """``cifar-10-batches-py/`` as torchvision reads it: 5 training batches, a test batch and ``batches.meta``."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        _pickle(folder / name, {
            "batch_label": name,
            "labels": rng.integers(0, 10, per_batch).tolist(),
            "data": rng.integers(0, 256, (per_batch, 3 * 32 * 32), dtype=np.uint8),  # rows of R, G, B planes
            "filenames": [f"{name}_{i}.png" for i in range(per_batch)],
        })
    _pickle(folder / "batches.meta", {
        "label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": per_batch, "num_vis": 3072,
    })
    return root


def write_cifar100(root: Path, num_train: int = 16, num_test: int = 8) -> Path:
    """``cifar-100-python/`` as torchvision reads it: ``train``, ``test`` (fine and coarse labels) and ``meta``."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name, size in (("train", num_train), ("test", num_test)):
        _pickle(folder / name, {
            "batch_label": name,
            "fine_labels": rng.integers(0, 100, size).tolist(),
            "coarse_labels": rng.integers(0, 20, size).tolist(),
            "data": rng.integers(0, 256, (size, 3 * 32 * 32), dtype=np.uint8),
            "filenames": [f"{name}_{i}.png" for i in range(size)],
        })
    _pickle(folder / "meta", {
        "fine_label_names": [f"fine{i}" for i in range(100)], "coarse_label_names": [f"coarse{i}" for i in range(20)],
    })
    return root


def write_image_folder(root: Path, classes=("n01440764", "n01443537", "n01484850"), per_class=None) -> Path:
    """``train/<wnid>/*.png`` and ``val/<wnid>/*.png`` with images of varied sizes, as ImageFolder reads them."""
    per_class = per_class or {"train": 4, "val": 2}
    rng = np.random.default_rng(2)
    for split, count in per_class.items():
        for wnid in classes:
            (root / split / wnid).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (40 + 3 * i, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / wnid / f"{wnid}_{i}.png")
    return root


TEXT_DATASETS = {  # recipe: (folder name, number of classes, number of text fields per row)
    "agnews": ("ag_news_csv", 4, 2),
    "yahoo": ("yahoo_answers_csv", 10, 3),
    "yelp_full": ("yelp_review_full_csv", 5, 1),
}


def write_text_csvs(root: Path, num_classes: int, num_fields: int, num_train: int = 24, num_test: int = 8) -> Path:
    """``train.csv``/``test.csv`` in the format of Zhang et al. (2015): no header, 1-based label, quoted fields with
    doubled quotes, commas and literal ``\\n`` line breaks inside."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(3)
    for split, size in (("train", num_train), ("test", num_test)):
        with open(root / f"{split}.csv", "w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file, quoting=csv.QUOTE_ALL)
            for i in range(size):
                label = i % num_classes + 1
                words = [f"topic{label}word{int(w)}" for w in rng.integers(0, 5, 6)]
                fields = [f'{" ".join(words)}, said "someone"\\nnext line {j}' for j in range(num_fields)]
                writer.writerow([label, *fields])
    return root


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_cifar10(root)
    write_cifar100(root)
    write_image_folder(root / "imagenet")
    for folder, num_classes, num_fields in TEXT_DATASETS.values():
        write_text_csvs(root / folder, num_classes, num_fields)
    return root


# ---- command-line helpers ------------------------------------------------------------------------------------------


def quick_trainer_args(out: Path) -> List[str]:
    """Two training steps and one short validation on the CPU, quietly."""
    return [
        "--trainer.accelerator", "cpu", "--trainer.devices", "1",
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
        "--trainer.num_sanity_val_steps", "0", "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.default_root_dir", str(out),
    ]


def cifar_args(recipe: str, data_root: Path, out: Path) -> List[str]:
    return [
        "--config", recipe, *quick_trainer_args(out), "--data.root", str(data_root),
        "--data.check_integrity", "false",  # the files are ours, not the official release
        "--data.batch_size", "4", "--data.num_workers", "0",
    ]


def imagenet_args(data_root: Path, out: Path) -> List[str]:
    return [
        "--config", "imagenet", *quick_trainer_args(out),
        "--data.train_root", str(data_root / "imagenet" / "train"), "--data.val_root", str(data_root / "imagenet" / "val"),
        "--model.num_classes", "3", "--data.batch_size", "2", "--data.num_workers", "0",
        # small crops keep ResNet-50 fast on a CPU; the recipe's 224 is a command-line value like any other
        "--data.train_crop_size", "32", "--data.val_resize_size", "36", "--data.val_crop_size", "32",
        "--trainer.precision", "32-true",
    ]


def text_args(recipe: str, data_root: Path, out: Path) -> List[str]:
    folder, _, _ = TEXT_DATASETS[recipe]
    return [
        "--config", recipe, *quick_trainer_args(out), "--data.root", str(data_root / folder),
        "--data.num_buckets", "4096", "--model.num_buckets", "4096",  # the recipe's 2**20 rows, shrunk for the test
        "--data.batch_size", "4", "--data.num_workers", "0",
    ]


def metrics(cli) -> Dict[str, float]:
    return {name: float(value) for name, value in cli.trainer.callback_metrics.items()}


def adalabel_callback(trainer: pl.Trainer) -> AdaLabel:
    (callback,) = [cb for cb in trainer.callbacks if isinstance(cb, AdaLabel)]
    return callback


def assert_trained_and_evaluated(values: Dict[str, float], split: str = "val") -> None:
    for name in (f"{split}/acc", "train/loss", *ALR_SCALARS):
        assert name in values, f"{name} was not logged; got {sorted(values)}"
    assert 0.0 <= values[f"{split}/acc"] <= 1.0
    assert 0.0 <= values["adalabel/counted_fraction"] <= 1.0
    assert np.isfinite(values["train/loss"])


class RecordTrainTargets(pl.Callback):
    """Keeps the targets and the samples' indices of the training batches as the training step received them (after
    the batch transfer)."""

    def __init__(self) -> None:
        self.targets: List[torch.Tensor] = []
        self.indices: List[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.targets.append(batch[1].detach().cpu())
        self.indices.append(batch[2].detach().cpu())


# ---- the `adalabel` command ------------------------------------------------------------------------------------------


def test_recipes_command_lists_one_line_per_recipe(capsys):
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sorted(recipe_paths()) == RECIPES
    for name in RECIPES:
        (line,) = [line for line in lines if line.split(" ", 1)[0] == name]
        assert len(line.split()) > 3, line  # name + a description
    assert format_recipe_list().splitlines()[: len(RECIPES)] == lines[: len(RECIPES)]


def test_usage_names_every_command(capsys):
    assert main(["--help"]) == 0
    usage = capsys.readouterr().out
    for command in ("demo", "recipes", "fit", "validate", "test", "predict"):
        assert f"  {command} " in usage


def test_recipe_names_resolve_to_shipped_yaml_and_paths_stay(tmp_path, monkeypatch):
    own = tmp_path / "mine.yaml"
    own.write_text("seed_everything: 1\n")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cifar10").mkdir()  # a data folder named like a recipe does not hide the recipe
    args = resolve_config_args(["fit", "--config", "cifar10", "-c", str(own), "--config=cifar10.yaml"])
    assert args[2] == str(recipe_paths()["cifar10"])
    assert args[4] == str(own)
    assert args[5] == f"--config={recipe_paths()['cifar10']}"
    with pytest.raises(FileNotFoundError, match="adalabel recipes"):
        resolve_config_args(["fit", "--config", "cifar1000"])


def test_import_loads_neither_torchvision_nor_recipes():
    """The package itself never imports torchvision, the recipes or jsonargparse (`adalabel fit` loads them lazily).

    torchmetrics (through Lightning) imports torchvision on its own when it is installed, so the check records which
    module asks for torchvision rather than whether it ends up loaded.
    """
    code = """
import builtins, sys
importers = set()
original_import = builtins.__import__
def recording_import(name, globals=None, *args, **kwargs):
    if name.split(".")[0] == "torchvision":
        importers.add((globals or {}).get("__name__", "?"))
    return original_import(name, globals, *args, **kwargs)
builtins.__import__ = recording_import
import lightning_adalabel, lightning_adalabel.examples.cli
ours = sorted(name for name in importers if name.startswith("lightning_adalabel"))
assert not ours, ours
loaded = sorted(m for m in sys.modules if m.startswith(("lightning_adalabel.examples.recipes", "jsonargparse")))
assert not loaded, loaded
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)


def test_recipes_leave_the_warning_filters_alone():
    """Importing the recipes (done at the top of this file) adds no process-wide warning filter; `adalabel fit`
    hides Lightning's on_after_batch_transfer warning inside its own run only."""
    patterns = [getattr(message, "pattern", "") for _, message, *_ in warnings.filters if message is not None]
    assert not any("on_after_batch_transfer" in pattern for pattern in patterns)


# ---- vision ----------------------------------------------------------------------------------------------------


def test_cifar10_recipe_fit_validate_test(data_root, tmp_path):
    out = tmp_path / "run"
    args = cifar_args("cifar10", data_root, out)
    cli = run(["fit", *args, "--adalabel.preset", "ols", "--adalabel.alpha", "0.3"])
    values = metrics(cli)
    assert_trained_and_evaluated(values)
    assert "val/acc_top5" in values
    callback = adalabel_callback(cli.trainer)
    assert callback.preset_name == "ols" and callback.preset.alpha == 0.3
    assert callback.label_matrix.num_classes == 10 and callback.label_matrix.num_refreshes == 1
    assert type(cli.model.net).__name__ == "ResNet" and cli.model.net.conv1.kernel_size == (3, 3)  # CIFAR stem
    # The training batches carried the samples' indices: each of the 2 x 4 samples trained on has its margin.
    margins = callback.training_margins
    assert margins.num_samples == len(cli.datamodule.label_issues_set()) == 40
    assert margins.count.sum() == 8 and set(margins.count.tolist()) == {0.0, 1.0}
    checkpoint = next((out / "lightning_logs").glob("version_*/checkpoints/last.ckpt"))

    validated = run(["validate", *args, "--adalabel.preset", "ols", "--adalabel.alpha", "0.3",
                     "--ckpt_path", str(checkpoint)])
    assert "val/acc" in metrics(validated)
    assert main(["test", *args, "--adalabel.preset", "ols", "--adalabel.alpha", "0.3", "--ckpt_path", str(checkpoint)]) == 0


def test_cifar100_recipe_with_mixup_and_cutmix_feeds_probabilities_to_alr(data_root, tmp_path, caplog):
    cli = run([
        "fit", *cifar_args("cifar100", data_root, tmp_path), "--model.mixup_alpha", "0.2", "--model.cutmix_alpha", "1.0",
        "--adalabel.refresh_every_n_steps", "1", "--trainer.callbacks+=tests.examples.test_recipes.RecordTrainTargets",
    ])
    values = metrics(cli)
    assert_trained_and_evaluated(values)
    (recorder,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, RecordTrainTargets)]
    assert len(recorder.targets) == 2
    for target in recorder.targets:  # B x K probabilities reached training_step, i.e. self.adalabel_loss
        assert target.shape == (4, 100) and target.is_floating_point()
        torch.testing.assert_close(target.sum(dim=1), torch.ones(4))
    assert adalabel_callback(cli.trainer).label_matrix.num_refreshes == 2  # refreshed after each of the 2 steps
    # The batches carry the samples' indices, but a mixed sample has no label to measure a margin for: none are kept.
    assert all(index.shape == (4,) for index in recorder.indices)
    assert adalabel_callback(cli.trainer).training_margins is None
    assert "MixUp/CutMix mix every training batch, so AdaLabel keeps no training margins" in caplog.text


def test_cifar_missing_data_names_the_download_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--data\.download true"):
        CIFAR10DataModule(root=str(tmp_path)).setup("fit")


def test_cifar_files_that_fail_the_md5_check_name_the_integrity_flag(tmp_path):
    write_cifar100(tmp_path)
    with pytest.raises(ValueError, match=r"cifar-100-python/train is not the file .*--data\.check_integrity false"):
        CIFAR100DataModule(root=str(tmp_path)).setup("fit")
    unchecked = CIFAR100DataModule(root=str(tmp_path), check_integrity=False, val_fraction=0.25)
    unchecked.setup("fit")  # torchvision's own loader reads the pickles
    assert (len(unchecked.train_set), len(unchecked.val_set)) == (12, 4)
    image, label = unchecked.train_set[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and 0 <= label < 100


def test_imagenet_recipe_runs_with_ddp_on_two_cpu_processes(data_root, tmp_path):
    """`strategy: ddp` from the recipe, two CPU processes started by Lightning, bf16 autocast; lr scaled by the
    global batch: 0.1 x (2 per device x 2 devices) / 256."""
    logs = tmp_path / "logs"
    command = [
        sys.executable, "-m", "lightning_adalabel.examples.cli", "fit", *imagenet_args(data_root, tmp_path),
        "--trainer.devices", "2", "--trainer.precision", "bf16-mixed",
        "--model.schedule", "constant", "--model.warmup_epochs", "0",
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(logs),
    ]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "distributed_backend=gloo" in result.stderr + result.stdout and "All distributed processes registered" in (
        result.stderr + result.stdout
    )
    (metrics_file,) = logs.glob("lightning_logs/version_*/metrics.csv")
    with open(metrics_file) as file:
        rows = list(csv.DictReader(file))
    logged = {name for row in rows for name, value in row.items() if value}
    assert {"val/acc", "train/loss", *ALR_SCALARS} <= logged
    learning_rates = [float(row["train/lr"]) for row in rows if row.get("train/lr")]
    assert learning_rates == pytest.approx([0.1 * 2 * 2 / 256] * 2)  # both steps
    checkpoint = torch.load(
        next(tmp_path.glob("**/checkpoints/last.ckpt")), map_location="cpu", weights_only=False
    )
    (state,) = [value for key, value in checkpoint["callbacks"].items() if key.startswith("AdaLabel")]
    assert state["label_matrix"]["matrix"].shape == (3, 3)
    # The margins of the whole training set's 12 images; the two processes' shards (2 steps of 2 each) summed.
    margins = state["training_margins"]
    assert margins["num_samples"] == 12 and margins["count"].sum() == 8 and margins["count"].max() == 1


def test_imagenet_label_issues_set_is_the_training_set_without_augmentation(data_root):
    """The images that `adalabel label-issues` scores: the training folder in the training set's order (its indices
    are the training margins'), through the validation transform (no random crop)."""
    data = ImageNetDataModule(str(data_root / "imagenet" / "train"), str(data_root / "imagenet" / "val"),
                              train_crop_size=32, val_resize_size=36, val_crop_size=32, num_workers=0)
    data.setup("fit")
    scored = data.label_issues_set()
    assert scored.samples == data.train_set.samples
    first, again = scored[5][0], scored[5][0]
    assert first.shape == (3, 32, 32) and torch.equal(first, again)


def test_imagenet_recipe_predict_gives_class_probabilities(data_root, tmp_path):
    cli = run(["predict", *imagenet_args(data_root, tmp_path), "--trainer.limit_predict_batches", "2"])
    predictions = torch.cat(cli.trainer.predict_loop.predictions)
    assert predictions.shape == (4, 3)
    torch.testing.assert_close(predictions.sum(dim=1), torch.ones(4))


def test_mixup_and_cutmix_loss_is_the_mixture_of_the_label_losses():
    """For t = lam * onehot(a) + (1 - lam) * onehot(b): adalabel_loss(z, t) == lam * loss(z, a) + (1 - lam) * loss(z, b),
    for every preset's loss, with a learned (non-uniform) label matrix."""
    torch.manual_seed(0)
    num_classes, batch = 10, 6
    images = torch.randn(batch, 3, 16, 16)
    labels = torch.arange(batch)  # every sample differs from its rolled partner, so lam is readable from t
    for mixing in ({"mixup_alpha": 0.4}, {"cutmix_alpha": 1.0}):
        model = ImageClassifier(num_classes, arch="cifar_resnet18", **mixing)
        mixed_images, target = model.mix_batch(images, labels)
        partner = labels.roll(1)
        lam = target[0, labels[0]]
        expected_target = lam * torch.eye(num_classes)[labels] + (1 - lam) * torch.eye(num_classes)[partner]
        torch.testing.assert_close(target, expected_target)
        assert 0 < lam < 1 and not torch.equal(mixed_images, images)
        for preset in ("alr", "ols", "label_smoothing", "none"):
            callback = AdaLabel(preset=preset)
            trainer = pl.Trainer(callbacks=[callback], accelerator="cpu", logger=False, enable_progress_bar=False)
            callback.setup(trainer, model, "fit")
            logits = torch.randn(batch, num_classes)
            model.adalabel_loss(logits, labels)  # creates the label matrix; now give it learned, non-uniform rows
            rows = torch.rand(num_classes, num_classes)
            if not callback.preset.include_diagonal:
                rows.fill_diagonal_(0.0)
            callback.label_matrix.matrix = rows / rows.sum(dim=1, keepdim=True)

            mixed_loss = model.adalabel_loss(logits, target)
            expected = lam * model.adalabel_loss(logits, labels) + (1 - lam) * model.adalabel_loss(logits, partner)
            torch.testing.assert_close(mixed_loss, expected, msg=f"{preset}, {mixing}")


# ---- text ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", sorted(TEXT_DATASETS))
def test_text_recipe_fit_and_test(recipe, data_root, tmp_path):
    args = text_args(recipe, data_root, tmp_path)
    cli = run(["fit", *args])
    assert_trained_and_evaluated(metrics(cli))
    _, num_classes, _ = TEXT_DATASETS[recipe]
    assert cli.model.classifier.out_features == num_classes
    assert adalabel_callback(cli.trainer).label_matrix.num_classes == num_classes
    tested = run(["test", *args])
    assert 0.0 <= metrics(tested)["test/acc"] <= 1.0


def test_text_recipe_predict_from_checkpoint(data_root, tmp_path):
    args = text_args("agnews", data_root, tmp_path)
    run(["fit", *args])
    checkpoint = next(tmp_path.glob("lightning_logs/version_*/checkpoints/last.ckpt"))
    cli = run(["predict", *args, "--ckpt_path", str(checkpoint)])
    predictions = torch.cat(cli.trainer.predict_loop.predictions)
    assert predictions.shape == (8, 4)


def test_csv_reader_handles_quotes_commas_and_escaped_newlines(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text('"3","Title, with comma","He said ""hi""\\nbye"\n"1","a title",""\n', encoding="utf-8")
    texts, labels = read_labeled_csv(str(path), num_classes=4)
    assert labels == [2, 0]
    assert texts == ['Title, with comma He said "hi" bye', "a title "]
    with pytest.raises(ValueError, match="outside 1..2"):
        read_labeled_csv(str(path), num_classes=2)


def test_hashing_tokenizer_ids_are_crc32_buckets_of_words_and_bigrams():
    """CRC-32, not Python's per-process salted ``hash``: every loader worker and every rank gets the same ids."""
    num_buckets = 1 << 16
    ids = HashingTokenizer(num_buckets=num_buckets, ngrams=2)("The quick brown fox, the QUICK dog!")
    words = ["the", "quick", "brown", "fox", "the", "quick", "dog"]
    word_hashes = [zlib.crc32(word.encode()) for word in words]
    bigrams = [(a * NGRAM_HASH_MULTIPLIER + b) % num_buckets for a, b in zip(word_hashes, word_hashes[1:])]
    assert ids.tolist() == [h % num_buckets for h in word_hashes] + bigrams
    assert HashingTokenizer(num_buckets=8, ngrams=3, max_words=2)("a b c d").shape == (2 + 1,)  # no trigram of 2 words


def test_text_data_and_model_sizes_must_agree(data_root, tmp_path):
    cli_args = text_args("agnews", data_root, tmp_path)
    with pytest.raises(ValueError, match="num_buckets"):
        run(["fit", *cli_args, "--model.num_buckets", "2048"])
    with pytest.raises(ValueError, match="--model.num_classes 4"):
        run(["fit", *cli_args, "--model.num_classes", "5"])


def test_text_missing_files_name_the_root_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--data\.root"):
        TextClassificationDataModule(root=str(tmp_path), num_classes=4).setup("fit")
