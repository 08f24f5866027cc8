"""The ``adalabel`` command: the embedded digits demo, and LightningCLI recipes (``adalabel fit --config cifar10``)."""

import sys
from typing import List, Optional

USAGE = """usage: adalabel <command> [options]

commands:
  demo      train a small CNN on scikit-learn's digits with every preset and print the comparison table
  recipes   list the shipped recipes (CIFAR-10/100, ImageNet, AG News, Yahoo! Answers, Yelp Review Full)
  fit       train with LightningCLI:  adalabel fit --config <recipe name or YAML> [--adalabel.preset ols ...]
  validate  evaluate on the validation set: adalabel validate --config <recipe> --ckpt_path <checkpoint>
  test      evaluate on the test set:       adalabel test --config <recipe> --ckpt_path <checkpoint>
  predict   class probabilities:            adalabel predict --config <recipe> --ckpt_path <checkpoint>

`adalabel <fit|validate|test|predict> --help` lists every option (--trainer.*, --model.*, --data.*, --adalabel.*).
"""

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "demo":
        from lightning_adalabel.examples.demo import main as demo_main

        return demo_main(argv[1:])
    if argv and argv[0] == "recipes":
        from lightning_adalabel.examples.recipes import format_recipe_list

        print(format_recipe_list())
        return 0
    if argv and argv[0] in LIGHTNING_COMMANDS:
        # Imported here: `adalabel demo` must not need jsonargparse or torchvision (the recipes extra).
        from lightning_adalabel.examples.recipes.lightning_cli import run

        run(argv)
        return 0
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    print(f"adalabel: unknown command {argv[0]!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
