"""Accuracy benchmark: every preset and the ALR variants, clean and with label noise, on two tasks.

``--task digits`` (default): scikit-learn's digits, 10 classes, a small CNN. ``--task superclasses``: 50 classes in
10 superclasses of 5 (benchmarks/superclasses.py), a small MLP; harder, and with class structure for Q to learn.
Every run goes through the package's own API (``run_digits(..., callback=AdaLabel(...))``: a real Trainer, the
callback and the mixin), so the numbers are those a user gets. The ALR variants move one knob at a time away from
the current ``alr`` preset, so the table says what each default is worth.

Usage::

    python benchmarks/accuracy.py --seeds 5 --jobs 2 --out benchmark_results/accuracy
    python benchmarks/accuracy.py --seeds 1 --epochs 5 --settings clean flip-40 --variants none alr  # smoke test
    python benchmarks/accuracy.py --report-only --out benchmark_results/accuracy  # tables from finished runs
    python benchmarks/accuracy.py --task superclasses --seeds 5 --jobs 2 --out benchmark_results/superclasses

Runs already in ``<out>/runs.csv`` are skipped, so an interrupted benchmark resumes where it stopped.
"""

import argparse
import csv
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from typing import Dict, List, Optional, Sequence, Tuple

from lightning_adalabel import PRESETS, AdaLabel
from lightning_adalabel.examples.demo import RunResult, format_table, summarize, write_csv

TASKS = ("digits", "superclasses")

BASELINES = ("none", "label_smoothing", "ols", "ols_official", "alr")
# The knobs of the ALR preset and the values the benchmark tries, one knob at a time.
ALR_KNOBS: Dict[str, Tuple[object, ...]] = {
    "samples": ("misclassified", "all", "correct"),
    "estimator": ("mean", "geometric", "confusion"),
    "loss": ("decoupled", "mixed"),
    "alpha": (0.1, 0.3, 0.5, 1.0),
    # Count-aware refresh: pseudo-count per sample of the class seen since the last refresh (0: off).
    "prior_strength": (0.0, 0.03, 0.1, 0.3, 1.0),
    "prior": ("uniform", "previous"),
}
# Knob values that only make sense with another knob moved too: the 'mixed' loss with the default alpha of 1.0
# would give the true class no target mass (AdaLabel refuses it), so it is tried at alpha 0.5.
# The 'previous' prior only acts with a pseudo-count, so it is tried at 0.3.
KNOB_COMPANIONS: Dict[Tuple[str, object], Dict[str, object]] = {
    ("loss", "mixed"): {"alpha": 0.5},
    ("prior", "previous"): {"prior_strength": 0.3},
}
# Variants that move several knobs at once: the 'previous' prior at other strengths, and it with the confusion
# estimator (the two changes that did best on clean and on class-dependent noise, one knob at a time).
COMBINATIONS: Tuple[Dict[str, object], ...] = (
    {"prior": "previous", "prior_strength": 1.0},
    {"prior": "previous", "prior_strength": 3.0},
    {"estimator": "confusion", "prior": "previous", "prior_strength": 0.3},
)


@dataclass(frozen=True)
class Setting:
    """A training-label condition: ``noise`` fraction of labels corrupted by ``noise_type``."""

    name: str
    noise: float
    noise_type: str = "flip"


SETTINGS = {
    setting.name: setting
    for setting in (
        Setting("clean", 0.0),
        Setting("symmetric-20", 0.2, "symmetric"),
        Setting("symmetric-40", 0.4, "symmetric"),
        Setting("flip-20", 0.2, "flip"),
        Setting("flip-40", 0.4, "flip"),
    )
}


