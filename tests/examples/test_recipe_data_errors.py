"""What the recipes do with the user's own files, through `adalabel fit`: Unicode text is tokenised, rows without a
word are warned about, and a malformed file (CSV, image folder, CIFAR pickles, CoNLL, `--model.config`) or an
unreachable Hub stops the run with one line naming the file, the row or line, the cause and the fix.

Cheap error checks run `main([...])` in-process; one real `adalabel` process per kind of file shows the exit status
and stderr end to end. Nothing reaches the network: the Hub test points HF_ENDPOINT at a closed local port."""

import csv
import io
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest
from PIL import Image

from lightning_adalabel.examples.cli import main
from lightning_adalabel.examples.recipes.text import HashingTokenizer
from tests.examples.test_recipes import quick_trainer_args, write_cifar10, write_image_folder

# Four topics of Russian words, and words that every class shares (among them one with accents).
CYRILLIC_TOPICS = [
    ["кошка", "собака", "лошадь", "корова", "птица"],
    ["футбол", "хоккей", "теннис", "матч", "гол"],
    ["рынок", "банк", "акции", "рубль", "цена"],
    ["выборы", "закон", "министр", "парламент", "суд"],
]
SHARED_WORDS = ["и", "в", "на", "это", "был", "очень", "déjà", "вчера"]
CLOSED_PORT = "http://127.0.0.1:9"  # the discard port: nothing listens on it, a connection is refused at once


# ---- helpers -------------------------------------------------------------------------------------------------------


def adalabel(args: List[str], cwd: Path, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lightning_adalabel.examples.cli", *args],
        cwd=cwd, capture_output=True, text=True, timeout=300, env=env,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *pieces: str) -> str:
    """Exit status 1, no traceback, and the last line of stderr is the error, holding every piece."""
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    line = result.stderr.splitlines()[-1]
    assert line.startswith("adalabel: error: "), line
    for piece in pieces:
        assert piece in line, line
    return line


def cli_error(capsys, args: List[str], *pieces: str) -> str:
    """`main(args)` in this process: exit status 1 and one error line on stderr, holding every piece."""
    status = main(args)
    captured = capsys.readouterr()
    assert status == 1, captured.err[-4000:]
    assert "Traceback" not in captured.err
    line = captured.err.splitlines()[-1]
    assert line.startswith("adalabel: error: "), line
    for piece in pieces:
        assert piece in line, line
    return line


def text_args(root: Path, out: Path) -> List[str]:
    return [
        "--config", "agnews", *quick_trainer_args(out), "--data.root", str(root),
        "--data.num_buckets", "4096", "--model.num_buckets", "4096",
        "--data.batch_size", "4", "--data.num_workers", "0",
    ]


