"""The transformer recipes end to end through `adalabel fit/test --config <recipe>`: sequence classification on the
CSV files of the fastText recipes and named-entity recognition on CoNLL-2003 files, with a tiny randomly initialised
BERT and a WordPiece tokenizer built from the test's own vocabulary, saved with `save_pretrained`. Nothing is
downloaded: the Hugging Face Hub is switched off."""

import random
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from lightning_adalabel.examples.cli import main  # noqa: E402
from lightning_adalabel.examples.recipes import tiny_checkpoint  # noqa: E402
from lightning_adalabel.examples.recipes.lightning_cli import run  # noqa: E402
from lightning_adalabel.examples.recipes.token_classification import (  # noqa: E402
    CONLL2003_TAGS,
    EntityF1,
    align_word_labels,
    entity_chunks,
    iob1_to_iob2,
    read_conll,
)
from tests.examples.test_recipes import (  # noqa: E402
    TEXT_DATASETS,
    adalabel_callback,
    metrics,
    quick_trainer_args,
    write_text_csvs,
)

# Words left out of the test vocabulary, and the pieces they split into: "calls" -> call ##s, "germany" -> german ##y,
# "boycotted" -> boycott ##ed.
SPLIT_WORDS = {"calls", "germany", "boycotted"}
WORD_PIECES = ["call", "##s", "##y", "##ed"]


@pytest.fixture(scope="module", autouse=True)
def hub_offline():
    """No Hub access in this module. torchmetrics imports transformers with Lightning, before this module, and the
    Hub libraries read HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE once, when imported: so set their flags as well."""
    import huggingface_hub
    from huggingface_hub import constants

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TRANSFORMERS_OFFLINE", "1")
        patch.setattr(constants, "HF_HUB_OFFLINE", True)
        if hasattr(transformers.utils.hub, "_is_offline_mode"):  # transformers 4.x keeps its own flag
            patch.setattr(transformers.utils.hub, "_is_offline_mode", True)
        assert huggingface_hub.constants.HF_HUB_OFFLINE and transformers.utils.hub.is_offline_mode()
        yield


# ---- a tiny model and tokenizer, saved as a user's fine-tuning checkpoint would be --------------------------------

# The named-entity lexicon of the generated CoNLL files (types of CoNLL-2003).
ENTITIES = {
    "PER": [["john", "smith"], ["peter"], ["blackburn"]],
    "ORG": [["eu"], ["european", "commission"], ["reuters"]],
    "LOC": [["germany"], ["britain"], ["paris"]],
    "MISC": [["german"], ["british"]],
}
OTHER_WORDS = ["rejects", "calls", "to", "boycott", "boycotted", "lamb", "the", "said", "on", "."]


def tiny_bert_config(vocab_size: int) -> Dict[str, int]:
    return {
        "vocab_size": vocab_size, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 64,
    }


