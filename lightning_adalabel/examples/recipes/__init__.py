"""Ready-to-run LightningCLI recipes: YAML files shipped in this folder, run with ``adalabel fit --config <name>``.

This module only knows where the recipes are and what they are called; it imports neither jsonargparse nor
torchvision, so that ``adalabel recipes`` answers without them. The Python code the recipes point to lives in
:mod:`~lightning_adalabel.examples.recipes.vision`, :mod:`~lightning_adalabel.examples.recipes.vision_data`,
:mod:`~lightning_adalabel.examples.recipes.text` and, for the Hugging Face recipes (which alone import
``transformers``), :mod:`~lightning_adalabel.examples.recipes.transformers_text` and
:mod:`~lightning_adalabel.examples.recipes.token_classification`.
"""

import difflib
import os
from pathlib import Path
from typing import Dict, List, Optional

RECIPES_DIR = Path(__file__).resolve().parent


def recipe_paths() -> Dict[str, Path]:
    """Every shipped recipe, ``{name: path}``, sorted by name (the name is the YAML file's stem)."""
    return {path.stem: path for path in sorted(RECIPES_DIR.glob("*.yaml"))}


def recipe_summary(path: Path) -> str:
    """The recipe's one-line description: its first comment line (``# name: summary``) without the name."""
    with open(path, encoding="utf-8") as file:
        for line in file:
            if line.startswith("#"):
                summary = line.lstrip("#").strip()
                return summary.split(":", 1)[1].strip() if summary.startswith(f"{path.stem}:") else summary
    return ""


def format_recipe_list() -> str:
    """What ``adalabel recipes`` prints: one line per recipe, then how to run one."""
    recipes = recipe_paths()
    width = max(len(name) for name in recipes)
    lines = [f"{name:<{width}}  {recipe_summary(path)}" for name, path in recipes.items()]
    lines += [
        "",
        "run one:    adalabel fit --config <name> [--data.root DIR] [--adalabel.preset NAME --adalabel.alpha A ...]",
        "see it all: adalabel fit --config <name> --print_config",
    ]
    return "\n".join(lines)


def resolve_recipe(name_or_path: str) -> str:
    """``name_or_path`` itself when it is an existing file, else the path of the shipped recipe of that name.

    A folder with a recipe's name (e.g. the data folder ``imagenet/``) does not hide the recipe.

    Example:
        >>> resolve_recipe("cifar10").endswith("cifar10.yaml")
        True
        >>> resolve_recipe("cifar11")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        FileNotFoundError: 'cifar11' is neither a config file nor a shipped recipe; did you mean 'cifar10'? Recipes: ...
    """
    if os.path.isfile(name_or_path):
        return name_or_path
    name = name_or_path[: -len(".yaml")] if name_or_path.endswith(".yaml") else name_or_path
    recipes = recipe_paths()
    if name in recipes:
        return str(recipes[name])
    close = difflib.get_close_matches(name, list(recipes), n=1)
    suggestion = f"did you mean {close[0]!r}? " if close else ""
    raise FileNotFoundError(
        f"{name_or_path!r} is neither a config file nor a shipped recipe; {suggestion}Recipes: {', '.join(recipes)}"
        " (list them with `adalabel recipes`)."
    )


def resolve_config_args(argv: List[str]) -> List[str]:
    """Replace recipe names given to ``--config`` / ``-c`` by the paths of the shipped YAML files.

    Example:
        >>> args = resolve_config_args(["fit", "--config", "cifar10", "--trainer.max_epochs", "1"])
        >>> args[2].endswith("cifar10.yaml"), args[3:]
        (True, ['--trainer.max_epochs', '1'])
    """
    resolved: List[str] = []
    expects_config: Optional[str] = None
    for arg in argv:
        if expects_config is not None:
            resolved.append(resolve_recipe(arg))
            expects_config = None
        elif arg in ("--config", "-c"):
            resolved.append(arg)
            expects_config = arg
        elif arg.startswith("--config="):
            resolved.append("--config=" + resolve_recipe(arg[len("--config="):]))
        else:
            resolved.append(arg)
    return resolved