def write_csv(path: Path, rows: List[List[str]], encoding: str = "utf-8") -> None:
    """Rows as Zhang et al. (2015) write them: every field quoted; ``utf-8-sig`` starts with a byte-order mark."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding=encoding) as file:
        csv.writer(file, quoting=csv.QUOTE_ALL).writerows(rows)


def cyrillic_rows(size: int, seed: int) -> List[List[str]]:
    """AG News-like rows (label, title, description) whose class is told by Russian topic words only."""
    rng = random.Random(seed)
    rows = []
    for index in range(size):
        label = index % len(CYRILLIC_TOPICS)
        words = [rng.choice(CYRILLIC_TOPICS[label]) for _ in range(3)] + [rng.choice(SHARED_WORDS) for _ in range(3)]
        rng.shuffle(words)
        rows.append([str(label + 1), " ".join(words).capitalize(), " ".join(reversed(words)).upper()])
    return rows


def valid_rows(size: int = 8) -> List[List[str]]:
    return [[str(index % 4 + 1), f"title {index}", f"description {index}"] for index in range(size)]


def corrupt_jpeg() -> bytes:
    """The first 200 bytes of a JPEG: a file cut short, as an interrupted copy leaves it."""
    buffer = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()[:200]


def imagenet_args(root: Path, out: Path) -> List[str]:
    # One process without the recipe's DDP: a DDP run that fails in this process would leave its MASTER_PORT set in
    # the environment, where a later DDP test's processes would find the port still taken.
    return [
        "--config", "imagenet", *quick_trainer_args(out),
        "--trainer.strategy", "auto", "--trainer.precision", "32-true",
        "--data.train_root", str(root / "train"), "--data.val_root", str(root / "val"),
        "--model.arch", "resnet18", "--model.num_classes", "3", "--data.batch_size", "2", "--data.num_workers", "0",
        "--data.train_crop_size", "32", "--data.val_resize_size", "36", "--data.val_crop_size", "32",
    ]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer BERT and a WordPiece tokenizer saved with `save_pretrained`, as in test_recipes_transformers."""
    helpers = pytest.importorskip("tests.examples.test_recipes_transformers")
    folder = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = helpers.wordpiece_tokenizer(["eu", "rejects", "german", "paris", "title", "description"])
    config = helpers.transformers.BertConfig(**helpers.tiny_bert_config(len(tokenizer)))
    helpers.transformers.BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def hub_offline(monkeypatch):
    """HF_HUB_OFFLINE as huggingface_hub read it at import: no in-process test tries the network."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def conll_args(root: Path, tiny_bert: Path, out: Path) -> List[str]:
    return [
        "--config", "conll2003", *quick_trainer_args(out), "--data.root", str(root),
        "--model.checkpoint", str(tiny_bert), "--data.batch_size", "2", "--data.num_workers", "0",
    ]


CONLL_SENTENCES = "-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\nGerman JJ B-NP B-MISC\n\n"


def write_conll_folder(root: Path, train: bytes) -> Path:
    root.mkdir(parents=True)
    (root / "train.txt").write_bytes(train)
    for name in ("valid.txt", "test.txt"):
        (root / name).write_text(CONLL_SENTENCES, encoding="utf-8")
    return root


# ---- text: Unicode words, rows without words -------------------------------------------------------------------


def test_hashing_tokenizer_reads_the_words_of_every_script():
    words = HashingTokenizer(num_buckets=64).words
    assert words("Déjà VU, l’ﬁn de l'été") == ["déjà", "vu", "l'fin", "de", "l'été"]
    assert words("ПРИВЕТ, мир! Straße ２０２４") == ["привет", "мир", "strasse", "2024"]
    assert words("हिन्दी भाषा, தமிழ்") == ["हिन्दी", "भाषा", "தமிழ்"]  # vowel signs and viramas stay in the word
    assert words("e\u0301te\u0301 :-) ... _") == ["été"]  # combining accents are composed (NFKC)


@pytest.mark.slow
def test_cyrillic_csv_from_excel_learns_through_the_cli(tmp_path):
    """A UTF-8 CSV with a byte-order mark (Excel's "CSV UTF-8"), in Russian: it trains, above chance, with no
    warning. The tokenizer used to keep only [a-z0-9] (zero tokens: chance, 0.25) and the BOM was refused."""
    root, logs = tmp_path / "news", tmp_path / "logs"
    write_csv(root / "train.csv", cyrillic_rows(48, seed=0), encoding="utf-8-sig")
    write_csv(root / "test.csv", cyrillic_rows(16, seed=1), encoding="utf-8-sig")
    result = adalabel([
        "fit", *text_args(root, tmp_path), "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "1.0",
        "--data.batch_size", "8", "--model.lr", "0.05",
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(logs),
    ], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "have no word" not in result.stderr
    (metrics_file,) = logs.glob("lightning_logs/version_*/metrics.csv")
    with open(metrics_file) as file:
        accuracies = [float(row["val/acc"]) for row in csv.DictReader(file) if row.get("val/acc")]
    assert accuracies[-1] >= 0.75, accuracies  # 4 balanced classes: chance is 0.25


def test_rows_without_words_warn_once_with_the_share_and_the_file(tmp_path, recwarn):
    root = tmp_path / "data"
    rows = valid_rows(12) + [[str(index % 4 + 1), "!!!", ":-) ..."] for index in range(12)]  # half without a word
    write_csv(root / "train.csv", rows)
    write_csv(root / "test.csv", valid_rows())
    assert main(["fit", *text_args(root, tmp_path)]) == 0
    messages = [str(warning.message) for warning in recwarn if "have no word" in str(warning.message)]
    assert messages == [f"{root / 'train.csv'}: 12 of 24 rows (50%) have no word (no letter or digit in any script),"
                        " so the model sees nothing of them. Check that the text is in the fields after the label and"
                        " that the file is UTF-8."]


# ---- text: malformed CSV files ----------------------------------------------------------------------------------

CSV_ERRORS = {  # what train.csv holds: the pieces of the one-line error
    "a row with only its label": (
        b'"1","title","description"\n"2"\n', ["train.csv, row 2: a label and no text field", "give the row its text"],
    ),
    "a row with a field more than the first": (
        b'"1","title","description"\n"2","title",unquoted, comma\n',
        ["train.csv, row 2: 4 fields, but row 1 has 3", "quote every field"],
    ),
    "an empty file": (b"", ["train.csv has no rows", "--data.root"]),
    "cp1252 text": (
        '"1","ok","fine"\n"2","café","crème"\n'.encode("cp1252"),
        ["train.csv, line 2: not UTF-8 text (byte 0xe9, the 9th of the line)", "iconv -f cp1252 -t utf-8"],
    ),
}


def test_malformed_csv_files_are_refused_in_one_line(tmp_path, capsys):
    for index, (train_csv, pieces) in enumerate(CSV_ERRORS.values()):
        root = tmp_path / f"case{index}"
        write_csv(root / "test.csv", valid_rows())
        (root / "train.csv").write_bytes(train_csv)
        cli_error(capsys, ["fit", *text_args(root, tmp_path)], str(root), *pieces)


@pytest.mark.slow
def test_non_utf8_csv_exits_1_with_one_line(tmp_path, capsys):
    root = tmp_path / "data"
    write_csv(root / "train.csv", valid_rows(), encoding="cp1252")
    write_csv(root / "test.csv", [["1", "Crème brûlée", "déjà vu"]], encoding="cp1252")
    line = cli_error(capsys, ["test", *text_args(root, tmp_path)])
    assert line == (
        f"adalabel: error: {root / 'test.csv'}, line 1: not UTF-8 text (byte 0xe8, the 8th of the line). Save the"
        " file as UTF-8 (e.g. `iconv -f cp1252 -t utf-8 old.csv > new.csv`)."
    )


# ---- images --------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_corrupt_jpeg_stops_the_run_with_its_path(tmp_path):
    """The bad file is met mid-epoch in a loader worker; the run stops with the file's path in one line."""
    root = write_image_folder(tmp_path / "images", per_class={"train": 3, "val": 1})
    broken = root / "train" / "n01443537" / "n01443537_99.JPEG"  # 3 x 3 + 1 images: 5 full batches of 2
    broken.write_bytes(corrupt_jpeg())
    result = adalabel([
        "fit", *imagenet_args(root, tmp_path), "--trainer.limit_train_batches", "1.0", "--data.num_workers", "2",
    ], cwd=tmp_path)
    line = assert_one_line_error(result)
    assert line.startswith(f"adalabel: error: {broken}: cannot decode the image (OSError: ")
    assert line.endswith("copy it again from the data set's source, or delete it. The run stops here rather than"
                         " train or evaluate on other images than the folders hold.")


def test_class_folders_without_images_are_refused_in_one_line(tmp_path, capsys):
    root = write_image_folder(tmp_path / "images", per_class={"train": 1, "val": 1})
    for split in ("train", "val"):
        (root / split / "n09999999").mkdir()
        (root / split / "n09999999" / "notes.txt").write_text("not an image")
    cli_error(
        capsys, ["fit", *imagenet_args(root, tmp_path), "--model.num_classes", "4"],
        f"{root / 'train' / 'n09999999'} holds no image.", "Every sub-folder of `--data.train_root` is a class",
        "or delete it from both --data.train_root and --data.val_root",
    )
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "val").mkdir()
    cli_error(capsys, ["fit", *imagenet_args(empty, tmp_path)], f"{empty / 'train'} has no class folder.")


