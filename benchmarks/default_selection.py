"""Choose the ``alr`` default by the rule written in docs/benchmarks.md before the runs.

Runs every candidate on both accuracy tasks, all five label settings, seeds 0 to 9 (and OLS and label smoothing, for
the comparison, with ``--baseline-seeds``, 5 by default), through ``benchmarks/accuracy.py``'s harness; reuses the runs of identical settings already
in ``benchmarks/results/{accuracy,superclasses}/runs.csv``; then applies the rule and prints the tables:

1. a candidate is eligible if in no (task, setting) cell its mean paired difference to ``today`` is below minus one
   standard error of that difference (over the paired seeds);
2. the default is the eligible candidate with the highest mean accuracy over all cells; within 0.05 points, the one
   with fewer changes from ``today`` (then the smaller strength) wins.

Every candidate spells its settings out, so the names keep their meaning whatever the preset's defaults become.

Usage::

    python benchmarks/default_selection.py --jobs 2                # run what is missing, then report
    python benchmarks/default_selection.py --report-only           # the tables from finished runs
"""

import argparse
import math
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from accuracy import SETTINGS, append_row, read_done, run_one  # noqa: E402  (beside this file)

HERE = os.path.dirname(os.path.abspath(__file__))
TASKS = ("digits", "superclasses")
EARLIER_RESULTS = {"digits": "accuracy", "superclasses": "superclasses"}
TODAY = {"preset": "alr", "samples": "misclassified", "estimator": "mean", "loss": "decoupled", "alpha": 1.0,
         "momentum": 1.0, "prior": "uniform", "prior_strength": 0.0}

# name -> (AdaLabel keyword arguments, number of changes from today, strength; the name the same setting had in
# benchmarks/accuracy.py's grid, whose runs are reused)
CANDIDATES: Dict[str, Tuple[Dict[str, object], int, float, Optional[str]]] = {
    "today": (TODAY, 0, 0.0, "alr"),
    "uniform-0.01": ({**TODAY, "prior_strength": 0.01}, 1, 0.01, None),
    "uniform-0.03": ({**TODAY, "prior_strength": 0.03}, 1, 0.03, "alr[prior_strength=0.03]"),
    "uniform-0.1": ({**TODAY, "prior_strength": 0.1}, 1, 0.1, "alr[prior_strength=0.1]"),
    "previous-0.3": ({**TODAY, "prior": "previous", "prior_strength": 0.3}, 2, 0.3,
                     "alr[prior=previous,prior_strength=0.3]"),
    "previous-1": ({**TODAY, "prior": "previous", "prior_strength": 1.0}, 2, 1.0,
                   "alr[prior=previous,prior_strength=1.0]"),
    "previous-3": ({**TODAY, "prior": "previous", "prior_strength": 3.0}, 2, 3.0,
                   "alr[prior=previous,prior_strength=3.0]"),
    "uniform-0.03-momentum-0.5": ({**TODAY, "prior_strength": 0.03, "momentum": 0.5}, 2, 0.03, None),
}
BASELINES: Dict[str, Tuple[Dict[str, object], Optional[str]]] = {
    "ols": ({"preset": "ols"}, "ols"),
    "label_smoothing": ({"preset": "label_smoothing"}, "label_smoothing"),
}


def methods(baselines: bool = True) -> Dict[str, Tuple[Dict[str, object], Optional[str]]]:
    """The methods this script runs: name -> (keyword arguments, earlier name)."""
    candidates = {name: (kwargs, earlier) for name, (kwargs, _, _, earlier) in CANDIDATES.items()}
    return {**candidates, **BASELINES} if baselines else candidates


def import_earlier_runs(task: str, runs_path: str, seeds: int) -> int:
    """Copy the runs of identical settings from the earlier grid (renamed), once; return how many."""
    earlier_path = os.path.join(HERE, "results", EARLIER_RESULTS[task], "runs.csv")
    done = {(row["setting"], row["method"], int(row["seed"])) for row in read_done(runs_path)}  # type: ignore
    renamed = {earlier: name for name, (_, earlier) in methods().items() if earlier is not None}
    copied = 0
    for row in read_done(earlier_path):
        name = renamed.get(str(row["method"]))
        if name is None or int(row["seed"]) >= seeds or (row["setting"], name, int(row["seed"])) in done:
            continue
        append_row(runs_path, {**row, "method": name})
        copied += 1
    return copied


def per_seed(rows: List[Dict[str, object]], method: str, setting: str) -> Dict[int, float]:
    return {int(row["seed"]): 100 * float(row["accuracy"]) for row in rows  # type: ignore[arg-type]
            if row["method"] == method and row["setting"] == setting}


def mean_and_error(values: Sequence[float]) -> Tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, float("nan")
    variance = sum((value - mean) ** 2 for value in values) / (len(values) - 1)
    return mean, math.sqrt(variance / len(values))


