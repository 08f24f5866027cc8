"""`adalabel` mistakes are told in one line on stderr, with a non-zero exit status and no traceback; the library
itself never imports the examples."""

import subprocess
import sys
from pathlib import Path

import pytest

from lightning_adalabel import PRESETS
from lightning_adalabel.examples.cli import main

# A text recipe with a tiny hashing space: the model is built in milliseconds, and nothing trains.
AGNEWS = ["--config", "agnews", "--model.num_buckets", "64", "--data.num_buckets", "64"]


def error_line(capsys) -> str:
    """The one line that `main` printed on stderr (Lightning's own log lines go to its handler, not sys.stderr)."""
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.out + captured.err
    assert lines[0].startswith("adalabel: error: ")
    return lines[0]


def test_library_never_imports_the_examples():
    code = (
        "import sys, lightning_adalabel; "
        "print(sorted(m for m in sys.modules if m.startswith(('lightning_adalabel.examples', 'jsonargparse'))))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_unknown_command_suggests_the_closest(capsys):
    assert main(["fti", "--config", "cifar10"]) == 2
    assert error_line(capsys) == "adalabel: error: unknown command 'fti'; did you mean 'fit'? (see `adalabel --help`)"


def test_unknown_recipe_suggests_the_closest(capsys):
    assert main(["fit", "--config", "cifar11"]) == 1
    line = error_line(capsys)
    assert "'cifar11' is neither a config file nor a shipped recipe; did you mean 'cifar10'?" in line


def test_option_typo_suggests_the_closest_option(capsys):
    assert main(["fit", *AGNEWS, "--adalabel.alhpa", "0.3"]) == 2
    assert error_line(capsys) == "adalabel: error: unknown option --adalabel.alhpa; did you mean --adalabel.alpha?"


def test_typo_in_a_class_path_group_suggests_the_closest_init_argument(capsys):
    assert main(["fit", *AGNEWS, "--model.lrr", "0.1"]) == 2
    assert error_line(capsys) == (
        "adalabel: error: unknown option --model.lrr for FastTextClassifier; did you mean --model.lr?"
    )


def test_value_of_the_wrong_type_names_the_option(capsys):
    assert main(["fit", *AGNEWS, "--adalabel.alpha", "lots"]) == 2
    assert error_line(capsys) == "adalabel: error: invalid value 'lots' for --adalabel.alpha: expected float or null"


def test_unknown_preset_is_rejected_while_parsing_and_lists_the_choices(capsys):
    """`AdaLabel(preset: Literal[...])` lets jsonargparse reject it before anything is built."""
    assert main(["fit", *AGNEWS, "--adalabel.preset", "alrr"]) == 2
    assert error_line(capsys) == (
        "adalabel: error: invalid value 'alrr' for --adalabel.preset; choose one of: " + ", ".join(PRESETS)
    )


def test_missing_data_folder_is_one_line_before_the_trainer_starts(capsys, tmp_path):
    missing = tmp_path / "ag_news_csv"
    assert main(["fit", *AGNEWS, "--data.root", str(missing)]) == 1
    line = error_line(capsys)
    assert f"{missing / 'train.csv'} does not exist" in line and "--data.root" in line


def test_traceback_flag_shows_the_full_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.csv does not exist"):
        main(["fit", *AGNEWS, "--data.root", str(tmp_path / "missing"), "--traceback"])


def test_missing_jsonargparse_names_the_extra(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "jsonargparse", None)  # `import jsonargparse` now fails as if not installed
    assert main(["fit", "--config", "cifar10"]) == 1
    assert error_line(capsys) == (
        "adalabel: error: `adalabel fit` runs LightningCLI recipes, which need jsonargparse:"
        ' pip install "lightning-adalabel[recipes]"'
    )


def test_console_command_prints_no_traceback(tmp_path):
    """The same through a real process: exit status 1, the message as the last line of stderr, no traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "lightning_adalabel.examples.cli", "fit", *AGNEWS, "--data.root", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"adalabel: error: {Path(tmp_path) / 'train.csv'} does not exist. Point `--data.root` at the data set's folder,"
        " which must hold train.csv and test.csv (see the text-classification layout in docs/recipes.md)."
    )


BLOCK_TORCHVISION = """
import sys
from lightning_adalabel.examples.cli import main  # Lightning and torchmetrics first: they may use torchvision

class NoTorchvision:  # `import torchvision` now fails as it does where torchvision is not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torchvision":
            raise ModuleNotFoundError("No module named 'torchvision'", name="torchvision")

for name in [name for name in sys.modules if name.split(".")[0] == "torchvision"]:
    del sys.modules[name]
sys.meta_path.insert(0, NoTorchvision())
sys.exit(main(["fit", "--config", "cifar10"]))
"""


def test_missing_torchvision_names_the_extra(tmp_path):
    code = BLOCK_TORCHVISION
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        "adalabel: error: cannot use lightning_adalabel.examples.recipes.vision.ImageClassifier for --model:"
        """ No module named 'torchvision' (pip install "lightning-adalabel[recipes]")"""
    ]


def test_missing_model_says_to_pass_a_recipe(capsys):
    assert main(["fit"]) == 2
    assert error_line(capsys) == (
        "adalabel: error: the following arguments are required: fit.model; pass --config <recipe name or YAML file>"
        " (list the recipes with `adalabel recipes`)"
    )