def wordpiece_tokenizer(vocabulary: List[str]):
    """A BERT-style uncased WordPiece tokenizer over ``vocabulary``, built locally as the recipes' offline tiny
    checkpoint builds its own."""
    return tiny_checkpoint.wordpiece_tokenizer(vocabulary, lowercase=True, model_max_length=64)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer BERT encoder (no task head, like bert-base-uncased) and its tokenizer, saved
    with `save_pretrained` into one folder: what `--model.checkpoint` takes."""
    folder = tmp_path_factory.mktemp("tiny_bert")
    data_words = [f"topic{label}word{w}" for label in range(1, 11) for w in range(5)]
    data_words += ["said", "someone", "next", "line", ",", '"', *map(str, range(3))]
    entity_words = [word for names in ENTITIES.values() for name in names for word in name]
    words = [word for word in data_words + entity_words + OTHER_WORDS if word not in SPLIT_WORDS]
    tokenizer = wordpiece_tokenizer(words + WORD_PIECES)
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(**tiny_bert_config(len(tokenizer))))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ---- data in the real on-disk formats ---------------------------------------------------------------------------


def write_conll(path: Path, num_sentences: int, seed: int) -> List[List[str]]:
    """A CoNLL-2003 file: a -DOCSTART- line, then sentences of ``word POS chunk NER`` lines in IOB1 (as the original
    English files: ``I-`` opens an entity, ``B-`` one that directly follows another of its type). Returns each
    sentence's IOB1 tags."""
    rng = random.Random(seed)
    all_tags = []
    with open(path, "w", encoding="utf-8") as file:
        file.write("-DOCSTART- -X- -X- O\n\n")
        for _ in range(num_sentences):
            words, tags = [], []
            previous_type = None
            for _ in range(rng.randint(3, 7)):
                if rng.random() < 0.5:
                    entity_type = rng.choice(sorted(ENTITIES))
                    name = rng.choice(ENTITIES[entity_type])
                    opener = "B" if entity_type == previous_type else "I"  # IOB1
                    words += name
                    tags += [f"{opener}-{entity_type}"] + [f"I-{entity_type}"] * (len(name) - 1)
                    previous_type = entity_type
                else:
                    words.append(rng.choice(OTHER_WORDS))
                    tags.append("O")
                    previous_type = None
            for word, tag in zip(words, tags):
                chunk = "I-NP" if tag != "O" else "O"
                file.write(f"{word.capitalize() if tag != 'O' else word} NNP {chunk} {tag}\n")
            file.write("\n")
            all_tags.append(tags)
    return all_tags


@pytest.fixture(scope="module")
def conll_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("conll2003")
    for name, size, seed in (("train.txt", 24, 0), ("valid.txt", 8, 1), ("test.txt", 8, 2)):
        write_conll(root / name, size, seed)
    return root


@pytest.fixture(scope="module")
def text_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("text")
    for folder, num_classes, num_fields in TEXT_DATASETS.values():
        write_text_csvs(root / folder, num_classes, num_fields)
    return root


# ---- helpers -------------------------------------------------------------------------------------------------------


class RecordTrainBatches(pl.Callback):
    """Keeps the inputs, targets and samples' indices of the training batches as the training step received them."""

    def __init__(self) -> None:
        self.batches: List = []
        self.dropout_active: List[bool] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        inputs, target, index = batch
        self.batches.append(({name: value.cpu() for name, value in inputs.items()}, target.cpu(), index.cpu()))
        self.dropout_active.append(all(module.training for module in pl_module.net.modules()))


def recorder(trainer: pl.Trainer) -> RecordTrainBatches:
    (callback,) = [cb for cb in trainer.callbacks if isinstance(cb, RecordTrainBatches)]
    return callback


def assert_label_matrix_refreshed(trainer: pl.Trainer, num_classes: int) -> torch.Tensor:
    label_matrix = adalabel_callback(trainer).label_matrix
    assert label_matrix.num_classes == num_classes and label_matrix.num_refreshes >= 1
    uniform = torch.full((num_classes, num_classes), 1.0 / (num_classes - 1)).fill_diagonal_(0.0)
    assert not torch.allclose(label_matrix.matrix, uniform), "the refresh left Q at its initial value"
    torch.testing.assert_close(label_matrix.matrix.sum(dim=1), torch.ones(num_classes))
    return label_matrix.matrix


def text_args(recipe: str, text_root: Path, tiny_bert: Path, out: Path) -> List[str]:
    folder, _, _ = TEXT_DATASETS[recipe.removesuffix("_bert")]
    return [
        "--config", recipe, *quick_trainer_args(out), "--data.root", str(text_root / folder),
        "--model.checkpoint", str(tiny_bert), "--data.max_length", "24",
        "--data.batch_size", "4", "--data.num_workers", "0", "--adalabel.refresh_every_n_steps", "1",
    ]


