"""The ``adalabel`` command: the embedded digits demo, and LightningCLI recipes (``adalabel fit --config cifar10``).

A mistake on the command line (an unknown command, option or recipe, a wrong value, a missing data folder) is told
in one line, ``adalabel: error: ...``, with exit status 1 or 2 and no traceback. ``--traceback`` (or the environment
variable ``ADALABEL_TRACEBACK=1``) shows the full traceback instead.
"""

import difflib
import os
import sys
from types import TracebackType
from typing import List, Optional

USAGE = """usage: adalabel <command> [options]

commands:
  demo      train a small CNN on scikit-learn's digits with every preset and print the comparison table
  recipes   list the shipped recipes (CIFAR-10/100, ImageNet, AG News, Yahoo! Answers, Yelp Review Full with
            fastText or BERT, CoNLL-2003 named entities)
  fit       train with LightningCLI:  adalabel fit --config <recipe name or YAML> [--adalabel.preset ols ...]
  validate  evaluate on the validation set: adalabel validate --config <recipe> --ckpt_path <checkpoint>
  test      evaluate on the test set:       adalabel test --config <recipe> --ckpt_path <checkpoint>
  predict   write predictions.csv:          adalabel predict --config <recipe> --ckpt_path <checkpoint>
  label-issues  the training samples whose labels are probably wrong, most suspect first, as a CSV file:
            adalabel label-issues --config <recipe> --ckpt_path <checkpoint> [--output label_issues.csv]
            [--cut_off misclassified|cleanlab|none] [--only_issues true]

Resume a preempted or requeued job with the same command plus --trainer.default_root_dir DIR --ckpt_path last.

`adalabel <fit|validate|test|predict> --config <recipe> --help` lists every option: --trainer.*, --adalabel.*,
and the recipe's --model.* and --data.*.
Errors are told in one line; add --traceback (or set ADALABEL_TRACEBACK=1) to see where they came from.
"""

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
COMMANDS = ("demo", "recipes", *LIGHTNING_COMMANDS, "label-issues")
RECIPES_EXTRA = 'pip install "lightning-adalabel[recipes]"'
# Errors that our own code raises to tell the user what to change (a wrong path, value or combination, a missing
# optional dependency).
USER_ERRORS = (FileNotFoundError, ValueError, TypeError, ImportError)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    show_traceback = "--traceback" in argv or os.environ.get("ADALABEL_TRACEBACK", "") not in ("", "0")
    argv = [arg for arg in argv if arg != "--traceback"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, args = argv[0], argv[1:]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"choose one of: {', '.join(COMMANDS)}"
        return fail(f"unknown command {command!r}; {hint} (see `adalabel --help`)", status=2)
    try:
        return run_command(command, args)
    except USER_ERRORS as error:
        if show_traceback or not raised_by_us(error.__traceback__):
            raise
        return fail(one_line(str(error)) or type(error).__name__, status=getattr(error, "exit_status", 1))


def run_command(command: str, args: List[str]) -> int:
    if command == "demo":
        # Imported here: `adalabel recipes` and `adalabel fit` do not pay for the demo's imports, nor the demo for
        # theirs.
        from lightning_adalabel.examples.demo import main as demo_main

        return demo_main(args)
    if command == "recipes":
        from lightning_adalabel.examples.recipes import format_recipe_list

        print(format_recipe_list())
        return 0
    try:
        import jsonargparse  # noqa: F401  (LightningCLI's parser)
    except ImportError:
        return fail(f"`adalabel {command}` runs LightningCLI recipes, which need jsonargparse: {RECIPES_EXTRA}")
    if command == "label-issues":
        from lightning_adalabel.examples.recipes.label_issues import main as label_issues_main

        return label_issues_main(args)
    from lightning_adalabel.examples.recipes.lightning_cli import run

    run([command, *args])
    return 0


def fail(message: str, status: int = 1) -> int:
    print(f"adalabel: error: {message}", file=sys.stderr)
    return status


def raised_by_us(traceback: Optional[TracebackType]) -> bool:
    """Whether the innermost frame of ``traceback`` is in ``lightning_adalabel``: our checks raise errors meant for
    the user; the same exception types raised deep inside torch or Lightning are bugs worth a full traceback."""
    frame = None
    while traceback is not None:
        frame, traceback = traceback.tb_frame, traceback.tb_next
    return frame is not None and str(frame.f_globals.get("__name__", "")).startswith("lightning_adalabel")


def one_line(message: str) -> str:
    """A message on one line, with a hint when it comes from a missing optional dependency.

    Example:
        >>> one_line("Problem with the class:\\n  No module named 'torchvision'")
        'Problem with the class: No module named \\'torchvision\\' (pip install "lightning-adalabel[recipes]")'
    """
    text = " ".join(line.strip() for line in message.splitlines() if line.strip())
    if "No module named 'torchvision'" in text or "No module named 'jsonargparse'" in text:
        text += f" ({RECIPES_EXTRA})"
    return text


if __name__ == "__main__":
    sys.exit(main())
