"""Finding the wrong labels: how well one run's probabilities rank and flag the corrupted training labels.

For each task (``digits``, ``superclasses``), noise setting (20%/40% symmetric and flip, as ``accuracy.py``) and seed,
every method trains through the package's own API (``train_and_evaluate``: a real Trainer, AdaLabel, the mixin) and
:func:`lightning_adalabel.find_label_issues` scores each training sample:

- ``alr``, ``none`` (cross-entropy), ``label_smoothing``, ``ols``: one run, on its own training set (in-sample), with
  the samples' indices in the batches, so that two scores come from the one run: each sample's logit margin averaged
  over training (``margin``, what ``find_label_issues`` ranks by) and the trained model's probability of the given
  label (``score``);
- ``cleanlab``: cleanlab's recipe, cross-entropy on ``--folds`` folds, each sample scored by the probability of the
  model that did not train on it (out-of-sample, ``--folds`` runs).

Columns: AUROC of each score for "this label was corrupted"; precision and recall of the cut-offs: ``margin``
(negative average margin, the default), ``misclassified`` (the trained model predicts another class), cleanlab's rule
(``cleanlab.filter.find_label_issues``) on the same probabilities, and the ``e_k n_k`` lowest-scored samples of each
class (``lowest``, in runs.csv); how often the suggested label is the true one, on the corrupted samples; the first
run's test accuracy; and for ``alr`` and ``cleanlab`` a second run on the cleaned training set: flagged samples removed
(``alr``: its default cut-off, ALR again; ``cleanlab``: cleanlab's rule, cross-entropy again, its recipe), or (``alr``)
relabelled with the suggestion.

Usage::

    python benchmarks/label_issues.py --task digits --seeds 5 --jobs 2
    python benchmarks/label_issues.py --task superclasses --seeds 5 --jobs 2
    python benchmarks/label_issues.py --task digits --report-only

Runs go to ``benchmarks/results/label_issues/<task>/runs.csv``; runs already there are skipped, so an interrupted
benchmark resumes where it stopped.
"""

import argparse
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # accuracy.py and superclasses.py, beside this file

from accuracy import SETTINGS, TASKS, append_row, read_done  # noqa: E402

METHODS = ("alr", "none", "label_smoothing", "ols", "cleanlab")
NOISY_SETTINGS = tuple(name for name, setting in SETTINGS.items() if setting.noise > 0)
# The metrics of a run, in runs.csv and in the table (NaN where a method has none).
METRICS = ("margin_auroc", "auroc", "margin_precision", "margin_recall", "precision", "recall", "cleanlab_precision",
           "cleanlab_recall", "lowest_precision", "lowest_recall", "suggestion_accuracy", "accuracy", "removed_accuracy",
           "relabelled_accuracy")
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "label_issues")


def task_parts(task: str) -> Tuple[Callable[..., Any], Callable[..., Tuple[Tensor, ...]], int, int]:
    """``(model class, load_split, num_classes, batch_size)`` of a task, as ``accuracy.py`` trains it."""
    if task == "digits":
        from lightning_adalabel.examples.demo import NUM_CLASSES, DigitsCNN, load_digits_split

        return DigitsCNN, load_digits_split, NUM_CLASSES, 64
    from superclasses import NUM_CLASSES, SuperclassMLP, load_superclass_split

    return SuperclassMLP, load_superclass_split, NUM_CLASSES, 128


def train(task: str, preset: str, split: Tuple[Tensor, ...], seed: int, epochs: int,
          indexed: bool = True) -> Tuple[Any, float]:
    """One run of ``preset`` on ``split`` through the benchmarks' harness: the trained model and its test accuracy.
    ``indexed``: keep the training margins (for scoring the training set itself, not held-out samples)."""
    from lightning_adalabel import AdaLabel
    from lightning_adalabel.examples.demo import train_and_evaluate

    model_class, _, num_classes, batch_size = task_parts(task)
    models: List[Any] = []

    def make_model() -> Any:
        models.append(model_class())
        return models[-1]

    result = train_and_evaluate(make_model, split, AdaLabel(preset=preset, num_classes=num_classes), preset, seed,
                                0.0, epochs, batch_size, indexed=indexed)
    return models[0], result.accuracy


def scored(model: Any, x: Tensor, y: Tensor) -> Any:
    """:func:`find_label_issues` of ``model`` on ``(x, y)``, with the probabilities (cleanlab's rule needs them); the
    training margins where ``(x, y)`` is the set ``model`` trained on."""
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_adalabel import find_label_issues

    loader = DataLoader(TensorDataset(x, y), batch_size=512)
    return find_label_issues(model, loader, keep_probabilities=True, accelerator="cpu", devices=1)


