"""``AdaLabelCLI``: LightningCLI with the AdaLabel callback as its own argument group (``--adalabel.*``)."""

import difflib
import importlib
import inspect
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

import lightning.pytorch as pl
import yaml
from jsonargparse import ArgumentError, ArgumentParser, Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from lightning_adalabel import AdaLabel
from lightning_adalabel.examples.recipes import resolve_config_args
from lightning_adalabel.examples.recipes.predictions import PredictionWriter
from lightning_adalabel.examples.recipes.resume import (
    SavedSettings,
    check_same_model_class,
    find_newest_checkpoint,
    model_input_settings,
    options_on_command_line,
    read_saved_settings,
    refuse_changed_settings,
    show,
)


class CommandLineError(ValueError):
    """A mistake in the command line (unknown option, value of the wrong type), as one readable line."""

    exit_status = 2  # argparse's status for usage errors


class AdaLabelCLI(LightningCLI):
    """LightningCLI for any ``AdaLabelMixin`` LightningModule and data module (given by ``class_path``), with the
    :class:`~lightning_adalabel.AdaLabel` callback always attached and configured by ``--adalabel.*`` (or the
    ``adalabel:`` section of a YAML file): ``--adalabel.preset ols --adalabel.alpha 0.3``.

    A command-line mistake raises :class:`CommandLineError` with one line (``unknown option --adalabel.alhpa; did
    you mean --adalabel.alpha?``) instead of printing jsonargparse's usage screen and exiting.

    ``--ckpt_path`` (see :mod:`~lightning_adalabel.examples.recipes.resume`): ``last`` is the newest ``last.ckpt`` or
    ``hpc_ckpt_*.ckpt`` under ``--trainer.default_root_dir`` (``fit`` starts from scratch when there is none yet, and
    continues in the checkpoint's log folder); the model's hyperparameters come from the checkpoint, and a
    ``--model.*`` value or a data setting the model depends on that differs from the checkpoint's is refused.
    ``predict`` writes its probabilities with :class:`PredictionWriter` (``--predictions.*``).
    """

    _command_line: List[str] = []
    _resumed_checkpoint_dir: Optional[str] = None  # the checkpoint folder of the run that `--ckpt_path last` continues

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # A callback in callback_keys is instantiated from its own group and appended to the Trainer's callbacks.
        # Lightning's add_lightning_class_args would add it with sub_configs=True, with which jsonargparse reads an
        # existing file given to an argument such as --adalabel.initial_matrix q.csv and passes its content instead
        # of its path; a whole group from a file (--adalabel adalabel.yaml) works either way.
        parser.callback_keys.append("adalabel")
        parser.add_class_arguments(AdaLabel, "adalabel", fail_untyped=False, instantiate=True, sub_configs=False)

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "predict":  # `adalabel predict` writes what it computes (--predictions.output, .top_k)
            parser.add_lightning_class_args(PredictionWriter, "predictions")
        return parser

    def _parse_ckpt_path(self) -> None:
        # LightningCLI would load the whole checkpoint here and let its hyperparameters override the command line
        # without a word; before_instantiate_classes does it with the checks of recipes.resume instead.
        pass

    def before_instantiate_classes(self) -> None:
        subcommand = self.config.get("subcommand")
        if subcommand is not None:
            self._start_from_checkpoint(subcommand)

    def _start_from_checkpoint(self, subcommand: str) -> None:
        config = self.config[subcommand]
        resumes_last = config.get("ckpt_path") == "last"
        if resumes_last:
            config.ckpt_path = self._find_last_checkpoint(subcommand, config)
        path = config.get("ckpt_path")
        if not path or not os.path.isfile(path):  # none, or Lightning's "best"/"hpc", resolved by the Trainer
            return
        saved = read_saved_settings(path)
        if resumes_last and subcommand == "fit":
            self._resumed_checkpoint_dir = saved.checkpoint_dir
        check_same_model_class(saved, config.get("model.class_path"), config.get("data.class_path"))
        model_args = config.get("model.init_args") or Namespace()
        data_args = config.get("data.init_args") or Namespace()
        data_settings = [name for name in model_input_settings(config.get("data.class_path")) if name in data_args]
        refuse_changed_settings(
            saved,
            given_model={name: model_args.get(name) for name in options_on_command_line(self._command_line, "model")},
            given_data={name: data_args.get(name) for name in data_settings},
            data_sources={name: "the command line" for name in options_on_command_line(self._command_line, "data")},
        )
        self._take_model_hyperparameters(subcommand, saved, model_args)

    def _take_model_hyperparameters(self, subcommand: str, saved: SavedSettings, model_args: Namespace) -> None:
        """The model is built from the checkpoint's hyperparameters, as LightningCLI does; the values of the YAML
        that they replace are told, not dropped silently."""
        if not saved.model:
            return
        model: Dict[str, Any] = dict(saved.model)
        if saved.model_class:
            model = {"class_path": saved.model_class, "dict_kwargs": model}
        replaced = [
            f"{name} {show(value)} (the configuration says {show(model_args.get(name))})"
            for name, value in saved.model.items() if name in model_args and model_args.get(name) != value
        ]
        self.config = self.parser.parse_object({subcommand: {"model": model}}, self.config)
        if replaced:
            rank_zero_info(f"adalabel: the model's hyperparameters come from {saved.path}: {', '.join(replaced)}")

    def _find_last_checkpoint(self, subcommand: str, config: Namespace) -> Optional[str]:
        """``--ckpt_path last``: the newest checkpoint of the run in ``--trainer.default_root_dir`` (see
        :func:`~lightning_adalabel.examples.recipes.resume.find_newest_checkpoint`)."""
        root = config.get("trainer.default_root_dir") or os.getcwd()
        callbacks = config.get("trainer.callbacks") or []
        own_dirs = [getattr(cb.get("init_args"), "dirpath", None) for cb in callbacks if isinstance(cb, Namespace)]
        path = find_newest_checkpoint(root, [folder for folder in own_dirs if folder])
        where = f"under {os.path.abspath(root)} (last.ckpt of its runs, or hpc_ckpt_*.ckpt)"
        if path is None and subcommand != "fit":
            raise FileNotFoundError(
                f"--ckpt_path last found no checkpoint {where}. Pass the --trainer.default_root_dir of the training"
                " run, or the path of a .ckpt file."
            )
        if path is None:
            rank_zero_info(f"adalabel: --ckpt_path last: no checkpoint {where} yet; training starts from the beginning")
            return None
        rank_zero_info(f"adalabel: --ckpt_path last: {path}, the newest checkpoint {where}")
        return path

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        # Check the data folders before the Trainer prints its device banner, so that a wrong --data.root is told in
        # one line (the recipes' data modules define check_data_exists; any other data module is left alone).
        check_data_exists = getattr(self.datamodule, "check_data_exists", None)
        if callable(check_data_exists) and self.subcommand is not None:
            check_data_exists(self.subcommand)
        trainer = super().instantiate_trainer(**kwargs)
        if self._resumed_checkpoint_dir:
            continue_in_log_folder(trainer, self._resumed_checkpoint_dir)
        return trainer

    def after_fit(self) -> None:
        trainer = self.trainer
        if trainer.fit_loop.max_batches == 0 and trainer.limit_train_batches != 0 and not trainer.interrupted:
            raise ValueError(no_training_batch(trainer, self.datamodule))

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as error:
            # jsonargparse wraps what a class's __init__ raises (an unknown --model.arch, a missing optional
            # dependency) in its own multi-line ValueErrors; raise the original, which says what to change.
            raise error_behind_jsonargparse(error)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        # `adalabel` always passes its arguments (with recipe names resolved to paths) explicitly, so LightningCLI's
        # warning about `args` and `sys.argv` both being set would fire on every run for no reason.
        # With exit_on_error off, jsonargparse raises ArgumentError instead of printing its usage screen and
        # exiting, so that the error can be told in one line (--help and --print_config still print and exit).
        parsers = [parser, *getattr(self, "_subcommand_parsers", {}).values()]
        for each in parsers:
            each.exit_on_error = False
        self._command_line = [str(arg) for arg in args] if isinstance(args, (list, tuple)) else []
        try:
            if isinstance(args, (dict, Namespace)):
                self.config = parser.parse_object(args)
            else:
                self.config = parser.parse_args(args)
        except ArgumentError as error:
            subcommand = next((arg for arg in (args or []) if arg in self.subcommands()), None)
            subparser = getattr(self, "_subcommand_parsers", {}).get(subcommand, parser)
            raise CommandLineError(explain_parse_error(str(error), option_strings(subparser))) from error
        finally:
            for each in parsers:
                each.exit_on_error = True


