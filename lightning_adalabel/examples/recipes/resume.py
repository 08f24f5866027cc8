"""What ``adalabel`` does with ``--ckpt_path``: where ``--ckpt_path last`` looks, and which settings a checkpoint fixes.

A checkpoint fixes two kinds of settings:

- the model's hyperparameters (``--model.*``): LightningCLI rebuilds the model from the ones saved in the checkpoint,
  so that it matches its weights, and ``fit`` resumes the optimizer and learning-rate schedule where they stopped;
- the data settings that make the model's inputs (a data module's ``model_input_settings``, e.g. the text recipes'
  ``ngrams``): other values would feed the trained model inputs it has never seen.

The values of a YAML file give way to the checkpoint's, as in LightningCLI; a value given on the command line that
differs from the checkpoint's is refused, since it would be silently ignored or would change what the model sees.
"""

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from lightning_adalabel.label_matrix_io import TORCH_LOAD_ERRORS, load_failure_reason

# Where Lightning writes the checkpoints of a run started with --trainer.default_root_dir ROOT: ModelCheckpoint's
# last.ckpt in ROOT/<logger name>/<version>/checkpoints/ (or ROOT/checkpoints/ without a logger), and the
# hpc_ckpt_<n>.ckpt that Lightning's SLURM plugin saves in ROOT on the requeue signal.
LAST_CHECKPOINT_PATTERNS = ("hpc_ckpt_*.ckpt", "checkpoints/last*.ckpt", "*/*/checkpoints/last*.ckpt")
CLI_KEYS = ("_class_path", "_instantiator")  # what LightningCLI adds to the saved hyperparameters


@dataclass
class SavedSettings:
    """The settings a checkpoint was trained with."""

    path: str
    model_class: Optional[str] = None
    model: Dict[str, Any] = field(default_factory=dict)
    data_class: Optional[str] = None
    data: Dict[str, Any] = field(default_factory=dict)
    checkpoint_dir: Optional[str] = None  # ModelCheckpoint's dirpath when it was saved

    @property
    def run_config(self) -> Optional[str]:
        """The ``config.yaml`` that LightningCLI wrote next to the run's ``checkpoints/`` folder, if it is there."""
        folder = Path(self.checkpoint_dir or Path(self.path).parent)
        config = folder.parent / "config.yaml"
        return str(config) if folder.name == "checkpoints" and config.is_file() else None


def find_newest_checkpoint(root: str, checkpoint_dirs: Iterable[str] = ()) -> Optional[str]:
    """The most recently written of the run's ``last.ckpt`` and ``hpc_ckpt_*.ckpt`` files under ``root`` (and
    ``last*.ckpt`` in ``checkpoint_dirs``, a ModelCheckpoint's own ``dirpath``); ``None`` when there is none.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> find_newest_checkpoint(str(root)) is None
        True
        >>> (root / "lightning_logs" / "version_0" / "checkpoints").mkdir(parents=True)
        >>> _ = (root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt").write_bytes(b"")
        >>> find_newest_checkpoint(str(root)).endswith("version_0/checkpoints/last.ckpt")
        True
    """
    candidates: List[Path] = []
    for pattern in LAST_CHECKPOINT_PATTERNS:
        candidates += Path(root).glob(pattern)
    for folder in checkpoint_dirs:
        candidates += Path(folder).glob("last*.ckpt")
    files = [path for path in candidates if path.is_file()]
    return str(max(files, key=lambda path: path.stat().st_mtime)) if files else None


def load_checkpoint(path: str, weights_only: bool = True) -> Dict[str, Any]:
    """The checkpoint at ``path``, memory-mapped (the weights are not read until used); a file that is not a
    checkpoint, or one cut short, raises a one-line ``ValueError`` instead of the unpickler's."""
    try:
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
        except (RuntimeError, OSError):  # the legacy (non-zip) format, or a file system, that cannot be memory-mapped
            checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only)
    except TORCH_LOAD_ERRORS as error:
        raise ValueError(
            f"--ckpt_path {path}: cannot be read as a checkpoint ({load_failure_reason(error)}). Pass a checkpoint"
            " that `adalabel fit` saved, whole (a copy stopped midway leaves a file cut short); an earlier checkpoint"
            " of the run will do."
        ) from error
    if not isinstance(checkpoint, dict):
        raise ValueError(f"--ckpt_path {path}: holds a {type(checkpoint).__name__}, not a Lightning checkpoint.")
    return checkpoint


