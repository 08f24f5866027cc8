"""Log the label matrix at each refresh: a heatmap of Q and its most correlated class pairs.

Called by :class:`~lightning_adalabel.AdaLabel` when ``log_label_matrix=True``, through each of the trainer's
loggers that can take them:

- TensorBoard: a figure (``add_figure``) and a markdown table (``add_text``);
- Weights & Biases: an image and a ``wandb.Table`` (``WandbLogger.log_image`` / ``log_table``);
- MLflow: artifacts ``adalabel/label_matrix/step_<global_step>.png`` and ``..._top_pairs.csv``.

When none of them is attached (CSV, or no logger), the heatmap is saved as
``<log_dir>/label_matrix/step_<global_step>.png`` with the pairs in ``step_<global_step>_top_pairs.csv`` beside it.
Only global rank 0 writes; every rank holds the same Q after a refresh.

The pairs come from the engine's ``top_pairs`` (a sparse engine's from its sparse rows, at any K). An engine that does
not keep Q as a ``K x K`` tensor (``AdaLabel(top_k=...)``) is never densified beyond :data:`MAX_HEATMAP_CLASSES`
classes: above that only the top pairs are logged, as a text/table or a CSV without a PNG.
"""

import csv
import io
import os
from typing import Any, Optional, Sequence, Tuple

import lightning.pytorch as pl
from lightning.pytorch.loggers import Logger, MLFlowLogger, WandbLogger

from lightning_adalabel.engine import LabelMatrixEngine
from lightning_adalabel.visualization import named_pairs, plot_label_matrix

# A heatmap with more cells than this squared is unreadable, and for a sparse engine it would need the K x K tensor.
MAX_HEATMAP_CLASSES = 64


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


PAIR_COLUMNS = ["target_class", "soft_label_class", "q"]


def _pairs_csv(pairs: Sequence[Tuple[str, str, float]]) -> str:
    handle = io.StringIO()
    writer = csv.writer(handle, lineterminator="\n")
    writer.writerow(PAIR_COLUMNS)
    writer.writerows(pairs)
    return handle.getvalue()


def _log_to(logger: Logger, figure: Optional[Any], pairs: Sequence[Tuple[str, str, float]], step: int) -> bool:
    """Log the heatmap (if any) and the pairs through one logger; False if it takes neither figures nor files."""
    if isinstance(logger, WandbLogger):  # wandb is imported by the logger, never here
        if figure is not None:
            logger.log_image(key="adalabel/label_matrix", images=[figure], step=step)
        if pairs:
            logger.log_table(key="adalabel/top_pairs", columns=PAIR_COLUMNS, data=[list(pair) for pair in pairs],
                             step=step)
        return True
    if isinstance(logger, MLFlowLogger):
        client, run_id = logger.experiment, logger.run_id
        if figure is not None:
            client.log_figure(run_id, figure, f"adalabel/label_matrix/step_{step}.png")
        client.log_text(run_id, _pairs_csv(pairs), f"adalabel/label_matrix/step_{step}_top_pairs.csv")
        return True
    experiment = getattr(logger, "experiment", None)
    if hasattr(experiment, "add_figure") and hasattr(experiment, "add_text"):  # TensorBoard's SummaryWriter
        if figure is not None:
            experiment.add_figure("adalabel/label_matrix", figure, global_step=step)  # type: ignore[union-attr]
        if pairs:
            experiment.add_text("adalabel/top_pairs", _pairs_markdown(pairs), global_step=step)  # type: ignore
        return True
    return False


def label_matrix_dir(trainer: "pl.Trainer") -> str:
    """Where the PNG fallback goes: ``<trainer.log_dir or default_root_dir>/label_matrix``."""
    return os.path.join(trainer.log_dir or trainer.default_root_dir, "label_matrix")


def log_heatmap_and_pairs(
    trainer: "pl.Trainer", engine: LabelMatrixEngine, class_names: Optional[Sequence[str]] = None, top_pairs: int = 10,
) -> None:
    """Log the heatmap of the engine's Q and its ``top_pairs`` most correlated class pairs at the current global step;
    an engine that does not keep Q dense logs its pairs only above :data:`MAX_HEATMAP_CLASSES` classes."""
    if not trainer.is_global_zero:
        return
    step = trainer.global_step
    pairs = named_pairs(engine.top_pairs(top_pairs), class_names, engine.num_classes)
    figure = None
    if engine.stores_dense or engine.num_classes <= MAX_HEATMAP_CLASSES:
        figure = plot_label_matrix(engine.to_dense(), class_names, title=f"Label matrix Q at step {step}",
                                   include_diagonal=engine.include_diagonal)
    logged = [_log_to(logger, figure, pairs, step) for logger in trainer.loggers]
    if any(logged):
        return
    directory = label_matrix_dir(trainer)
    os.makedirs(directory, exist_ok=True)
    if figure is not None:
        figure.savefig(os.path.join(directory, f"step_{step}.png"), dpi=100)
    with open(os.path.join(directory, f"step_{step}_top_pairs.csv"), "w", newline="") as handle:
        handle.write(_pairs_csv(pairs))
