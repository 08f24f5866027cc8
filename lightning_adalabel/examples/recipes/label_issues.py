"""``adalabel label-issues --config <recipe> --ckpt_path <checkpoint>``: the training samples whose labels are
probably wrong, as a CSV file sorted most suspect first.

The recipe's model is loaded from the checkpoint (with the AdaLabel state saved in it: the label matrix, which weights
the suggested labels, and the training margins) and :func:`lightning_adalabel.find_label_issues` scores every
training sample, unshuffled, through the recipe's Trainer (``--trainer.*``: devices, precision). One row per sample:
``index`` (its row in the data set's training file or folder: ``train.csv``'s row, the CIFAR training image),
``given`` and ``suggested`` (0-based classes, as ``adalabel predict`` writes them), ``score`` (the model's probability
of the given label), ``margin`` (the sample's logit margin averaged over the training run, which ``adalabel fit``
keeps since the recipes' training batches carry the samples' indices) and ``is_issue`` (1 where the cut-off flags it).
The rows are sorted by ``margin``, or by ``score`` for a checkpoint without training margins (written before they
existed, or by a run whose batches were all MixUp/CutMix-mixed, or a token classifier's), which has no ``margin``
column. Options of its own: ``--output`` (default ``label_issues.csv``), ``--cut_off`` (``margin``, the default where
the checkpoint has the training margins: a negative average margin; ``misclassified``, the default otherwise;
``cleanlab`` or ``none``) and ``--only_issues`` (write the flagged rows only).
"""

import os
from typing import Any, Dict, List, Optional, Tuple

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import Dataset, Subset

from lightning_adalabel import AdaLabel, find_label_issues
from lightning_adalabel.examples.recipes.resume import load_checkpoint
from lightning_adalabel.label_issues import CUT_OFFS
from lightning_adalabel.state_versions import read_callback_state

# --cut_off "": find_label_issues' default, "margin" where the checkpoint has training margins, else "misclassified".
OWN_OPTIONS = {"--output": "label_issues.csv", "--cut_off": "", "--only_issues": "false"}


def split_arguments(args: List[str]) -> Tuple[Dict[str, str], List[str]]:
    """This command's own options (and ``--ckpt_path``), and the rest for LightningCLI.

    Example:
        >>> own, rest = split_arguments(["--config", "agnews", "--ckpt_path=a.ckpt", "--output", "x.csv"])
        >>> own["--ckpt_path"], own["--output"], own["--cut_off"], rest
        ('a.ckpt', 'x.csv', '', ['--config', 'agnews'])
    """
    own = dict(OWN_OPTIONS, **{"--ckpt_path": ""})
    rest: List[str] = []
    tokens = iter(args)
    for token in tokens:
        name, equals, value = token.partition("=")
        if name not in own:
            rest.append(token)
            continue
        if not equals:
            value = next(tokens, "")
            if not value or value.startswith("--"):
                raise ValueError(f"adalabel label-issues: {name} needs a value.")
        own[name] = value
    return own, rest


def source_rows(dataset: Dataset) -> Any:
    """Where each sample of ``dataset`` sits in the data set it was split from (a hold-out split is a ``Subset``)."""
    rows = None
    while isinstance(dataset, Subset):
        rows = [dataset.indices[row] for row in rows] if rows is not None else list(dataset.indices)
        dataset = dataset.dataset
    return rows


def main(args: List[str]) -> int:
    own, rest = split_arguments(args)
    if not own["--ckpt_path"]:
        raise ValueError(
            "adalabel label-issues needs the trained model: --ckpt_path <checkpoint written by `adalabel fit`>."
        )
    if not os.path.isfile(own["--ckpt_path"]):
        raise FileNotFoundError(f"--ckpt_path {own['--ckpt_path']}: no such file. Pass a checkpoint of `adalabel fit`.")
    if own["--cut_off"] and own["--cut_off"] not in CUT_OFFS:
        raise ValueError(f"invalid value {own['--cut_off']!r} for --cut_off; choose one of: {', '.join(CUT_OFFS)}")
    only_issues = own["--only_issues"].lower() in ("true", "1", "yes")
    from lightning_adalabel.examples.recipes.lightning_cli import build

    cli = build(rest)
    data = cli.datamodule
    label_issues_set = getattr(data, "label_issues_set", None)
    if not callable(label_issues_set):
        raise ValueError(
            f"adalabel label-issues scores the training set of a recipe's data module; {type(data).__name__} has no"
            " label_issues_set(). Use a shipped recipe, or call lightning_adalabel.find_label_issues in Python."
        )
    data.setup("fit")
    dataset = label_issues_set()
    margins_size = saved_margins_size(cli.trainer, own["--ckpt_path"])
    check_margins(margins_size, own["--cut_off"], len(dataset), own["--ckpt_path"])
    found = find_label_issues(cli.model, data.label_issues_dataloader(), cli.trainer, cut_off=own["--cut_off"] or None,
                              ckpt_path=own["--ckpt_path"])
    rows = source_rows(dataset)
    if rows is not None:  # the row in the training file, not in the split that was trained on
        found.index = found.index.new_tensor(rows)[found.index]
    if cli.trainer.global_rank == 0:
        written = found.to_csv(own["--output"], only_issues=only_issues)
        rank_zero_info(
            f"adalabel: {int(found.is_issue.sum())} of {len(found)} training samples flagged ({found.cut_off}"
            f" cut-off); wrote {written} rows, most suspect first (by {found.ranked_by}), to {own['--output']}"
        )
    return 0


def saved_margins_size(trainer: pl.Trainer, ckpt_path: str) -> Optional[int]:
    """How many training samples the checkpoint's AdaLabel state holds margins for; ``None`` without margins (or
    without an AdaLabel state, which the pass then refuses). Read without the weights (``mmap``), before the pass, so
    that a mismatch is told in the command's terms."""
    callback = next((each for each in trainer.callbacks if isinstance(each, AdaLabel)), None)
    checkpoint = load_checkpoint(ckpt_path, weights_only=False)
    state = checkpoint.get("callbacks", {}).get(callback.state_key) if callback is not None else None
    margins = read_callback_state(state)["training_margins"] if isinstance(state, dict) else None
    return margins.get("num_samples") if isinstance(margins, dict) else None


def check_margins(margins_size: Optional[int], cut_off: str, num_samples: int, ckpt_path: str) -> None:
    """Refuse ``--cut_off margin`` for a checkpoint without training margins, and margins of another training set."""
    if margins_size is None and cut_off == "margin":
        raise ValueError(
            f"--cut_off margin needs the training margins, and {ckpt_path} has none (written before `adalabel fit`"
            " kept them, or by a run whose training batches were all MixUp/CutMix-mixed, or a token classifier's):"
            " leave --cut_off out (misclassified) or train again with `adalabel fit`."
        )
    if margins_size is not None and margins_size != num_samples:
        raise ValueError(
            f"{ckpt_path} was trained on {margins_size} training samples, but the recipe's training set has"
            f" {num_samples} now: give `adalabel label-issues` the same --data options as `adalabel fit` (root,"
            " val_fraction, seed), so that each training margin is that of the same sample."
        )