def select(results: Dict[str, List[Dict[str, object]]], seeds: int) -> Tuple[Optional[str], List[Dict[str, object]]]:
    """Apply the rule to the runs of every task: the chosen candidate and one row per candidate with its cells
    (mean, paired difference to today and its standard error), eligibility and overall mean.

    Example:
        >>> rows = [{"method": method, "setting": "clean", "seed": seed, "accuracy": accuracy}
        ...         for method, accuracies in {"today": [0.90, 0.92], "uniform-0.03": [0.91, 0.93],
        ...                                    "uniform-0.1": [0.88, 0.90]}.items()
        ...         for seed, accuracy in enumerate(accuracies)]
        >>> choice, table = select({"digits": rows}, seeds=2)
        >>> choice, [(row["candidate"], row["eligible"]) for row in table]
        ('uniform-0.03', [('today', True), ('uniform-0.03', True), ('uniform-0.1', False)])
    """
    table = []
    for name, (_, changes, strength, _) in CANDIDATES.items():
        cells, eligible, accuracies = {}, True, []
        for task, rows in results.items():
            for setting in SETTINGS:
                ours, today = per_seed(rows, name, setting), per_seed(rows, "today", setting)
                paired = [seed for seed in range(seeds) if seed in ours and seed in today]
                if not paired:
                    continue
                mean, error = mean_and_error([ours[seed] for seed in paired])
                difference, difference_error = mean_and_error([ours[seed] - today[seed] for seed in paired])
                # Step 1: no cell lost by more than one standard error of the paired difference.
                if name != "today" and difference < -(difference_error if math.isfinite(difference_error) else 0.0):
                    eligible = False
                cells[(task, setting)] = (mean, error, difference, difference_error, len(paired))
                accuracies.append(mean)
        if cells:
            table.append({"candidate": name, "changes": changes, "strength": strength, "cells": cells,
                          "eligible": eligible, "overall": sum(accuracies) / len(accuracies)})
    eligible = [row for row in table if row["eligible"]]
    if not eligible:
        return None, table
    best = max(float(row["overall"]) for row in eligible)  # type: ignore[arg-type]
    # Step 2: the best on average; within 0.05 points, the fewest changes, then the smaller strength.
    close = [row for row in eligible if float(row["overall"]) >= best - 0.05]  # type: ignore[arg-type]
    choice = min(close, key=lambda row: (row["changes"], row["strength"], -float(row["overall"])))  # type: ignore
    return str(choice["candidate"]), table


def report(results: Dict[str, List[Dict[str, object]]], seeds: int) -> Optional[str]:
    choice, table = select(results, seeds)
    for task, rows in results.items():
        print(f"\n**{task}**, test accuracy (%), mean ± s.e. over the seeds; under each candidate, its paired"
              " difference to `today` ± s.e.\n")
        print("| method | " + " | ".join(SETTINGS) + " |")
        print("|---|" + "---|" * len(SETTINGS))
        for name in list(CANDIDATES) + list(BASELINES):
            means = []
            for setting in SETTINGS:
                values = list(per_seed(rows, name, setting).values())
                if not values:
                    means.append("")
                    continue
                mean, error = mean_and_error(values)
                means.append(f"{mean:.2f} ± {error:.2f} ({len(values)})")
            print(f"| {name} | " + " | ".join(means) + " |")
            row = next((row for row in table if row["candidate"] == name), None)
            if row is not None and name != "today":
                differences = []
                for setting in SETTINGS:
                    cell = row["cells"].get((task, setting))  # type: ignore[union-attr]
                    lost = cell is not None and cell[2] < -cell[3]
                    differences.append("" if cell is None else
                                       f"{'**' if lost else ''}{cell[2]:+.2f} ± {cell[3]:.2f}{'**' if lost else ''}")
                print("| &nbsp;&nbsp;vs today | " + " | ".join(differences) + " |")
    print("\nThe rule (docs/benchmarks.md): eligible = no cell lost by more than one standard error of the paired"
          " difference (bold above); the choice = the best eligible mean over all cells.\n")
    print("| candidate | eligible | mean over all cells |")
    print("|---|---|---|")
    for row in sorted(table, key=lambda row: -float(row["overall"])):  # type: ignore[arg-type]
        print(f"| {row['candidate']} | {'yes' if row['eligible'] else 'no'} | {float(row['overall']):.3f} |")
    print(f"\nChosen default: {choice}")
    return choice


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--seeds", type=int, default=10, help="seeds per candidate")
    parser.add_argument("--baseline-seeds", type=int, default=5,
                        help="seeds per baseline (OLS, label smoothing); the earlier grid has 5")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--jobs", type=int, default=1, help="worker processes, one CPU thread each")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "default_selection"))
    parser.add_argument("--report-only", action="store_true")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    results: Dict[str, List[Dict[str, object]]] = {}
    for task in args.tasks:
        folder = os.path.join(args.out, task)
        os.makedirs(folder, exist_ok=True)
        runs_path = os.path.join(folder, "runs.csv")
        if not args.report_only:
            copied = import_earlier_runs(task, runs_path, args.seeds)
            done = {(row["setting"], row["method"], int(row["seed"])) for row in read_done(runs_path)}  # type: ignore
            jobs = [(name, kwargs, setting, seed, args.epochs, task)
                    for name, (kwargs, _) in methods(args.baseline_seeds > 0).items()
                    for setting in SETTINGS
                    for seed in range(args.seeds if name in CANDIDATES else args.baseline_seeds)
                    if (setting, name, seed) not in done]
            print(f"{task}: {copied} runs reused from the earlier grid, {len(jobs)} to do", flush=True)
            with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
                for count, row in enumerate(pool.map(run_one, jobs), start=1):
                    append_row(runs_path, row)
                    print(f"[{task} {count}/{len(jobs)}] {row['setting']:>13} {row['method']:<26} seed {row['seed']}"
                          f" acc {100 * float(row['accuracy']):.2f}%", flush=True)
        results[task] = [row for row in read_done(runs_path) if int(row["seed"]) < args.seeds]  # type: ignore
    return 0 if report(results, args.seeds) is not None else 1


if __name__ == "__main__":
    sys.exit(main())