def recipe_options_help(args: List[str]) -> str:
    """The ``--model.*`` and ``--data.*`` options of the classes that the ``--config`` files in ``args`` name, with
    the files' values as their defaults, as ``--help`` shows options; without a ``--config``, where to find them.

    Example:
        >>> "`adalabel validate --config <recipe> --help`" in recipe_options_help(["validate", "--help"])
        True
    """
    configs = [arg.split("=", 1)[1] if arg.startswith("--config=") else following
               for arg, following in zip(args, args[1:] + [""])
               if arg in ("--config", "-c") or arg.startswith("--config=")]
    subcommand = next((arg for arg in args if not arg.startswith("-")), "fit")
    if not configs:
        return (f"\nThe recipe's own options, --model.* and --data.*, are listed by `adalabel {subcommand} --config"
                " <recipe> --help` (the recipes: `adalabel recipes`).")
    parser = ArgumentParser(prog=f"adalabel {subcommand}", add_help=False)
    names = []
    for key in ("model", "data"):
        section = merged_section(configs, key)
        if not section.get("class_path"):
            continue
        module_name, _, class_name = section["class_path"].rpartition(".")
        parser.add_class_arguments(getattr(importlib.import_module(module_name), class_name), key, fail_untyped=False)
        parser.set_defaults({f"{key}.{name}": value for name, value in section.get("init_args", {}).items()})
        names.append(class_name)
    options = parser.format_help().split("\n\n", 1)[-1]  # without the usage lines, which repeat the options
    return (f"\nThe recipe's model and data ({', '.join(names)}), with the values of {', '.join(configs)} as"
            f" defaults:\n\n{options}")