@pytest.mark.slow
def test_own_cifar_files_with_the_integrity_check_exit_1_with_one_line(tmp_path, capsys):
    write_cifar10(tmp_path / "data")
    line = cli_error(capsys, [
        "fit", "--config", "cifar10", *quick_trainer_args(tmp_path), "--data.root", str(tmp_path / "data"),
        "--data.num_workers", "0",
    ])
    assert line == (
        f"adalabel: error: {tmp_path / 'data' / 'cifar-10-batches-py' / 'data_batch_1'} is not the file of the official"
        " CIFAR10 release (its MD5 is not c99cafc152244af753f735de768cd75f). If you wrote the files yourself in the"
        " same pickle format, pass `--data.check_integrity false`; otherwise delete the folder and download it again"
        " with `--data.download true`."
    )


# ---- CoNLL files ---------------------------------------------------------------------------------------------------

CONLL_ERRORS = {  # train.txt, extra arguments: the pieces of the one-line error
    "a line without the tag column": (
        CONLL_SENTENCES + "Paris NNP\n\n", ["--data.tag_column", "3"],
        ["train.txt, line 7: 2 columns ('Paris NNP'), so no column `--data.tag_column 3`", "or fix the line"],
    ),
    "a line with a column less": (
        CONLL_SENTENCES + "Paris B-LOC\n\n", [],
        ["train.txt, line 7: 2 columns ('Paris B-LOC'), but line 3 has 4", "a tag is missing"],
    ),
    "latin-1 text": (
        CONLL_SENTENCES.replace("German", "Français"), [],
        ["train.txt, line 5: not UTF-8 text (byte 0xe7, the 5th of the line)", "`--data.encoding`"],
    ),
    "no sentence": ("-DOCSTART- -X- -X- O\n\n", [], ["train.txt has no sentences"]),
}


