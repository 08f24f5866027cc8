"""``AdaLabelCLI``: LightningCLI with the AdaLabel callback as its own argument group (``--adalabel.*``)."""

import sys
import warnings
from typing import Any, List, Optional

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_adalabel import AdaLabel
from lightning_adalabel.examples.recipes import resolve_config_args


class AdaLabelCLI(LightningCLI):
    """LightningCLI for any ``AdaLabelMixin`` LightningModule and data module (given by ``class_path``), with the
    :class:`~lightning_adalabel.AdaLabel` callback always attached and configured by ``--adalabel.*`` (or the
    ``adalabel:`` section of a YAML file): ``--adalabel.preset ols --adalabel.alpha 0.3``.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # A callback added here is instantiated from its own group and appended to the Trainer's callbacks.
        parser.add_lightning_class_args(AdaLabel, "adalabel")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        # `adalabel` always passes its arguments (with recipe names resolved to paths) explicitly, so LightningCLI's
        # warning about `args` and `sys.argv` both being set would fire on every run for no reason.
        if isinstance(args, (dict, Namespace)):
            self.config = parser.parse_object(args)
        else:
            self.config = parser.parse_args(args)


def run(argv: Optional[List[str]] = None) -> AdaLabelCLI:
    """Run ``fit``/``validate``/``test``/``predict`` as ``adalabel <subcommand> ...`` does; return the CLI object
    (its ``trainer``, ``model`` and ``datamodule`` are the ones that ran).

    ``--config`` accepts a shipped recipe's name (``cifar10``) as well as a path.
    """
    args = resolve_config_args(sys.argv[1:] if argv is None else argv)
    with warnings.catch_warnings():
        # The image recipes' ImageClassifier mixes batches (MixUp/CutMix) in its own on_after_batch_transfer on
        # purpose: the mixing belongs to the model's training, not to the data. Lightning would warn about it on
        # every run with a data module; the filter holds for this run only and leaves the caller's filters alone.
        warnings.filterwarnings(
            "ignore", message=r".*overridden `on_after_batch_transfer` in `LightningModule` but have passed"
        )
        return AdaLabelCLI(
            args=args,
            save_config_kwargs={"overwrite": True},  # re-running a recipe into the same folder is the common case
        )