def conll_args(conll_root: Path, tiny_bert: Path, out: Path) -> List[str]:
    return [
        "--config", "conll2003", *quick_trainer_args(out), "--trainer.limit_train_batches", "4",
        "--data.root", str(conll_root), "--model.checkpoint", str(tiny_bert), "--data.max_length", "32",
        "--data.batch_size", "4", "--data.num_workers", "0", "--model.lr", "1e-3",
    ]


# ---- transformer text classification ---------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", ["agnews_bert", "yahoo_bert", "yelp_full_bert"])
def test_bert_text_recipe_fits_a_local_checkpoint(recipe, text_root, tiny_bert, tmp_path):
    cli = run([
        "fit", *text_args(recipe, text_root, tiny_bert, tmp_path),
        "--trainer.callbacks+=tests.examples.test_recipes_transformers.RecordTrainBatches",
    ])
    _, num_classes, _ = TEXT_DATASETS[recipe.removesuffix("_bert")]
    values = metrics(cli)
    assert {"val/acc", "val/loss", "train/loss", "adalabel/entropy"} <= set(values)
    assert isinstance(cli.model.net, transformers.BertForSequenceClassification)
    assert cli.model.net.config.num_labels == num_classes
    assert_label_matrix_refreshed(cli.trainer, num_classes)
    sep_id = cli.datamodule.tokenizer.sep_token_id
    # from_pretrained returns an eval-mode model; the recipe trains it in train mode (dropout on)
    assert recorder(cli.trainer).dropout_active == [True, True]
    for inputs, target, index in recorder(cli.trainer).batches:  # truncated to max_length, [SEP] kept
        assert inputs["input_ids"].shape[0] == 4 and inputs["input_ids"].shape[1] <= 24
        last_tokens = inputs["input_ids"].gather(1, inputs["attention_mask"].sum(dim=1, keepdim=True) - 1)
        assert (last_tokens == sep_id).all()
        assert target.shape == (4,) and int(target.max()) < num_classes
        assert "index" not in inputs  # the sample's, not an input of the model
        assert target.tolist() == [cli.datamodule.train_set.labels[sample] for sample in index.tolist()]
    margins = adalabel_callback(cli.trainer).training_margins  # the samples' indices reached adalabel_loss
    assert margins.num_samples == 24 and margins.count.sum() == 8

    # dynamic padding: a batch is padded to its longest text, not to max_length
    collate = cli.datamodule.collate_fn
    short, longer = (cli.datamodule.train_set.tokenizer(text) for text in ("said someone", "topic1word2 said someone ."))
    inputs, labels = collate([{**short, "labels": 1}, {**longer, "labels": 0}])
    assert inputs["input_ids"].shape == (2, 6) and inputs["attention_mask"].tolist() == [[1] * 4 + [0] * 2, [1] * 6]
    assert labels.tolist() == [1, 0]


def test_bert_text_recipe_optimizer_is_hugging_face_fine_tuning(text_root, tiny_bert, tmp_path):
    """AdamW, weight decay on the weight matrices only (not on biases and LayerNorm), linear warm-up then decay; and
    `adalabel test` evaluates the checkpoint it wrote."""
    args = text_args("agnews_bert", text_root, tiny_bert, tmp_path)
    cli = run(["fit", *args, "--trainer.limit_train_batches", "4", "--model.warmup_epochs", "0.5"])
    optimizer = cli.trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.AdamW)
    decayed, not_decayed = optimizer.param_groups
    assert (decayed["weight_decay"], not_decayed["weight_decay"]) == (0.01, 0.0)
    names = {id(parameter): name for name, parameter in cli.model.named_parameters()}
    assert all(names[id(p)].endswith(("bias", "LayerNorm.weight")) for p in not_decayed["params"])
    assert all(not names[id(p)].endswith(("bias", "LayerNorm.weight")) for p in decayed["params"])
    assert len(decayed["params"]) + len(not_decayed["params"]) == len(names)
    # 4 steps, 2 of them warm-up: lr rises to 2e-5, then decays linearly to 0 after the last step
    assert cli.trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0] == pytest.approx(0.0)
    assert [round(f * 1e5, 3) for f in _learning_rates(cli.trainer)] == [1.0, 2.0, 2.0, 1.0]

    checkpoint = next(tmp_path.glob("lightning_logs/version_*/checkpoints/last.ckpt"))
    tested = run(["test", *args, "--ckpt_path", str(checkpoint)])
    assert 0.0 <= metrics(tested)["test/acc"] <= 1.0