def read_saved_settings(path: str) -> SavedSettings:
    """The hyperparameters and checkpoint folder saved in the checkpoint at ``path`` (memory-mapped: the weights are
    not read)."""
    checkpoint = load_checkpoint(path)
    model = dict(checkpoint.get("hyper_parameters") or {})
    data = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    dirs = [state.get("dirpath") for state in (checkpoint.get("callbacks") or {}).values() if isinstance(state, dict)]
    return SavedSettings(
        path=path,
        model_class=model.get("_class_path"),
        model={key: value for key, value in model.items() if key not in CLI_KEYS},
        data_class=data.get("_class_path"),
        data={key: value for key, value in data.items() if key not in CLI_KEYS},
        checkpoint_dir=next((folder for folder in dirs if folder), None),
    )


def options_on_command_line(args: Sequence[str], group: str) -> List[str]:
    """The names of the ``--<group>.<name>`` options in ``args`` (also ``--<group>.init_args.<name>`` and
    ``--<group>.<name>=value``), in their order.

    Example:
        >>> args = ["--model.lr", "0.5", "--model.init_args.schedule=constant", "--data.ngrams", "1"]
        >>> options_on_command_line(args, "model")
        ['lr', 'schedule']
    """
    prefix = f"--{group}."
    names = []
    for arg in args:
        if arg.startswith(prefix):
            name = arg[len(prefix):].split("=", 1)[0]
            name = name[len("init_args."):] if name.startswith("init_args.") else name
            names.append(name.split(".")[0])
    return list(dict.fromkeys(names))


def model_input_settings(data_class: Optional[str]) -> Tuple[str, ...]:
    """The data module's ``model_input_settings``: its arguments that shape the model's inputs.

    Example:
        >>> model_input_settings("lightning_adalabel.examples.recipes.text.TextClassificationDataModule")
        ('num_classes', 'num_buckets', 'ngrams')
    """
    if not data_class:
        return ()
    module_name, _, class_name = data_class.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError):
        return ()
    return tuple(getattr(cls, "model_input_settings", ()))


def short_class(class_path: Optional[str]) -> str:
    return (class_path or "?").rsplit(".", 1)[-1]


def show(value: Any) -> str:
    """A value as it is written on the command line.

    Example:
        >>> show(None), show(True), show([1, 2]), show(0.5)
        ('null', 'true', '[1, 2]', '0.5')
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(list(value)) if isinstance(value, tuple) else str(value)


def check_same_model_class(saved: SavedSettings, model_class: Optional[str], data_class: Optional[str]) -> None:
    """Raise when the checkpoint holds another model class than the configuration builds (another recipe's)."""
    if saved.model_class and model_class and saved.model_class != model_class:
        trained_on = f" trained on {short_class(saved.data_class)} data" if saved.data_class else ""
        raise ValueError(
            f"{saved.path} holds a model of class {short_class(saved.model_class)}{trained_on}, but this configuration"
            f" builds {short_class(model_class)} with {short_class(data_class)} data: run it with the configuration it"
            f" was trained with ({use_run_config(saved)}) or pass a checkpoint of this recipe."
        )


def use_run_config(saved: SavedSettings) -> str:
    if saved.run_config:
        return f"--config {saved.run_config}, the run's own"
    return "the --config and options of its training run"


def refuse_changed_settings(
    saved: SavedSettings, given_model: Dict[str, Any], given_data: Dict[str, Any], data_sources: Dict[str, str]
) -> None:
    """Raise one error naming every command-line ``--model.*`` value (``given_model``) and every data setting the
    model depends on (``given_data``, with where each value came from) that differs from the checkpoint's."""
    model = {name: value for name, value in given_model.items() if name in saved.model and saved.model[name] != value}
    data = {name: value for name, value in given_data.items() if name in saved.data and saved.data[name] != value}
    if not model and not data:
        return
    changed = [f"--model.{name} {show(value)} (checkpoint: {show(saved.model[name])})" for name, value in model.items()]
    changed += [
        f"--data.{name} {show(value)} from {data_sources.get(name, 'the configuration')}"
        f" (checkpoint: {show(saved.data[name])})"
        for name, value in data.items()
    ]
    fixes = []
    if model:
        fixes.append("remove " + ", ".join(f"--model.{name}" for name in model))
    if data:
        fixes.append("pass " + " ".join(f"--data.{name} {show(saved.data[name])}" for name in data))
    raise ValueError(
        f"{', '.join(changed)}: not what {saved.path} was trained with. A checkpoint's model keeps the"
        " hyperparameters it was trained with (fit resumes its optimizer and learning-rate schedule) and needs its"
        f" inputs made as in training: {' and '.join(fixes)}, or use {use_run_config(saved)}; to train with new"
        " values, start a new run without --ckpt_path."
    )
