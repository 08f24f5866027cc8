"""``AdaLabelCLI``: LightningCLI with the AdaLabel callback as its own argument group (``--adalabel.*``)."""

import difflib
import importlib
import inspect
import re
import sys
import warnings
from typing import Any, Iterable, List, Optional

from jsonargparse import ArgumentError, Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_adalabel import AdaLabel
from lightning_adalabel.examples.recipes import resolve_config_args


class CommandLineError(ValueError):
    """A mistake in the command line (unknown option, value of the wrong type), as one readable line."""

    exit_status = 2  # argparse's status for usage errors


class AdaLabelCLI(LightningCLI):
    """LightningCLI for any ``AdaLabelMixin`` LightningModule and data module (given by ``class_path``), with the
    :class:`~lightning_adalabel.AdaLabel` callback always attached and configured by ``--adalabel.*`` (or the
    ``adalabel:`` section of a YAML file): ``--adalabel.preset ols --adalabel.alpha 0.3``.

    A command-line mistake raises :class:`CommandLineError` with one line (``unknown option --adalabel.alhpa; did
    you mean --adalabel.alpha?``) instead of printing jsonargparse's usage screen and exiting.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # A callback added here is instantiated from its own group and appended to the Trainer's callbacks.
        parser.add_lightning_class_args(AdaLabel, "adalabel")

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        # Check the data folders before the Trainer prints its device banner, so that a wrong --data.root is told in
        # one line (the recipes' data modules define check_data_exists; any other data module is left alone).
        check_data_exists = getattr(self.datamodule, "check_data_exists", None)
        if callable(check_data_exists) and self.subcommand is not None:
            check_data_exists(self.subcommand)
        return super().instantiate_trainer(**kwargs)

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