def merged_section(configs: List[str], key: str) -> Dict[str, Any]:
    """The ``model:`` or ``data:`` section of the YAML files ``configs``, each later file overriding the earlier
    ones as ``--config`` does: ``{"class_path": ..., "init_args": {...}}``."""
    section: Dict[str, Any] = {"init_args": {}}
    for path in configs:
        with open(path, encoding="utf-8") as file:
            value = (yaml.safe_load(file) or {}).get(key) or {}
        if value.get("class_path") not in (None, section.get("class_path")):
            section = {"init_args": {}}
        section["class_path"] = value.get("class_path", section.get("class_path"))
        section["init_args"].update(value.get("init_args") or {})
    return section


def continue_in_log_folder(trainer: "pl.Trainer", checkpoint_dir: str) -> None:
    """Log and checkpoint into the folder of the run whose checkpoint ``--ckpt_path last`` resumes
    (``<save_dir>/lightning_logs/version_3/checkpoints`` -> the logger's version 3) rather than a new version: the
    ModelCheckpoint then keeps tracking its best file, and the next requeue finds the same folder."""
    folder = Path(checkpoint_dir).absolute()
    if folder.name != "checkpoints":
        return
    version = folder.parent.name
    for logger in trainer.loggers:
        root_dir = getattr(logger, "root_dir", None)
        if root_dir and hasattr(logger, "_version") and Path(root_dir).absolute() == folder.parent.parent:
            # TensorBoardLogger and CSVLogger take their version at construction only; it is read lazily.
            logger._version = int(version[len("version_"):]) if re.fullmatch(r"version_\d+", version) else version