def _learning_rates(trainer: pl.Trainer) -> List[float]:
    """The learning rate of each training step, read back from the scheduler's multiplier."""
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    base_lr = scheduler.base_lrs[0]
    return [base_lr * scheduler.lr_lambdas[0](step) for step in range(trainer.global_step)]


def test_bert_text_recipe_builds_a_random_model_from_a_config(text_root, tiny_bert, tmp_path):
    config = '{"model_type": "bert", "vocab_size": 128, "hidden_size": 16, "num_hidden_layers": 1,' \
             ' "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 32}'
    cli = run([
        "fit", *text_args("agnews_bert", text_root, tiny_bert, tmp_path),
        "--model.checkpoint", "null", "--model.config", config, "--data.tokenizer", str(tiny_bert),
    ])
    assert cli.model.net.config.hidden_size == 16 and cli.model.net.config.num_labels == 4
    assert_label_matrix_refreshed(cli.trainer, 4)


def test_bert_text_recipe_errors_name_the_option(text_root, tiny_bert, tmp_path, capsys):
    args = text_args("agnews_bert", text_root, tiny_bert, tmp_path)
    assert main(["fit", *args, "--data.max_length", "100"]) == 1  # the tiny model has 64 positions
    assert "--data.max_length 64" in capsys.readouterr().err
    for missing in (str(tmp_path / "nowhere"), "someone/a-model-not-in-the-cache"):  # offline: no download
        assert main(["fit", *args, "--model.checkpoint", missing]) == 1
        error = capsys.readouterr().err
        assert error.startswith(f"adalabel: error: cannot load the model '{missing}'") and "save_pretrained" in error
    assert main(["fit", *args, "--model.checkpoint", "null"]) == 1
    assert "--model.config" in capsys.readouterr().err


def test_without_transformers_the_recipes_list_and_fit_names_the_extra(text_root, tmp_path):
    """`adalabel recipes` needs no transformers; `adalabel fit --config agnews_bert` without it says what to install."""
    code = f"""
import sys
import lightning.pytorch  # torchmetrics imports transformers itself when it is installed: let it, then hide it
sys.modules["transformers"] = None  # as if not installed: `import transformers` raises ImportError
from lightning_adalabel.examples.cli import main
assert main(["recipes"]) == 0
sys.exit(main(["fit", "--config", "agnews_bert", "--data.root", {str(text_root / "ag_news_csv")!r}]))
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "agnews_bert" in result.stdout
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("adalabel: error:") and 'pip install "lightning-adalabel[transformers]"' in line


# ---- token classification (CoNLL-2003) -------------------------------------------------------------------------


def naive_aligned_labels(tokenizer, words: List[str], tag_ids: List[int], max_length: int) -> List[int]:
    """The reference alignment, written without `word_ids`: tokenize each word on its own; its first piece gets the
    word's tag, its other pieces -100; -100 on [CLS] and [SEP]; cut to max_length with [SEP] kept."""
    labels = [-100]
    for word, tag in zip(words, tag_ids):
        pieces = tokenizer.tokenize(word)
        labels += [tag] + [-100] * (len(pieces) - 1)
    return labels[: max_length - 1] + [-100]


