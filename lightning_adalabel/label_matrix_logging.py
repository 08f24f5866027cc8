"""Log the label matrix at each refresh: a heatmap of Q and its most correlated class pairs.

Called by :class:`~lightning_adalabel.AdaLabel` when ``log_label_matrix=True``. Loggers that take figures
(TensorBoard: ``add_figure`` / ``add_text``) get them directly; otherwise the heatmap is saved as
``<log_dir>/label_matrix/step_<global_step>.png`` with the pairs in ``step_<global_step>_top_pairs.csv`` beside it.
Only global rank 0 writes; every rank holds the same Q after a refresh.
"""

import csv
import os
from typing import List, Optional, Sequence, Tuple

import lightning.pytorch as pl
from torch import Tensor

from lightning_adalabel.visualization import plot_label_matrix, top_correlated_pairs


def _pairs_markdown(pairs: Sequence[Tuple[str, str, float]]) -> str:
    """A markdown table of :func:`top_correlated_pairs`'s output (TensorBoard renders it in the Text tab).

    Example:
        >>> print(_pairs_markdown([("3", "8", 0.41)]))
        | target class | soft-label class | Q |
        |---|---|---|
        | 3 | 8 | 0.4100 |
    """
    lines = ["| target class | soft-label class | Q |", "|---|---|---|"]
    lines += [f"| {row} | {column} | {value:.4f} |" for row, column, value in pairs]
    return "\n".join(lines)


def _figure_experiments(trainer: "pl.Trainer") -> List[object]:
    """The experiments of the attached loggers that accept matplotlib figures (TensorBoard's SummaryWriter)."""
    experiments = []
    for logger in trainer.loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(experiment, "add_figure") and hasattr(experiment, "add_text"):
            experiments.append(experiment)
    return experiments


def label_matrix_dir(trainer: "pl.Trainer") -> str:
    """Where the PNG fallback goes: ``<trainer.log_dir or default_root_dir>/label_matrix``."""
    return os.path.join(trainer.log_dir or trainer.default_root_dir, "label_matrix")


def log_label_matrix(
    trainer: "pl.Trainer", matrix: Tensor, class_names: Optional[Sequence[str]] = None, top_pairs: int = 10
) -> None:
    """Log the heatmap of ``matrix`` and its ``top_pairs`` most correlated class pairs at the current global step."""
    if not trainer.is_global_zero:
        return
    step = trainer.global_step
    pairs = top_correlated_pairs(matrix, top_pairs, class_names)
    figure = plot_label_matrix(matrix, class_names, title=f"Label matrix Q at step {step}")
    experiments = _figure_experiments(trainer)
    for experiment in experiments:
        experiment.add_figure("adalabel/label_matrix", figure, global_step=step)  # type: ignore[attr-defined]
        if pairs:
            experiment.add_text("adalabel/top_pairs", _pairs_markdown(pairs), global_step=step)  # type: ignore
    if experiments:
        return
    directory = label_matrix_dir(trainer)
    os.makedirs(directory, exist_ok=True)
    figure.savefig(os.path.join(directory, f"step_{step}.png"), dpi=100)
    with open(os.path.join(directory, f"step_{step}_top_pairs.csv"), "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["target_class", "soft_label_class", "q"])
        writer.writerows(pairs)