def no_training_batch(trainer: "pl.Trainer", datamodule: Any) -> str:
    """Why ``fit`` trained nothing: fewer training samples than one batch, and the incomplete batch dropped."""
    loader = trainer.train_dataloader
    try:
        samples, batch_size = len(loader.sampler), loader.batch_size  # the sampler: this process's share under DDP
    except (AttributeError, TypeError):
        return "No training batch: the training DataLoader is empty, so nothing was trained and no checkpoint written."
    per_process = " per process" if trainer.world_size > 1 else ""
    root = getattr(datamodule, "root", None) or getattr(datamodule, "train_root", None)
    data = f" in {root}" if root else ""
    dropped = ", and the incomplete batch is dropped (drop_last)" if getattr(loader, "drop_last", False) else ""
    return (
        f"No training batch: the training set{data} has {samples} samples{per_process}, fewer than one batch of"
        f" {batch_size}{dropped}, so nothing was trained and no checkpoint written. Pass --data.batch_size"
        f" {max(1, samples)} or less, or give more training data."
    )


def error_behind_jsonargparse(error: BaseException) -> BaseException:
    """The first error in ``error``'s chain (itself, its cause, ...) that jsonargparse did not raise.

    Example:
        >>> error_behind_jsonargparse(ValueError("raised here, not by jsonargparse"))
        ValueError('raised here, not by jsonargparse')
    """
    while raised_in_jsonargparse(error):
        inner = error.__cause__ or error.__context__
        if inner is None:
            break
        error = inner
    return error


def raised_in_jsonargparse(error: BaseException) -> bool:
    traceback, module = error.__traceback__, ""
    while traceback is not None:  # the innermost frame is where the error was raised
        module, traceback = str(traceback.tb_frame.f_globals.get("__name__", "")), traceback.tb_next
    return module.split(".")[0] == "jsonargparse"


def option_strings(parser: Any) -> List[str]:
    """Every ``--option`` the parser knows (``--trainer.max_epochs``, ``--adalabel.alpha``, ...)."""
    return [option for option in getattr(parser, "_option_string_actions", {}) if option.startswith("--")]


def init_arguments(class_path: str) -> List[str]:
    """The ``__init__`` argument names of the class at ``class_path`` and of its bases (which receive ``**kwargs``).

    Example:
        >>> "lr" in init_arguments("lightning_adalabel.examples.recipes.text.FastTextClassifier")
        True
    """
    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        return []
    names: List[str] = []
    for base in getattr(cls, "__mro__", ()):
        for name, parameter in inspect.signature(base.__init__).parameters.items() if "__init__" in vars(base) else ():
            if name != "self" and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                names.append(name)
    return list(dict.fromkeys(names))