def folds(num_samples: int, num_folds: int, seed: int) -> Iterator[Tuple[Tensor, Tensor]]:
    """``(train, held_out)`` index sets of a seeded ``num_folds``-fold split.

    Example:
        >>> [(len(train), len(held_out)) for train, held_out in folds(10, 3, seed=0)]
        [(6, 4), (7, 3), (7, 3)]
    """
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    for held_out in torch.tensor_split(order, num_folds):
        yield order[~torch.isin(order, held_out)], held_out


def lowest_per_class(score: Tensor, given: Tensor, predicted: Tensor) -> Tensor:
    """The alternative cut-off: in each class k, its ``e_k n_k`` lowest-scored samples, ``e_k n_k`` the number of
    samples labelled k that the model does not predict as k.

    Example:
        >>> lowest_per_class(torch.tensor([0.9, 0.2, 0.6, 0.1, 0.8]), torch.tensor([0, 0, 0, 1, 1]),
        ...                  torch.tensor([0, 0, 1, 0, 1])).tolist()
        [False, True, False, True, False]
    """
    flagged = torch.zeros_like(given, dtype=torch.bool)
    for k in given.unique():
        members = (given == k).nonzero().squeeze(1)
        count = int((predicted[members] != k).sum())
        flagged[members[score[members].argsort()[:count]]] = True
    return flagged


def detection(flagged: Tensor, corrupted: Tensor) -> Tuple[float, float]:
    """``(precision, recall)`` of ``flagged`` for the corrupted labels (precision NaN when nothing is flagged)."""
    hits = float((flagged & corrupted).sum())
    return hits / float(flagged.sum()) if flagged.any() else math.nan, hits / max(1.0, float(corrupted.sum()))


def run_one(job: Tuple[str, str, str, int, int, int]) -> Dict[str, object]:
    """Train, score and (for ``alr`` and ``cleanlab``) retrain on the cleaned set; runs in a worker process."""
    from cleanlab.filter import find_label_issues as cleanlab_issues
    from torchmetrics.functional.classification import binary_auroc

    from lightning_adalabel.examples.demo import quiet_lightning

    task, method, setting_name, seed, epochs, num_folds = job
    torch.set_num_threads(1)  # one core per worker: --jobs 2 on a 2-core machine uses both without contention
    setting = SETTINGS[setting_name]
    _, load_split, _, _ = task_parts(task)
    x, given, x_test, y_test = load_split(setting.noise, seed, setting.noise_type)
    true = load_split()[1]
    corrupted = given != true
    start = time.perf_counter()
    row: Dict[str, object] = {"task": task, "setting": setting_name, "method": method, "seed": seed}
    with quiet_lightning():
        if method == "cleanlab":  # cross-entropy, each sample scored by the fold model that did not train on it
            probabilities = torch.zeros(len(given), int(given.max()) + 1)
            for part, held_out in folds(len(given), num_folds, seed):
                # No margins: the fold model scores samples it did not train on.
                model, _ = train(task, "none", (x[part], given[part], x_test, y_test), seed, epochs, indexed=False)
                probabilities[held_out] = scored(model, x[held_out], given[held_out]).probabilities
            accuracy = math.nan
            margin = suggested = None
        else:
            model, accuracy = train(task, method, (x, given, x_test, y_test), seed, epochs)
            found = scored(model, x, given)
            probabilities, margin, suggested = found.probabilities, found.margin, found.suggested
        score = probabilities.gather(1, given[:, None]).squeeze(1)
        predicted = probabilities.argmax(dim=1)
        flagged = predicted != given  # the cut-off "misclassified"
        cleanlab_flagged = torch.as_tensor(cleanlab_issues(given.numpy(), probabilities.double().numpy(), n_jobs=1))
        row["margin_auroc"] = math.nan if margin is None else float(binary_auroc(-margin, corrupted.long()))
        row["auroc"] = float(binary_auroc(1 - score, corrupted.long()))
        row["margin_precision"], row["margin_recall"] = (math.nan, math.nan) if margin is None else \
            detection(margin < 0, corrupted)
        row["precision"], row["recall"] = detection(flagged, corrupted)
        row["cleanlab_precision"], row["cleanlab_recall"] = detection(cleanlab_flagged, corrupted)
        row["lowest_precision"], row["lowest_recall"] = detection(lowest_per_class(score, given, predicted), corrupted)
        if suggested is None:  # cleanlab's recipe: the most probable class other than the given one
            suggested = probabilities.scatter(1, given[:, None], -1.0).argmax(dim=1)
        row["suggestion_accuracy"] = float((suggested[corrupted] == true[corrupted]).float().mean())
        row["accuracy"] = accuracy
        row["removed_accuracy"] = row["relabelled_accuracy"] = math.nan
        # find_label_issues' default cut-off: "margin" where the run kept the margins (every in-sample run here)
        default_flagged = flagged if margin is None else margin < 0
        if method == "alr":
            kept = ~default_flagged
            row["removed_accuracy"] = train(task, "alr", (x[kept], given[kept], x_test, y_test), seed, epochs)[1]
            relabelled = torch.where(default_flagged, suggested, given)
            row["relabelled_accuracy"] = train(task, "alr", (x, relabelled, x_test, y_test), seed, epochs)[1]
        elif method == "cleanlab":
            kept = ~cleanlab_flagged
            row["removed_accuracy"] = train(task, "none", (x[kept], given[kept], x_test, y_test), seed, epochs)[1]
    row["flagged"], row["cleanlab_flagged"] = int(default_flagged.sum()), int(cleanlab_flagged.sum())
    row["seconds"] = time.perf_counter() - start
    return row


