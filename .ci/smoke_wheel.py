"""Smoke test of an installed wheel, run by .ci/run with the Python of a fresh virtualenv that holds the wheel (and
a CPU build of torch), from a folder outside the source tree: what a user who ran `pip install lightning-adalabel`
gets.

    python .ci/smoke_wheel.py README.md [--skip-demo]

1. the package imports from site-packages (not from the clone), with the wheel's version and its py.typed marker;
2. `adalabel recipes` lists the recipes shipped in the wheel;
3. README's usage script (the block below its `tested` marker) runs as written;
4. one recipe (agnews, fastText: no torchvision, no download) trains one tiny epoch from the YAML in the wheel, on
   generated CSV files, and writes its checkpoint;
5. `adalabel demo`, the quick start's first command, prints its table (about 3 minutes on 2 cores).
"""

import csv
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List

TESTED_MARKER = "<!-- tested: tests/test_readme.py -->"


def step(title: str, command: List[str], cwd: Path, timeout: int = 900) -> str:
    """Run ``command`` in ``cwd``; stop the smoke test with its output when it fails. Returns its stdout."""
    start = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        sys.exit(f"smoke test FAILED at {title}: exit status {result.returncode}\n{result.stdout[-3000:]}"
                 f"\n{result.stderr[-5000:]}")
    print(f"ok  {title} ({time.perf_counter() - start:.0f} s)", flush=True)
    return result.stdout


def usage_script(readme: Path) -> str:
    after = readme.read_text(encoding="utf-8").split(TESTED_MARKER, 1)[1]
    match = re.match(r"\s*```python\n(.*?)^```", after, re.DOTALL | re.MULTILINE)
    if match is None:
        sys.exit(f"smoke test FAILED: no ```python block below {TESTED_MARKER!r} in {readme}")
    return match.group(1)


def write_agnews_csvs(root: Path) -> None:
    """train.csv and test.csv as AG News ships them: no header, 1-based label, quoted title and description."""
    root.mkdir(parents=True)
    for split, rows in (("train", 32), ("test", 8)):
        with open(root / f"{split}.csv", "w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file, quoting=csv.QUOTE_ALL)
            for index in range(rows):
                label = index % 4 + 1
                writer.writerow([label, f"topic {label} headline {index}", f"words of topic {label}, item {index}"])


def main() -> None:
    readme = Path(sys.argv[1]).resolve()
    skip_demo = "--skip-demo" in sys.argv
    python = sys.executable
    adalabel = str(Path(python).parent / "adalabel")
    with tempfile.TemporaryDirectory(prefix="adalabel_wheel_smoke_") as folder:
        work = Path(folder)
        source_tree = str(readme.parent)
        where = step("import from site-packages", [python, "-c", (
            "import pathlib, lightning_adalabel as package; folder = pathlib.Path(package.__file__).parent;"
            " assert (folder / 'py.typed').is_file(), 'no py.typed';"
            " print(folder, package.__version__)")], work)
        folder_path, version = where.split()
        if folder_path.startswith(source_tree) or "site-packages" not in folder_path:
            sys.exit(f"smoke test FAILED: lightning_adalabel was imported from {folder_path}, not the wheel")
        print(f"    {folder_path} {version}")

        listing = step("adalabel recipes", [adalabel, "recipes"], work)
        names = [line.split()[0] for line in listing.splitlines() if line and not line.startswith(("run", "see"))]
        if not {"agnews", "cifar10", "imagenet", "conll2003"} <= set(names):
            sys.exit(f"smoke test FAILED: `adalabel recipes` printed {listing!r}")

        (work / "usage.py").write_text(usage_script(readme), encoding="utf-8")
        printed = step("README's usage script", [python, "usage.py"], work)
        if "tensor(" not in printed:
            sys.exit(f"smoke test FAILED: the usage script printed {printed!r}, not a row of Q")

        write_agnews_csvs(work / "ag_news_csv")
        step("adalabel fit --config agnews, one tiny epoch from the wheel's YAML", [
            adalabel, "fit", "--config", "agnews", "--data.root", "ag_news_csv", "--trainer.max_epochs", "1",
            "--trainer.limit_train_batches", "2", "--trainer.accelerator", "cpu", "--trainer.default_root_dir", "run",
            "--trainer.enable_progress_bar", "false", "--data.batch_size", "4", "--data.num_buckets", "4096",
            "--model.num_buckets", "4096",
        ], work)
        shipped = step("the recipe came from the wheel", [python, "-c", (
            "from lightning_adalabel.examples.recipes import recipe_paths; print(recipe_paths()['agnews'])")], work)
        if not shipped.strip().startswith(folder_path) or not list((work / "run").glob("**/last.ckpt")):
            sys.exit(f"smoke test FAILED: the recipe was read from {shipped.strip()}, or no last.ckpt was written")

        if not skip_demo:
            table = step("adalabel demo", [adalabel, "demo", "--no-progress-bar"], work, timeout=1800)
            if not all(f"| {method} |" in table for method in ("none", "label_smoothing", "ols", "alr")):
                sys.exit(f"smoke test FAILED: `adalabel demo` printed {table[-2000:]!r}")
            print(table[table.index("| method"):].rstrip() if "| method" in table else table[-1500:])
    print(f"wheel smoke test passed ({os.path.basename(folder_path)} {version})")


if __name__ == "__main__":
    main()