def method_grid() -> Dict[str, Dict[str, object]]:
    """Method name -> ``AdaLabel`` keyword arguments: the presets, then one-knob ALR variants.

    Example:
        >>> grid = method_grid()
        >>> grid["alr"], grid["alr[estimator=geometric]"]
        ({'preset': 'alr'}, {'preset': 'alr', 'estimator': 'geometric'})
        >>> len(grid)
        21
    """
    grid: Dict[str, Dict[str, object]] = {name: {"preset": name} for name in BASELINES}
    default = PRESETS["alr"]
    for knob, values in ALR_KNOBS.items():
        for value in values:
            if value != getattr(default, knob):
                changes = {knob: value, **KNOB_COMPANIONS.get((knob, value), {})}
                grid["alr[" + ",".join(f"{name}={setting}" for name, setting in changes.items()) + "]"] = {
                    "preset": "alr", **changes}
    for changes in COMBINATIONS:
        grid["alr[" + ",".join(f"{name}={setting}" for name, setting in changes.items()) + "]"] = {
            "preset": "alr", **changes}
    return grid


def run_one(job: Tuple[str, Dict[str, object], str, int, int, str]) -> Dict[str, object]:
    """Train and evaluate one (method, setting, seed) of ``task``; runs in a worker process."""
    import torch

    method, kwargs, setting_name, seed, epochs, task = job
    torch.set_num_threads(1)  # one core per worker: --jobs 2 on a 2-core machine uses both without contention
    setting = SETTINGS[setting_name]
    if task == "digits":
        from lightning_adalabel.examples.demo import NUM_CLASSES, run_digits as run
    else:  # benchmarks/superclasses.py, beside this file (the worker's path starts at this file's folder)
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from superclasses import NUM_CLASSES, run_superclasses as run
    result, _ = run(
        method, seed, setting.noise, epochs, progress_bar=False, noise_type=setting.noise_type,
        callback=AdaLabel(num_classes=NUM_CLASSES, **kwargs),  # type: ignore[arg-type]
    )
    return {"setting": setting_name, **asdict(result)}


def read_done(path: str) -> List[Dict[str, object]]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def append_row(path: str, row: Dict[str, object]) -> None:
    new = not os.path.exists(path)
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def to_result(row: Dict[str, object]) -> RunResult:
    return RunResult(
        str(row["method"]), int(row["seed"]), float(row["noise"]),  # type: ignore[arg-type]
        *(float(row[field]) for field in ("accuracy", "nll", "ece", "seconds")),  # type: ignore[arg-type]
    )