def test_malformed_conll_files_are_refused_in_one_line(tmp_path, tiny_bert, hub_offline, capsys):
    for index, (train, extra, pieces) in enumerate(CONLL_ERRORS.values()):
        root = write_conll_folder(tmp_path / f"case{index}", train.encode("latin-1"))
        cli_error(capsys, ["fit", *conll_args(root, tiny_bert, tmp_path), *extra], str(root), *pieces)


def test_conll_file_with_a_byte_order_mark_reads_its_first_line(tmp_path, tiny_bert, hub_offline):
    root = write_conll_folder(tmp_path / "conll", ("\ufeff" + CONLL_SENTENCES).encode("utf-8"))
    from lightning_adalabel.examples.recipes.token_classification import read_conll

    assert read_conll(str(root / "train.txt")) == [(["EU", "rejects", "German"], ["B-ORG", "O", "B-MISC"])]


@pytest.mark.slow
def test_conll_line_shorter_than_the_tag_column_exits_1_with_one_line(tmp_path, tiny_bert):
    root = write_conll_folder(tmp_path / "conll", (CONLL_SENTENCES + "Paris NNP\n").encode("utf-8"))
    result = adalabel(
        ["fit", *conll_args(root, tiny_bert, tmp_path), "--data.tag_column", "3"], cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    line = assert_one_line_error(result)
    assert line == (
        f"adalabel: error: {root / 'train.txt'}, line 7: 2 columns ('Paris NNP'), so no column `--data.tag_column 3`."
        " Pick the tags' column (0 is the word, -1 the last) or fix the line."
    )


# ---- Hugging Face models -------------------------------------------------------------------------------------------

MODEL_CONFIG_ERRORS = {  # --model.config: the pieces of the one-line error
    "{model_type: bert, hidden_size: 16": [
        "`--model.config {model_type: bert, hidden_size: 16` is not YAML: expected ',' or '}', but got '<stream end>'"
        " at column 35.", "Write a mapping, e.g. --model.config '{model_type: bert, num_hidden_layers: 4}'",
    ],
    "model_type=bert": ["`--model.config model_type=bert` is not a mapping but a str."],
    "{model_type: bret}": ["model_type 'bret', which transformers does not know; did you mean bert"],
    "{model_type: bert, hidden_size: 30, num_attention_heads: 4}": [
        "`--model.config` does not make a bert model: The hidden size (30) is not a multiple of the number of"
        " attention heads (4). Its keys are the arguments of transformers.BertConfig",
    ],
}


def test_malformed_model_config_is_refused_with_its_reason(tmp_path, tiny_bert, hub_offline, capsys):
    root = tmp_path / "data"
    write_csv(root / "train.csv", valid_rows())
    write_csv(root / "test.csv", valid_rows())
    args = [
        "--config", "agnews_bert", *quick_trainer_args(tmp_path), "--data.root", str(root),
        "--model.checkpoint", "null", "--data.tokenizer", str(tiny_bert),
    ]
    for config, pieces in MODEL_CONFIG_ERRORS.items():
        cli_error(capsys, ["fit", *args, "--model.config", config], *pieces)


@pytest.mark.slow
def test_unreachable_hub_is_told_at_once_without_retries(tmp_path):
    """Without HF_HUB_OFFLINE, a Hub that cannot be reached used to cost five retries (about 20 s, more where
    connections time out) before the error. The Hub is a closed local port here: nothing leaves the machine."""
    pytest.importorskip("transformers")
    root = tmp_path / "data"
    write_csv(root / "train.csv", valid_rows())
    write_csv(root / "test.csv", valid_rows())
    env = {name: value for name, value in os.environ.items() if "proxy" not in name.lower()}
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.pop(name, None)
    env.update(HF_ENDPOINT=CLOSED_PORT, HF_HOME=str(tmp_path / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1")
    result = adalabel([
        "fit", "--config", "agnews_bert", *quick_trainer_args(tmp_path), "--data.root", str(root),
        "--model.checkpoint", "someone/a-model-not-in-the-cache",
    ], cwd=tmp_path, env=env)
    line = assert_one_line_error(result)
    assert "Retrying" not in result.stderr
    assert line == (
        "adalabel: error: cannot load the model 'someone/a-model-not-in-the-cache': it is not in the local Hugging Face"
        " cache, and the Hub cannot be reached (127.0.0.1:9: Connection refused). Run once with network access (the"
        " files are then cached), give a folder written by `save_pretrained`, or set HF_HUB_OFFLINE=1 to read the"
        " cache without trying the network."
    )