def explain_parse_error(message: str, known_options: Iterable[str] = ()) -> str:
    """jsonargparse's (often multi-line) parse error as one line, with the closest option name for a typo.

    Example:
        >>> explain_parse_error("unrecognized arguments: --adalabel.alhpa 0.3", ["--adalabel.alpha", "--adalabel.loss"])
        'unknown option --adalabel.alhpa; did you mean --adalabel.alpha?'
        >>> explain_parse_error('Parser key "adalabel.preset":\\n  Expected a typing.Literal[\\'alr\\', \\'ols\\']. Got value: alrr')
        "invalid value 'alrr' for --adalabel.preset; choose one of: alr, ols"
        >>> explain_parse_error('Parser key "trainer.max_epochs":\\n  Expected a <class \\'int\\'>. Got value: 1.5')
        "invalid value '1.5' for --trainer.max_epochs: expected int"
        >>> explain_parse_error('Parser key "model":\\n  - Problem with given class_path \\'a.B\\':\\n'
        ...                     "      No module named 'torchvision'\\n  Given value: {}")
        "cannot use a.B for --model: No module named 'torchvision'"
    """
    known = list(known_options)
    unrecognized = re.match(r"unrecognized arguments: (.*)", message, re.S)
    if unrecognized:
        unknown = [token.split("=", 1)[0] for token in unrecognized.group(1).split() if token.startswith("-")]
        if not unknown:
            return f"unexpected argument(s): {unrecognized.group(1).strip()}"
        parts = []
        for option in unknown:
            close = difflib.get_close_matches(option, known, n=1, cutoff=0.6)
            parts.append(f"unknown option {option}" + (f"; did you mean {close[0]}?" if close else ""))
        return " ".join(parts)
    key = re.match(r'Parser key "([^"]+)":', message)
    value = re.search(r"(?:Got value|Given value): (.*)$", message, re.M)
    not_accepted = re.search(r"class_path '([\w.]+)':\s*Option '(\w+)' is not accepted", message)
    if key and not_accepted:  # --model.lrr where --model is given by class_path
        class_path, name = not_accepted.groups()
        if class_path in ("lightning.LightningDataModule", "lightning.LightningModule"):  # no recipe chosen yet
            return (
                f"--{key.group(1)}.{name} sets an option of the recipe's {key.group(1)} class, which comes from"
                " --config: pass --config <recipe name or YAML file> before the --model.* and --data.* options (list"
                " the recipes with `adalabel recipes`)"
            )
        close = difflib.get_close_matches(name, init_arguments(class_path), n=1, cutoff=0.6)
        option = f"--{key.group(1)}.{name}"
        hint = f"; did you mean --{key.group(1)}.{close[0]}?" if close else ""
        return f"unknown option {option} for {class_path.rsplit('.', 1)[-1]}{hint}"
    problem = re.search(r"Problem with given class_path '([\w.]+)':\s*(.+)", message)
    if key and problem:  # e.g. the class's module cannot be imported
        return f"cannot use {problem.group(1)} for --{key.group(1)}: {problem.group(2).strip()}"
    if key and value:
        option, got = f"--{key.group(1)}", value.group(1).strip()
        literal = re.search(r"Expected a typing\.Literal\[(.*?)\]", message)
        if literal:
            choices = ", ".join(choice.strip().strip("'\"") for choice in literal.group(1).split(","))
            return f"invalid value {got!r} for {option}; choose one of: {choices}"
        types = [name.replace("NoneType", "null") for name in re.findall(r"Expected a <class '([\w.]+)'>", message)]
        if types:
            return f"invalid value {got!r} for {option}: expected {' or '.join(dict.fromkeys(types))}"
    text = " ".join(line.strip() for line in message.splitlines() if line.strip())
    if text.startswith("the following arguments are required") and ".model" in text:
        text += "; pass --config <recipe name or YAML file> (list the recipes with `adalabel recipes`)"
    return text


def run(argv: Optional[List[str]] = None) -> AdaLabelCLI:
    """Run ``fit``/``validate``/``test``/``predict`` as ``adalabel <subcommand> ...`` does; return the CLI object
    (its ``trainer``, ``model`` and ``datamodule`` are the ones that ran).

    ``--config`` accepts a shipped recipe's name (``cifar10``) as well as a path.
    """
    args = resolve_config_args(sys.argv[1:] if argv is None else argv)
    try:
        return _run(args)
    except SystemExit as done:
        if done.code in (0, None) and any(arg in ("-h", "--help") for arg in args):
            print(recipe_options_help(args))  # jsonargparse lists --model.* and --data.* by class path only
        raise


def build(argv: List[str]) -> AdaLabelCLI:
    """The recipe's model, data module and Trainer (with AdaLabel) from ``argv`` without a subcommand, nothing run:
    what ``adalabel label-issues`` drives itself."""
    return _run(resolve_config_args(argv), run=False)


def _run(args: List[str], run: bool = True) -> AdaLabelCLI:
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
            run=run,
        )