def plot(summaries: Dict[str, List[Dict[str, object]]], path: str, task: str = "digits") -> None:
    """Grouped bars: test accuracy (mean and standard error) of every method in every setting."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    settings = list(summaries)
    methods = list(dict.fromkeys(row["method"] for rows in summaries.values() for row in rows))
    figure = Figure(figsize=(max(8.0, 1.6 * len(settings) * max(1.0, len(methods) / 6)), 5.0))
    axes = figure.add_subplot()
    width = 0.8 / len(methods)
    colors = matplotlib.colormaps["tab20"]
    for index, method in enumerate(methods):
        xs, ys, errors = [], [], []
        for position, setting in enumerate(settings):
            row = next((row for row in summaries[setting] if row["method"] == method), None)
            if row is not None:
                xs.append(position - 0.4 + (index + 0.5) * width)
                ys.append(100 * float(row["accuracy"]))  # type: ignore[arg-type]
                errors.append(100 * float(row["accuracy_se"]))  # type: ignore[arg-type]
        axes.bar(xs, ys, width, yerr=errors, label=method, color=colors(index % 20), capsize=1.5)
    low = min(100 * float(row["accuracy"]) for rows in summaries.values() for row in rows)  # type: ignore[arg-type]
    axes.set_ylim(max(0.0, low - 5.0), 100.0)
    axes.set_xticks(range(len(settings)), labels=settings)
    axes.set_ylabel("test accuracy (%)")
    title = {"digits": "Digits", "superclasses": "Superclasses (50 classes in 10 groups of 5)"}[task]
    axes.set_title(f"{title}: test accuracy by training-label condition (mean ± s.e. over seeds)")
    axes.legend(fontsize=7, ncol=2, loc="lower left")
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    grid = method_grid()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="digits", choices=TASKS,
                        help="digits (10 classes, scikit-learn) or superclasses (50 classes in 10 groups of 5,"
                             " benchmarks/superclasses.py)")
    parser.add_argument("--seeds", type=int, default=5, help="seeds per (method, setting) (default: 5)")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--variants", nargs="+", default=list(grid), metavar="METHOD",
                        help=f"methods to run (default: all): {', '.join(grid)}")
    parser.add_argument("--epochs", type=int, default=30, help="training epochs per run (default: 30)")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes, one CPU thread each (default: 1)")
    parser.add_argument("--out", default="benchmark_results/accuracy", help="folder for CSVs and the plot")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: tabulate the runs already in <out>/runs.csv")
    args = parser.parse_args(argv)
    unknown = [name for name in args.variants if name not in grid]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(grid)}")
    if min(args.seeds, args.epochs, args.jobs) < 1:
        parser.error("--seeds, --epochs and --jobs must be at least 1")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    runs_path = os.path.join(args.out, "runs.csv")
    grid = method_grid()
    done = {(row["setting"], row["method"], int(row["seed"])) for row in read_done(runs_path)}  # type: ignore
    # Method-major order: every setting of one method finishes before the next method starts, so a partial run
    # already compares the first methods (the presets) everywhere.
    jobs = [
        (method, grid[method], setting, seed, args.epochs, args.task)
        for method in args.variants for setting in args.settings for seed in range(args.seeds)
        if (setting, method, seed) not in done
    ]
    if not args.report_only:
        print(f"{len(jobs)} runs to do ({len(done)} already in {runs_path}), {args.jobs} process(es)", flush=True)
    if jobs and not args.report_only:
        with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
            for count, row in enumerate(pool.map(run_one, jobs), start=1):
                append_row(runs_path, row)
                print(f"[{count}/{len(jobs)}] {row['setting']:>13} {row['method']:<28} seed {row['seed']}"
                      f" acc {100 * float(row['accuracy']):.2f}%  ({float(row['seconds']):.1f} s)", flush=True)

    if args.report_only:  # also tabulate methods of earlier runs that the current grid no longer names
        args.variants += [method for method in dict.fromkeys(row["method"] for row in read_done(runs_path))
                          if method not in args.variants]
    rows = [row for row in read_done(runs_path) if row["setting"] in args.settings and row["method"] in args.variants
            and int(row["seed"]) < args.seeds]  # type: ignore[arg-type]
    summaries: Dict[str, List[Dict[str, object]]] = {}
    summary_rows = []
    for setting in args.settings:
        results = [to_result(row) for method in args.variants for row in rows
                   if row["setting"] == setting and row["method"] == method]
        if not results:
            continue
        summaries[setting] = summarize(results)
        summary_rows += [{"setting": setting, **row} for row in summaries[setting]]
        best = max(summaries[setting], key=lambda row: row["accuracy"])
        setting_info = SETTINGS[setting]
        noise = f"{setting_info.noise:.0%} {setting_info.noise_type} noise" if setting_info.noise else "clean labels"
        seeds = sorted({row["seeds"] for row in summaries[setting]})
        print(f"\n### {setting} ({noise}, {args.epochs} epochs, {'/'.join(map(str, seeds))} seeds;"
              f" best accuracy: {best['method']})\n")
        print(format_table(summaries[setting]))
    if not summary_rows:
        print("No finished runs to report.")
        return 1
    write_csv(os.path.join(args.out, "summary.csv"), summary_rows)
    plot(summaries, os.path.join(args.out, "accuracy.png"), args.task)
    print(f"\nResults: {runs_path}, {os.path.join(args.out, 'summary.csv')}, {os.path.join(args.out, 'accuracy.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