def test_conll_recipe_trains_tags_and_reports_entity_f1(conll_root, tiny_bert, tmp_path, capsys):
    cli = run(["fit", *conll_args(conll_root, tiny_bert, tmp_path)])
    values = metrics(cli)
    for name in ("val/entity_f1", "val/entity_precision", "val/entity_recall", "val/acc"):
        assert 0.0 <= values[name] <= 1.0, f"{name}: {values.get(name)}; logged: {sorted(values)}"
    assert torch.isfinite(torch.tensor(values["train/loss"]))
    assert isinstance(cli.model.net, transformers.BertForTokenClassification)
    assert cli.model.net.config.id2label[3] == "B-ORG"
    # One label per word: the training batches carry no sample index, and no training margins are kept.
    assert len(next(iter(cli.datamodule.train_dataloader()))) == 2
    assert adalabel_callback(cli.trainer).training_margins is None

    # Q is learned over the 9 tags from every labelled word piece; the model reports its most confused tag pairs
    matrix = assert_label_matrix_refreshed(cli.trainer, len(CONLL2003_TAGS))
    pairs = cli.model.confused_tag_pairs
    assert len(pairs) == 5 and all(a in CONLL2003_TAGS and b in CONLL2003_TAGS and a != b for a, b, _ in pairs)
    assert pairs[0][2] == pytest.approx(float(matrix.clone().fill_diagonal_(0).max()), abs=1e-6)
    assert "most confused tags" in capsys.readouterr().out

    # what the loss saw: padded word-piece labels aligned as the naive reference, -100 elsewhere
    datamodule = cli.datamodule
    tokenizer = datamodule.tokenizer
    val_batch_inputs, val_batch_labels = next(iter(datamodule.val_dataloader()))
    sentences = read_conll(str(conll_root / "valid.txt"))[:4]
    for row, (words, tags) in enumerate(sentences):
        tag_ids = [CONLL2003_TAGS.index(tag) for tag in iob1_to_iob2(tags)]
        expected = naive_aligned_labels(tokenizer, words, tag_ids, max_length=32)
        length = int(val_batch_inputs["attention_mask"][row].sum())
        assert val_batch_labels[row, :length].tolist() == expected
        assert (val_batch_labels[row, length:] == -100).all()  # padding
    assert any(len(tokenizer.tokenize(word)) > 1 for words, _ in sentences for word in words), "no multi-piece word"


def test_conll_recipe_tests_a_checkpoint_with_entity_f1(conll_root, tiny_bert, tmp_path):
    args = conll_args(conll_root, tiny_bert, tmp_path)
    run(["fit", *args, "--trainer.limit_train_batches", "1"])
    checkpoint = next(tmp_path.glob("lightning_logs/version_*/checkpoints/last.ckpt"))
    tested = run(["test", *args, "--ckpt_path", str(checkpoint)])
    assert 0.0 <= metrics(tested)["test/entity_f1"] <= 1.0


def test_read_conll_skips_docstart_and_splits_sentences(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(
        "-DOCSTART- -X- -X- O\n\nEU NNP B-NP I-ORG\nrejects VBZ B-VP O\nGerman JJ B-NP I-MISC\n\n\n"
        "Peter NNP B-NP I-PER\nBlackburn NNP I-NP I-PER\n\n-DOCSTART- -X- -X- O\n\nParis NNP B-NP I-LOC\n",
        encoding="utf-8",
    )
    assert read_conll(str(path)) == [
        (["EU", "rejects", "German"], ["I-ORG", "O", "I-MISC"]),
        (["Peter", "Blackburn"], ["I-PER", "I-PER"]),
        (["Paris"], ["I-LOC"]),
    ]
    assert read_conll(str(path), tag_column=2)[0][1] == ["B-NP", "B-VP", "B-NP"]


def test_word_piece_alignment_matches_the_naive_reference(tiny_bert):
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny_bert))
    words = ["EU", "calls", "Germany", "boycotted", "unknownword", "."]
    tag_ids = [3, 0, 5, 0, 7, 0]
    encoding = tokenizer(words, is_split_into_words=True)
    assert tokenizer.convert_ids_to_tokens(encoding["input_ids"]) == [
        "[CLS]", "eu", "call", "##s", "german", "##y", "boycott", "##ed", "[UNK]", ".", "[SEP]",
    ]
    aligned = align_word_labels(encoding.word_ids(), tag_ids)
    assert aligned == [-100, 3, 0, -100, 5, -100, 0, -100, 7, 0, -100]
    assert aligned == naive_aligned_labels(tokenizer, words, tag_ids, max_length=64)


