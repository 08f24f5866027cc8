"""``adalabel demo``: every preset on scikit-learn's digits, through a real Trainer, side by side.

The digits (1797 8x8 images, 10 classes) ship inside scikit-learn, so the demo needs no download. A fixed split
gives 1000 training and 797 test images; ``--noise`` flips that fraction of the *training* labels
``y -> (y + 1) mod 10`` (the test labels stay clean). Each run trains a small CNN with
:class:`~lightning_adalabel.AdaLabel` and :class:`~lightning_adalabel.AdaLabelMixin` and reports test accuracy,
negative log-likelihood and expected calibration error.
"""

import argparse
import contextlib
import csv
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.functional.classification import multiclass_calibration_error

from lightning_adalabel import PRESETS, AdaLabel, AdaLabelMixin, IndexedDataset, find_label_issues, plot_label_matrix

NUM_CLASSES = 10
NUM_TRAIN = 1000
DEMO_PRESETS = ("none", "label_smoothing", "ols", "alr")
NOISE_TYPES = ("flip", "symmetric")


def load_digits_split(
    noise: float = 0.0, seed: int = 0, noise_type: str = "flip"
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_test, y_test)``: images as ``N x 1 x 8 x 8`` floats in [0, 1], integer labels.

    The split is the same for every seed; ``seed`` picks which training labels are corrupted. ``noise_type``
    ``"flip"`` (class-dependent) sends a corrupted label ``y -> (y + 1) mod 10``; ``"symmetric"`` sends it to a
    uniformly random *other* class.

    Example:
        >>> x_train, y_train, x_test, y_test = load_digits_split(noise=0.3, seed=0)
        >>> tuple(x_train.shape), tuple(x_test.shape)
        ((1000, 1, 8, 8), (797, 1, 8, 8))
        >>> clean = load_digits_split()[1]
        >>> int((y_train != clean).sum()), bool(((clean + 1) % 10 == y_train)[y_train != clean].all())
        (300, True)
        >>> y_symmetric = load_digits_split(noise=0.3, seed=0, noise_type="symmetric")[1]
        >>> int((y_symmetric != clean).sum()), len(set(((y_symmetric - clean) % 10)[y_symmetric != clean].tolist())) > 1
        (300, True)
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError(
            "The demo trains on scikit-learn's digits: install the demo extra (`pip install '.[demo]'` in a clone of"
            " lightning_adalabel) or `pip install scikit-learn matplotlib`."
        ) from error
    if not 0.0 <= noise < 1.0:
        raise ValueError(f"`noise` is the fraction of training labels to flip and must be in [0, 1), got {noise}.")
    if noise_type not in NOISE_TYPES:
        raise ValueError(f"`noise_type` must be one of {NOISE_TYPES}, got {noise_type!r}.")
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, test = order[:NUM_TRAIN], order[NUM_TRAIN:]
    y_train = labels[train].clone()
    generator = torch.Generator().manual_seed(seed)
    flipped = torch.randperm(NUM_TRAIN, generator=generator)[: round(noise * NUM_TRAIN)]
    # A shift in [1, K) never maps a label onto itself: (y + 1) for "flip", uniform over the others for "symmetric".
    shift = 1 if noise_type == "flip" else torch.randint(1, NUM_CLASSES, (len(flipped),), generator=generator)
    y_train[flipped] = (y_train[flipped] + shift) % NUM_CLASSES
    return images[train], y_train, images[test], labels[test]