def mean_and_error(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and standard error over seeds, ignoring NaN.

    Example:
        >>> mean_and_error([0.9, 1.0, math.nan])
        (0.95, 0.05)
    """
    values = [value for value in values if not math.isnan(value)]
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    variance = sum((value - mean) ** 2 for value in values) / (len(values) - 1)
    return round(mean, 12), round(math.sqrt(variance / len(values)), 12)


def _stats(rows: Sequence[Dict[str, Any]], setting: str, method: str) -> Dict[str, Tuple[float, float]]:
    runs = [row for row in rows if row["setting"] == setting and row["method"] == method]
    return {name: mean_and_error([float(row.get(name, "nan")) for row in runs]) for name in METRICS} if runs else {}


def _auroc(stats: Dict[str, Tuple[float, float]], name: str) -> str:
    mean, error = stats[name]
    return "—" if math.isnan(mean) else f"{mean:.3f} ± {error:.3f}"


def format_table(rows: Sequence[Dict[str, Any]], setting: str) -> str:
    """The markdown table of one setting: a line per method, mean ± s.e. over the seeds in ``rows``.

    Example:
        >>> row = {"setting": "flip-20", "method": "alr", "seed": "0", **{name: "0.5" for name in METRICS}}
        >>> print(format_table([row], "flip-20").splitlines()[2])
        | alr (in-sample) | 1 | 1 | 0.500 ± 0.000 | 0.500 ± 0.000 | 0.50 / 0.50 | 0.50 / 0.50 | 0.50 / 0.50 | 50.0 \
| 50.00 | 50.00 | 50.00 |
    """
    lines = [
        "| scores from | runs | seeds | AUROC: margin over training | AUROC: final probability | margin < 0: precision /"
        " recall | misclassified: precision / recall | cleanlab's rule: precision / recall | suggestion right (%) |"
        " test acc. (%) | removed, 2nd run (%) | relabelled, 2nd run (%) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        stats = _stats(rows, setting, method)
        if not stats:
            continue

        def pair(name: str) -> str:
            precision, recall = stats[f"{name}precision"][0], stats[f"{name}recall"][0]
            return "—" if math.isnan(recall) else f"{precision:.2f} / {recall:.2f}"

        def percent(name: str, digits: int = 2) -> str:
            return "—" if math.isnan(stats[name][0]) else f"{100 * stats[name][0]:.{digits}f}"

        label = "cleanlab's recipe: CE, out-of-sample" if method == "cleanlab" else f"{method} (in-sample)"
        runs = [row for row in rows if row["setting"] == setting and row["method"] == method]
        count = runs[0].get("folds", 5) if method == "cleanlab" else 1
        lines.append(
            f"| {label} | {count} | {len(runs)} | {_auroc(stats, 'margin_auroc')} | {_auroc(stats, 'auroc')}"
            f" | {pair('margin_')} | {pair('')} | {pair('cleanlab_')} | {percent('suggestion_accuracy', 1)}"
            f" | {percent('accuracy')} | {percent('removed_accuracy')} | {percent('relabelled_accuracy')} |"
        )
    return "\n".join(lines)


#: The overview's columns: (heading, method, metric).
OVERVIEW = (
    ("ALR, 1 run: margin over training", "alr", "margin_auroc"),
    ("ALR, 1 run: final probability", "alr", "auroc"),
    ("CE, 1 run: margin", "none", "margin_auroc"),
    ("label smoothing, 1 run: margin", "label_smoothing", "margin_auroc"),
    ("OLS, 1 run: margin", "ols", "margin_auroc"),
    ("cleanlab's recipe (CE, 5-fold out-of-sample)", "cleanlab", "auroc"),
)


def format_overview(rows: Sequence[Dict[str, Any]], settings: Sequence[str]) -> str:
    """One line per setting: the mean AUROC (``±`` s.e.) of each score, ALR's one run against the others.

    Example:
        >>> rows = [{"setting": "flip-20", "method": method, "seed": "0", "margin_auroc": margin, "auroc": final}
        ...         for method, margin, final in (("alr", "0.99", "0.98"), ("cleanlab", "nan", "0.95"))]
        >>> print(format_overview(rows, ["flip-20"]).splitlines()[2])
        | flip-20 | 0.990 ± 0.000 | 0.980 ± 0.000 | 0.950 ± 0.000 |
    """
    columns = [column for column in OVERVIEW if any(row["method"] == column[1] for row in rows)]
    lines = ["| setting | " + " | ".join(heading for heading, _, _ in columns) + " |",
             "|---" * (1 + len(columns)) + "|"]
    for setting in settings:
        cells = [_auroc(stats, metric) if stats else "—"
                 for stats, metric in ((_stats(rows, setting, method), metric) for _, method, metric in columns)]
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="digits", choices=TASKS)
    parser.add_argument("--seeds", type=int, default=5, help="seeds per (method, setting) (default: 5)")
    parser.add_argument("--settings", nargs="+", default=list(NOISY_SETTINGS), choices=NOISY_SETTINGS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--epochs", type=int, default=30, help="training epochs per run (default: 30)")
    parser.add_argument("--folds", type=int, default=5, help="folds of cleanlab's recipe (default: 5)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="worker processes, one CPU thread each (default: 1, in this process)")
    parser.add_argument("--out", default=None, help=f"folder for runs.csv (default: {DEFAULT_OUT}/<task>)")
    parser.add_argument("--report-only", action="store_true", help="train nothing: tabulate <out>/runs.csv")
    args = parser.parse_args(argv)
    if min(args.seeds, args.epochs, args.jobs) < 1 or args.folds < 2:
        parser.error("--seeds, --epochs and --jobs must be at least 1, --folds at least 2")
    args.out = args.out or os.path.join(DEFAULT_OUT, args.task)
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    runs_path = os.path.join(args.out, "runs.csv")
    done = {(row["setting"], row["method"], int(row["seed"])) for row in read_done(runs_path)}  # type: ignore
    # Seed-major order: a partial benchmark already compares every method in every setting on its first seeds.
    jobs = [(args.task, method, setting, seed, args.epochs, args.folds)
            for seed in range(args.seeds) for setting in args.settings for method in args.methods
            if (setting, method, seed) not in done]
    if jobs and not args.report_only:
        print(f"{len(jobs)} jobs to do ({len(done)} already in {runs_path}), {args.jobs} process(es)", flush=True)
        pool = ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) if args.jobs > 1 else None
        results = pool.map(run_one, jobs) if pool is not None else map(run_one, jobs)
        for count, row in enumerate(results, start=1):
            append_row(runs_path, {**row, "epochs": args.epochs, "folds": args.folds})
            print(f"[{count}/{len(jobs)}] {row['setting']:>12} {row['method']:<15} seed {row['seed']}"
                  f" AUROC {float(row['auroc']):.3f} ({float(row['seconds']):.0f} s)", flush=True)  # type: ignore
        if pool is not None:
            pool.shutdown()
    rows = [row for row in read_done(runs_path) if row["method"] in args.methods and int(row["seed"]) < args.seeds]
    if not rows:
        print("No finished runs to report.")
        return 1
    for setting in args.settings:
        if any(row["setting"] == setting for row in rows):
            print(f"\n### {args.task}, {setting}\n")
            print(format_table(rows, setting))
    print(f"\n### {args.task}: AUROC of the score for the corrupted labels (mean ± s.e. over seeds)\n")
    print(format_overview(rows, args.settings))
    print(f"\nRuns: {runs_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