def test_entity_f1_of_a_hand_computed_example():
    """Gold entities PER(0-1), ORG(3), LOC(5); predicted PER(0-1) (right), ORG(3-4) (wrong span), MISC(5) (wrong
    type) and MISC(7) (an I- after O opens an entity): 1 true positive, 4 predicted, 3 gold -> P 1/4, R 1/3, F1 2/7."""
    tags = CONLL2003_TAGS
    gold = ["B-PER", "I-PER", "O", "B-ORG", "O", "B-LOC", "O", "O"]
    predicted = ["B-PER", "I-PER", "O", "B-ORG", "I-ORG", "B-MISC", "O", "I-MISC"]
    metric = EntityF1(tags)
    # one sentence, with a sub-word piece (-100) inside the first word and special tokens around it
    label_ids = [-100, tags.index(gold[0]), -100] + [tags.index(tag) for tag in gold[1:]] + [-100]
    predicted_ids = [0, tags.index(predicted[0]), 4] + [tags.index(tag) for tag in predicted[1:]] + [0]
    metric.update(torch.tensor([predicted_ids]), torch.tensor([label_ids]))
    scores = metric.compute()
    assert scores == pytest.approx({"precision": 1 / 4, "recall": 1 / 3, "f1": 2 / 7})


def test_entity_chunks_and_f1_agree_with_seqeval():
    """seqeval's default mode (conlleval) on random tag sequences, IOB1, IOB2 and invalid ones mixed."""
    seqeval = pytest.importorskip("seqeval.metrics")
    from seqeval.metrics.sequence_labeling import get_entities

    rng = random.Random(0)
    tag_set = CONLL2003_TAGS + ["E-PER", "S-LOC"]
    gold_sentences, predicted_sentences = [], []
    for _ in range(300):
        length = rng.randint(1, 8)
        gold = [rng.choice(tag_set) for _ in range(length)]
        predicted = [rng.choice(tag_set) if rng.random() < 0.4 else tag for tag in gold]
        assert entity_chunks(gold) == get_entities(gold)
        gold_sentences.append(gold)
        predicted_sentences.append(predicted)
    index = {tag: i for i, tag in enumerate(tag_set)}
    metric = EntityF1(tag_set)
    for gold, predicted in zip(gold_sentences, predicted_sentences):
        metric.update(torch.tensor([[index[t] for t in predicted]]), torch.tensor([[index[t] for t in gold]]))
    scores = metric.compute()
    assert scores["f1"] == pytest.approx(seqeval.f1_score(gold_sentences, predicted_sentences))
    assert scores["precision"] == pytest.approx(seqeval.precision_score(gold_sentences, predicted_sentences))
    assert scores["recall"] == pytest.approx(seqeval.recall_score(gold_sentences, predicted_sentences))


def test_iob1_to_iob2_keeps_the_entities():
    rng = random.Random(1)
    for _ in range(200):  # random B-/I-/O sequences: IOB1, IOB2 and neither
        tags = [rng.choice(CONLL2003_TAGS) for _ in range(rng.randint(1, 8))]
        converted = iob1_to_iob2(tags)
        assert entity_chunks(converted) == entity_chunks(tags)
        assert all(not tag.startswith("I-") or prev[2:] == tag[2:] for prev, tag in zip(["O"] + converted, converted))