class DigitsCNN(AdaLabelMixin, L.LightningModule):
    """Two 3x3 convolutions and a small head; trains with the mixin's default ``training_step``."""

    def __init__(self, lr: float = 2e-3, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU(), nn.Linear(128, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.trainer.max_epochs)
        return [optimizer], [scheduler]


@dataclass
class RunResult:
    method: str
    seed: int
    noise: float
    accuracy: float
    nll: float
    ece: float
    seconds: float


def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> Dict[str, float]:
    """Test accuracy, NLL and 15-bin ECE of ``model`` on ``(x, y)``."""
    model.eval()
    with torch.no_grad():
        logits = model(x).float()
    ece = multiclass_calibration_error(logits.softmax(dim=1), y, num_classes=logits.shape[1], n_bins=15)
    return {
        "accuracy": (logits.argmax(dim=1) == y).float().mean().item(),
        "nll": F.cross_entropy(logits, y).item(),
        "ece": ece.item(),
    }


def run_digits(
    method: str = "alr",
    seed: int = 0,
    noise: float = 0.0,
    epochs: int = 30,
    batch_size: int = 64,
    progress_bar: bool = True,
    callback: Optional[AdaLabel] = None,
    noise_type: str = "flip",
    extra_callbacks: Sequence[L.Callback] = (),
    indexed: bool = False,
    **trainer_overrides: Any,
) -> Tuple[RunResult, AdaLabel]:
    """Train :class:`DigitsCNN` with ``callback`` (default ``AdaLabel(preset=method)``) and evaluate it.

    ``noise`` and ``noise_type`` corrupt the training labels as in :func:`load_digits_split`; ``extra_callbacks``
    join the AdaLabel callback in the Trainer; ``indexed``: see :func:`train_and_evaluate`.

    Returns the result row and the callback, whose ``label_matrix`` holds the learned Q.
    """
    callback = callback if callback is not None else AdaLabel(preset=method, num_classes=NUM_CLASSES)
    split = load_digits_split(noise, seed, noise_type)
    result = train_and_evaluate(DigitsCNN, split, callback, method, seed, noise, epochs, batch_size, progress_bar,
                                extra_callbacks, indexed, **trainer_overrides)
    return result, callback


def train_and_evaluate(
    make_model: Callable[[], L.LightningModule],
    split: Tuple[Tensor, Tensor, Tensor, Tensor],
    callback: AdaLabel,
    method: str,
    seed: int,
    noise: float,
    epochs: int,
    batch_size: int,
    progress_bar: bool = False,
    extra_callbacks: Sequence[L.Callback] = (),
    indexed: bool = False,
    **trainer_overrides: Any,
) -> RunResult:
    """One run of any task: seed, train ``make_model()`` on the split's training part with ``callback`` through a
    real Trainer (shuffled batches from a ``seed``-ed generator), and evaluate it on the split's test part.
    ``indexed``: the batches carry the samples' indices (:class:`~lightning_adalabel.IndexedDataset`), so that the
    callback keeps each sample's margin over training (the same batches and weights as without)."""
    x_train, y_train, x_test, y_test = split
    L.seed_everything(seed, verbose=False)
    train_set = TensorDataset(x_train, y_train)
    loader = DataLoader(
        IndexedDataset(train_set) if indexed else train_set, batch_size=batch_size, shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    trainer = L.Trainer(
        **{
            "accelerator": "cpu",
            "max_epochs": epochs,
            "callbacks": [callback, *extra_callbacks],
            "logger": False,
            "enable_checkpointing": False,
            "enable_model_summary": False,
            "enable_progress_bar": progress_bar,
            **trainer_overrides,
        }
    )
    model = make_model()  # after the Trainer, as the published runs built it: the same initial weights per seed
    start = time.perf_counter()
    trainer.fit(model, loader)
    seconds = time.perf_counter() - start
    return RunResult(method, seed, noise, seconds=seconds, **evaluate(model, x_test, y_test))


def summarize(results: Sequence[RunResult]) -> List[Dict[str, Any]]:
    """One row per method: mean and standard error over seeds, in the order the methods first appear."""
    rows = []
    for method in dict.fromkeys(result.method for result in results):
        runs = [result for result in results if result.method == method]
        row: Dict[str, Any] = {"method": method, "seeds": len(runs), "noise": runs[0].noise}
        for field in ("accuracy", "nll", "ece", "seconds"):
            values = torch.tensor([getattr(run, field) for run in runs], dtype=torch.float64)
            row[field] = values.mean().item()
            row[f"{field}_se"] = (values.std() / math.sqrt(len(runs))).item() if len(runs) > 1 else 0.0
        rows.append(row)
    return rows


def format_table(rows: Sequence[Dict[str, Any]]) -> str:
    """A markdown table of :func:`summarize`'s rows.

    Example:
        >>> row = {"method": "alr", "seeds": 2, "accuracy": 0.99, "accuracy_se": 0.001, "nll": 0.05,
        ...        "nll_se": 0.01, "ece": 0.01, "ece_se": 0.002, "seconds": 3.0, "seconds_se": 0.1}
        >>> print(format_table([row]))
        | method | test accuracy (%) | test NLL | ECE (%) | seconds |
        |---|---|---|---|---|
        | alr | 99.00 ± 0.10 | 0.050 ± 0.010 | 1.00 ± 0.20 | 3.0 |
    """
    lines = ["| method | test accuracy (%) | test NLL | ECE (%) | seconds |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['method']} | {100 * row['accuracy']:.2f} ± {100 * row['accuracy_se']:.2f}"
            f" | {row['nll']:.3f} ± {row['nll_se']:.3f} | {100 * row['ece']:.2f} ± {100 * row['ece_se']:.2f}"
            f" | {row['seconds']:.1f} |"
        )
    return "\n".join(lines)


def write_csv(path: str, rows: Sequence[Dict[str, Any]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def default_out_dir(noise: float, noise_type: str = "flip") -> str:
    """The demo's output folder when ``--out`` is not given: one per noise setting, so runs do not overwrite each other.

    Example:
        >>> default_out_dir(0.0), default_out_dir(0.3), default_out_dir(0.125, "symmetric")
        ('adalabel_demo', 'adalabel_demo_flip30', 'adalabel_demo_symmetric12.5')
    """
    if noise == 0:
        return "adalabel_demo"
    return f"adalabel_demo_{noise_type}{round(100 * noise, 2):g}"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="adalabel demo",
        description="Compare label-regularisation presets on scikit-learn's digits (no download needed).",
    )
    parser.add_argument("--noise", type=float, default=0.0,
                        help="fraction of training labels flipped y -> (y+1) mod 10 (default: 0, clean)")
    parser.add_argument("--seeds", type=int, default=5, help="seeds per method (default: 5)")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs per run (default: 30)")
    parser.add_argument("--methods", nargs="+", default=list(DEMO_PRESETS), choices=sorted(PRESETS),
                        help=f"presets to compare (default: {' '.join(DEMO_PRESETS)})")
    parser.add_argument("--out", default=None,
                        help="output folder for the CSVs and the heatmap (default: adalabel_demo/ for clean labels,"
                             " adalabel_demo_flip30/ for --noise 0.3, ...)")
    parser.add_argument("--no-progress-bar", action="store_true", help="hide the progress bar over the runs")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.epochs < 1:
        parser.error("--seeds and --epochs must be at least 1")
    if not 0.0 <= args.noise < 1.0:
        parser.error(f"--noise must be in [0, 1), got {args.noise}")
    if args.out is None:
        args.out = default_out_dir(args.noise)
    return args


# Lightning's per-run messages, each printed once per Trainer: 20 runs would bury the table under them.
NOISY_WARNINGS = (
    r".*does not have many workers.*",
    r".*The number of training batches .* is smaller than the logging interval.*",
    r".*GPU available but not used.*",
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",  # Lightning's pytree helper on newer torch
)
LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's INFO messages ("GPU available: ...", "`Trainer.fit` stopped: ...") and its per-run
    warnings about the tiny in-memory loaders, for the duration of the block only; the logger levels and warning
    filters are restored afterwards.

    Example:
        >>> import logging
        >>> before = logging.getLogger("lightning.pytorch").level
        >>> with quiet_lightning():
        ...     logging.getLogger("lightning.pytorch").level == logging.WARNING
        True
        >>> logging.getLogger("lightning.pytorch").level == before
        True
    """
    loggers = [logging.getLogger(name) for name in LIGHTNING_LOGGERS]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        for pattern in NOISY_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


class _EpochProgress(L.Callback):
    """Advances the demo's single progress bar by one at the end of each training epoch."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.bar.update(1)


class _KeepModel(L.Callback):
    """Keeps the trained module, for the search for its training set's wrong labels once the fit is over."""

    module: Optional[L.LightningModule] = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.module = pl_module


def flipped_labels_found(model: L.LightningModule, method: str, seed: int, noise: float) -> Dict[str, Any]:
    """How many of the flipped training labels :func:`~lightning_adalabel.find_label_issues` flags, with its default
    cut-off, and how well its ranking (by the training margins where the run kept them) ranks them (AUROC)."""
    from torchmetrics.functional.classification import binary_auroc

    x_train, y_train, _, _ = load_digits_split(noise, seed)
    found = find_label_issues(model, DataLoader(TensorDataset(x_train, y_train), batch_size=250), accelerator="cpu",
                              devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    flipped = found.given != load_digits_split()[1][found.index]
    hits = int((found.is_issue & flipped).sum())
    flagged = int(found.is_issue.sum())
    return {"method": method, "seed": seed, "flipped": int(flipped.sum()), "flagged": flagged,
            "precision": hits / flagged if flagged else math.nan, "recall": hits / max(1, int(flipped.sum())),
            "auroc": float(binary_auroc(-(found.score if found.margin is None else found.margin), flipped.long()))}


def format_found(rows: Sequence[Dict[str, Any]]) -> str:
    """The markdown table of :func:`flipped_labels_found`'s rows, one line per method (mean over its seeds).

    Example:
        >>> row = {"method": "alr", "seed": 0, "flipped": 300, "flagged": 290, "precision": 0.95, "recall": 0.9,
        ...        "auroc": 0.97}
        >>> print(format_found([row]).splitlines()[2])
        | alr | 290 | 95.0 | 90.0 | 0.970 |
    """
    lines = ["| method | flagged | precision (%) | recall (%) | AUROC |", "|---|---|---|---|---|"]
    for method in dict.fromkeys(row["method"] for row in rows):
        runs = [row for row in rows if row["method"] == method]
        mean = {name: sum(row[name] for row in runs) / len(runs) for name in ("flagged", "precision", "recall",
                                                                               "auroc")}
        lines.append(f"| {method} | {mean['flagged']:.0f} | {100 * mean['precision']:.1f} | {100 * mean['recall']:.1f}"
                     f" | {mean['auroc']:.3f} |")
    return "\n".join(lines)


RUN_HEADER = "| run | method | seed | test accuracy (%) | test NLL | ECE (%) | seconds |\n|---|---|---|---|---|---|---|"


def format_run(result: RunResult, index: int, total: int) -> str:
    """One finished run as a row of the table that the demo fills in as it goes.

    Example:
        >>> print(format_run(RunResult("alr", 0, 0.0, 0.9912, 0.0456, 0.0123, 3.21), 1, 20))
        |  1/20 | alr | 0 | 99.12 | 0.046 | 1.23 | 3.2 |
    """
    width = len(str(total))
    return (
        f"| {index:>{width}}/{total} | {result.method} | {result.seed} | {100 * result.accuracy:.2f}"
        f" | {result.nll:.3f} | {100 * result.ece:.2f} | {result.seconds:.1f} |"
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    grid = [(method, seed) for method in args.methods for seed in range(args.seeds)]
    print(
        f"Digits, {NUM_TRAIN} train / 797 test, noise {args.noise}, {args.epochs} epochs, {args.seeds} seed(s)"
        f" x {len(args.methods)} method(s) -> {args.out}/\n",
        flush=True,
    )
    print(RUN_HEADER, flush=True)
    results: List[RunResult] = []
    found: List[Dict[str, Any]] = []
    learned: Dict[str, Tensor] = {}
    # One bar over the whole grid, in epochs; only on a terminal (a log file gets the table rows alone).
    from tqdm.auto import tqdm

    show_bar = not args.no_progress_bar and sys.stderr.isatty()
    with quiet_lightning(), tqdm(
        total=len(grid) * args.epochs, disable=not show_bar, unit="epoch", dynamic_ncols=True, file=sys.stderr,
        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} epochs [{elapsed}<{remaining}]",
    ) as bar:
        for index, (method, seed) in enumerate(grid, start=1):
            bar.set_description(f"{method}, seed {seed}")
            kept = _KeepModel()
            result, callback = run_digits(
                method, seed, args.noise, args.epochs, progress_bar=False, extra_callbacks=[_EpochProgress(bar), kept],
                indexed=args.noise > 0,  # the label-issue search ranks by each sample's margin over training
            )
            results.append(result)
            if args.noise > 0:  # which training labels are flipped is known: how many does the trained model find?
                found.append(flipped_labels_found(kept.module, method, seed, args.noise))
            if seed == 0 and callback.label_matrix is not None:
                learned[method] = callback.label_matrix.matrix.cpu()
            bar.write(format_run(result, index, len(grid)), file=sys.stdout)
            sys.stdout.flush()
    summary = summarize(results)
    write_csv(os.path.join(args.out, "runs.csv"), [asdict(result) for result in results])
    write_csv(os.path.join(args.out, "summary.csv"), summary)
    print(f"\nMean ± standard error over {args.seeds} seed(s):\n")
    print(format_table(summary))
    if found:
        write_csv(os.path.join(args.out, "label_issues.csv"), found)
        print(f"\nThe {found[0]['flipped']} flipped training labels, as find_label_issues finds them in each trained"
              f" model's training set (mean over {args.seeds} seed(s)):\n")
        print(format_found(found))
    if "alr" in learned:
        figure = plot_label_matrix(learned["alr"], title=f"ALR label matrix, digits, noise {args.noise}, seed 0")
        heatmap = os.path.join(args.out, "alr_label_matrix.png")
        figure.savefig(heatmap, dpi=120)
        print(f"\nLearned ALR matrix: {heatmap}")
    found_csv = f", {os.path.join(args.out, 'label_issues.csv')}" if found else ""
    print(f"Results: {os.path.join(args.out, 'summary.csv')}, {os.path.join(args.out, 'runs.csv')}{found_csv}")
    return 0
