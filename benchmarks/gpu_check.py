"""Every GPU claim of the project, checked by one command that prints one table and writes every figure as JSON.

The steps, each a row (or a few) of the table with pass/fail and its figure:

1. **the CUDA tests**, ``pytest tests -m gpu``: among them the sync-debug test
   (``torch.cuda.set_sync_debug_mode("error")`` around every batch after the first) for the dense and the ``top_k``
   engines, eager and ``compile_loss=True``, and a checkpoint restored onto the GPU;
2. **the fused loss against float64**: values and gradients of the loss the callback computes
   (``LabelMatrix.loss``: one softmax of the logits), eager and compiled, with logits from a linear layer run in
   float32 and under bf16 and fp16 autocast, against the same logits' loss and gradient computed in float64 from the
   method's formulas;
3. **what a training step costs**, ``benchmarks/overhead.py``: ResNet-50 at K=1000, bf16, channels-last, the Lightning
   step with ALR (eager and ``compile_loss``) against plain cross-entropy (target: ratio at most 1.01), and one batch
   of 256 at K = 10, 1000 and 32,000 (the vocabulary of a small language model), eager and compiled;
4. **large K**, ``benchmarks/large_k.py``: ``AdaLabel(top_k=64)`` at K = 100,000, peak device memory and ms per step
   against cross-entropy;
5. **the ImageNet recipe**, ``adalabel fit --config imagenet`` on generated JPEGs: bf16, DDP (NCCL on a GPU), one
   epoch with its ``last.ckpt``, then ``--ckpt_path last`` continues it for a second epoch.

Usage::

    python benchmarks/gpu_check.py --device cuda            # sized for 8 minutes on one H100 (not run yet)
    python benchmarks/gpu_check.py --device cpu             # the same steps at small sizes, a minute or two
    python benchmarks/gpu_check.py --device cuda --dry-run  # what each step would run, without running it

``--device cpu`` runs every step's CPU twin (small sizes; the CUDA tests' CPU layers, the meta-tensor and static
no-sync checks), so that the plumbing is proven before a GPU sees it; its performance figures are not judged against
the GPU targets. The results go to ``--out`` (default ``gpu_check/``): ``gpu_check.json`` (every figure, the
environment, each command), ``gpu_check.md`` (the table) and ``gpu_check.log`` (each step's output). The exit status
is 0 when every row passes.

It runs from a clone of the repository (the tests are not in the wheel) with the ``[test]`` extra installed, or on a
machine without network access with what the ImageNet step needs (Lightning, torchvision, ``jsonargparse[signatures]``:
jsonargparse, docstring-parser and typeshed-client are pure-Python wheels that can be carried). The package itself need
not be installed: the steps import it from the clone.
"""

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the package from this clone, installed or not

from lightning_adalabel.label_matrix import LabelMatrix  # noqa: E402

# Sizes per device: the GPU ones are the issue's; the CPU ones keep the whole run to a minute or two on 2 cores.
SIZES: Dict[str, Dict[str, Any]] = {
    "cuda": {
        "loss_classes": [10, 1000, 32000], "loss_batch": 256, "loss_compiled_classes": [1000],
        "overhead": ["--model", "resnet50", "--precision", "bf16-mixed", "--channels-last", "--num-classes", "1000",
                     "--batch-size", "64", "--image-size", "224", "--steps", "40", "--warmup", "10", "--rounds", "3",
                     "--micro-classes", "10", "1000", "32000", "--repeats", "50", "--batches-on-device"],
        "large_k": ["--num-classes", "100000", "--top-k", "64", "--steps", "100", "--refresh-every", "50",
                    "--batch-size", "512", "--dense-up-to", "0"],
        "imagenet": {"per_class": 16, "image_size": (320, 280), "batch_size": 4, "workers": 4, "train_batches": 4,
                     "crop": 224, "resize": 256},
        "timeout": {"tests": 300, "overhead": 300, "large_k": 180, "imagenet": 240},
    },
    "cpu": {
        "loss_classes": [10, 1000], "loss_batch": 64, "loss_compiled_classes": [1000],
        "overhead": ["--model", "small_cnn", "--precision", "bf16-mixed", "--channels-last", "--num-classes", "10",
                     "--batch-size", "16", "--image-size", "32", "--steps", "3", "--warmup", "1", "--rounds", "1",
                     "--micro-classes", "10", "--repeats", "5", "--batches-on-device"],
        "large_k": ["--num-classes", "2000", "--top-k", "16", "--steps", "20", "--refresh-every", "10",
                    "--batch-size", "128", "--dense-up-to", "0"],
        "imagenet": {"per_class": 4, "image_size": (48, 40), "batch_size": 2, "workers": 0, "train_batches": 2,
                     "crop": 32, "resize": 36},
        # Generous: a CPU shared with other jobs runs these several times slower than an idle one.
        "timeout": {"tests": 600, "overhead": 600, "large_k": 600, "imagenet": 600},
    },
}
TRAINING_STEP_TARGET = 1.01  # the ALR step over plain cross-entropy's, ResNet-50 on a GPU
# ||out - ref|| / ||ref|| allowed per logits dtype: the loss is computed in float32 whatever the logits' dtype, so its
# value matches to float32 rounding; the gradient is returned in the logits' dtype, so it carries that dtype's rounding
# (2^-8 for bf16, 2^-11 for fp16, relative, per element).
LOSS_TOLERANCE = {"float32": (1e-5, 1e-5), "bfloat16": (1e-5, 1e-2), "float16": (1e-5, 2e-3)}


def row(check: str, ok: bool, figure: str, target: str, **details: Any) -> Dict[str, Any]:
    return {"check": check, "status": "pass" if ok else "FAIL", "figure": figure, "target": target,
            "details": details}


RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")


class Runner:
    """Runs commands with a time limit, their output appended to the log, the repository on ``PYTHONPATH``."""

    def __init__(self, log_path: Path, dry_run: bool) -> None:
        self.log_path = log_path
        self.dry_run = dry_run
        self.commands: List[List[str]] = []

    def log(self, text: str) -> None:
        with open(self.log_path, "a", encoding="utf-8") as log:
            log.write(text + "\n")

    def __call__(self, command: List[str], timeout: int, cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
        self.commands.append(command)
        shown = " ".join(command)
        if self.dry_run:
            print(f"  {shown}")
            return subprocess.CompletedProcess(command, 0, "", "")
        # Each command is a run of its own: a rendezvous address or rank left in this environment (a launcher or an
        # earlier ddp_spawn fit in the calling process sets MASTER_PORT) would send it to a port that may be taken.
        environment = {key: value for key, value in os.environ.items() if key not in RENDEZVOUS}
        environment["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
        self.log(f"\n$ {shown}")
        try:
            result = subprocess.run(command, cwd=cwd or REPO, env=environment, capture_output=True, text=True,
                                    timeout=timeout)
        except subprocess.TimeoutExpired as expired:  # its output comes as bytes, whatever `text` says
            output = b"".join(part for part in (expired.stdout, expired.stderr) if part).decode(errors="replace")
            self.log(f"{output}\n(stopped after {timeout} s)")
            return subprocess.CompletedProcess(command, 124, output, f"timed out after {timeout} s")
        self.log(result.stdout + result.stderr + f"(exit status {result.returncode})")
        return result


def last_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    return lines[-1].strip()[:200] if lines else f"exit status {result.returncode}"


# ---- 1. the CUDA tests ---------------------------------------------------------------------------------------------


def check_tests(device: str, run: Runner, sizes: Dict[str, Any]) -> List[Dict[str, Any]]:
    if device == "cuda":
        selection = ["tests", "-m", "gpu", "--continue-on-collection-errors"]
        name, target = "pytest -m gpu (sync debug: dense, top_k, eager, compiled; resume on the GPU)", "all pass"
    else:  # the CPU layers of the same no-sync check: meta tensors and the static read of the per-batch source
        selection = ["tests/test_sync.py", "-m", "not gpu"]
        name, target = "pytest tests/test_sync.py -m 'not gpu' (CPU twin: meta tensors, static check)", "all pass"
    result = run([sys.executable, "-m", "pytest", *selection, "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
                  "-o", "addopts="], sizes["timeout"]["tests"])
    if run.dry_run:
        return []
    summary = last_line(result)
    counts = {word: int(number) for number, word in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", summary)}
    passed = result.returncode == 0 and counts.get("passed", 0) > 0 and not counts.get("skipped", 0)
    return [row(name, passed, summary, target, **counts)]


# ---- 2. the fused loss against the float64 formulas --------------------------------------------------------------


def reference_loss(logits: torch.Tensor, target: torch.Tensor, matrix: torch.Tensor, alpha: float) -> torch.Tensor:
    """The decoupled loss in float64, from its definition: ``CE(z, y) + alpha sum_j Q[y, j] (-log p_res_j)``, with
    ``p_res = softmax(z, z_y = -inf)``; mean over the batch."""
    true_class = F.one_hot(target, logits.shape[1]).bool()
    cross_entropy = F.cross_entropy(logits, target, reduction="none")
    log_residual = torch.log_softmax(logits.masked_fill(true_class, float("-inf")), dim=1)
    residual = -(matrix[target] * log_residual.masked_fill(true_class, 0.0)).sum(dim=1)
    return (cross_entropy + alpha * residual).mean()


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.double() - reference).norm() / reference.norm().clamp_min(1e-300))


def loss_errors(device: str, num_classes: int, batch: int, dtype: torch.dtype, compiled: bool) -> Dict[str, float]:
    """Relative errors of the loss value and of its gradient with respect to the logits."""
    generator = torch.Generator().manual_seed(num_classes)
    features = (3.0 * torch.randn(batch, 64, generator=generator)).to(device)
    head = torch.nn.Linear(64, num_classes).to(device)
    target = torch.randint(0, num_classes, (batch,), generator=generator).to(device)
    matrix = torch.rand(num_classes, num_classes, generator=generator).fill_diagonal_(0.0)
    matrix = (matrix / matrix.sum(dim=1, keepdim=True)).to(device)
    engine = LabelMatrix(num_classes, device=device, initial_matrix=matrix, compile_loss=compiled)
    with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
        logits = head(features)
        logits.retain_grad()
        loss, _ = engine.loss(logits, target, "decoupled", 1.0)
    loss.backward()
    assert logits.dtype == dtype and loss.dtype == torch.float32, (logits.dtype, loss.dtype)
    exact = logits.detach().double().requires_grad_()
    expected = reference_loss(exact, target, matrix.double(), 1.0)
    expected.backward()
    return {"value": relative_error(loss.detach(), expected.detach()),
            "gradient": relative_error(logits.grad, exact.grad)}


def check_loss(device: str, run: Runner, sizes: Dict[str, Any]) -> List[Dict[str, Any]]:
    cases = [(k, False) for k in sizes["loss_classes"]] + [(k, True) for k in sizes["loss_compiled_classes"]]
    if run.dry_run:
        print(f"  in this process: LabelMatrix.loss against float64 at K, compiled = {cases}, B={sizes['loss_batch']}")
        return []
    rows = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        name = str(dtype).replace("torch.", "")
        errors = {f"K={k}{' compiled' if compiled else ''}":
                  loss_errors(device, k, sizes["loss_batch"], dtype, compiled) for k, compiled in cases}
        worst_value = max(error["value"] for error in errors.values())
        worst_gradient = max(error["gradient"] for error in errors.values())
        value_tolerance, gradient_tolerance = LOSS_TOLERANCE[name]
        context = "float32" if dtype == torch.float32 else f"{name} autocast"
        rows.append(row(
            f"fused loss vs float64, {context} (K={', '.join(map(str, sizes['loss_classes']))}; eager and compiled)",
            worst_value <= value_tolerance and worst_gradient <= gradient_tolerance,
            f"value {worst_value:.1e}, gradient {worst_gradient:.1e} (largest relative error)",
            f"<= {value_tolerance:.0e}, <= {gradient_tolerance:.0e}", **errors,
        ))
    return rows


# ---- 3. overhead.py: the training step and one batch -------------------------------------------------------------


def finite(*values: float) -> bool:
    return all(np.isfinite(value) and value > 0 for value in values)


class StepFailed(Exception):
    """A step that produced no figures; its message becomes the row's figure."""


def run_benchmark(script: str, device: str, run: Runner, sizes: Dict[str, Any], work: Path) -> Optional[Dict[str, Any]]:
    """``benchmarks/<script>.py`` at this device's sizes; the figures of its ``--json`` file (None in a dry run)."""
    output = work / f"{script}.json"
    result = run([sys.executable, str(REPO / "benchmarks" / f"{script}.py"), "--device", device, *sizes[script],
                  "--json", str(output)], sizes["timeout"][script])
    if run.dry_run:
        return None
    if result.returncode != 0 or not output.exists():
        raise StepFailed(f"benchmarks/{script}.py: {last_line(result)}")
    return json.loads(output.read_text())


def check_overhead(device: str, run: Runner, sizes: Dict[str, Any], work: Path) -> List[Dict[str, Any]]:
    figures = run_benchmark("overhead", device, run, sizes, work)
    if figures is None:
        return []
    arguments = figures["arguments"]
    judged = device == "cuda"
    ratios = {entry["loop"]: entry["ratio"] for entry in figures["training"]}
    alr, compiled = ratios["AdaLabel preset=alr"], ratios.get("AdaLabel preset=alr, compile_loss", float("nan"))
    step = next(entry["median_ms"] for entry in figures["training"] if entry["loop"] == "plain F.cross_entropy")
    rows = [row(
        f"training step, {arguments['model']} K={arguments['num_classes']} {arguments['precision']}"
        f"{', channels-last' if arguments['channels_last'] else ''}: ALR / plain CE",
        (alr <= TRAINING_STEP_TARGET and compiled <= TRAINING_STEP_TARGET) if judged else finite(alr, compiled),
        f"eager {alr:.3f}, compile_loss {compiled:.3f} (CE step {step:.1f} ms)",
        f"<= {TRAINING_STEP_TARGET}" if judged else f"GPU: <= {TRAINING_STEP_TARGET}; CPU: runs",
        training=figures["training"],
    )]
    for entry in figures["micro"]:
        rows.append(row(
            f"one batch of 256 at K={entry['K']}: ALR / F.cross_entropy",
            finite(entry["alr_over_ce"], entry["alr_compiled_over_ce"]),
            f"eager {entry['alr_over_ce']:.2f}x, compiled {entry['alr_compiled_over_ce']:.2f}x"
            f" (CE {entry['ce_ms']:.3f} ms)", "reported", **entry,
        ))
    return rows


# ---- 4. large_k.py: top_k at K = 100,000 -------------------------------------------------------------------------


def check_large_k(device: str, run: Runner, sizes: Dict[str, Any], work: Path) -> List[Dict[str, Any]]:
    figures = run_benchmark("large_k", device, run, sizes, work)
    return [] if figures is None else large_k_rows(figures)


def large_k_rows(figures: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The large-K row from ``large_k.py --json``'s figures (``tests/test_large_k_benchmark.py`` reads its own run
    with this too)."""
    speed = figures["speed"]
    ce, sparse = speed[0], speed[1]
    memory = sparse.get("peak_cuda_gb", sparse["peak_rss_gb"])
    where = "CUDA" if "peak_cuda_gb" in sparse else "RSS"
    return [row(
        f"{sparse['method']} at K={sparse['K']:,}: peak memory and ms/step against CE",
        finite(sparse["step_ms"], memory) and sparse["precision"] > 0.5,
        f"peak {where} {memory:.2f} GB (CE {ce.get('peak_cuda_gb', ce['peak_rss_gb']):.2f}),"
        f" {sparse['step_ms']:.1f} ms/step = {sparse['x_ce']:.2f}x CE, group precision {sparse['precision']:.2f}",
        "reported; the rows find the groups (precision > 0.5)", ce=ce, top_k=sparse,
    )]


# ---- 5. the ImageNet recipe on generated JPEGs: bf16, checkpoint, resume -----------------------------------------


def write_jpeg_folder(root: Path, per_class: int, size: Sequence[int]) -> None:
    """``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG`` as in ImageNet's release, three classes of random pixels."""
    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", max(2, per_class // 2))):
        for wnid in ("n01440764", "n01443537", "n01484850"):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                pixels = rng.integers(0, 256, (size[1] + index, size[0], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{wnid}_{index}.JPEG", quality=90)


def check_imagenet(device: str, run: Runner, sizes: Dict[str, Any], work: Path) -> List[Dict[str, Any]]:
    plan = sizes["imagenet"]
    data, runs = work / "imagenet", work / "imagenet_runs"
    if not run.dry_run:
        write_jpeg_folder(data, plan["per_class"], plan["image_size"])
    command = [
        sys.executable, "-m", "lightning_adalabel.examples.cli", "fit", "--config", "imagenet",
        "--trainer.accelerator", "gpu" if device == "cuda" else "cpu", "--trainer.devices", "1",
        "--trainer.precision", "bf16-mixed", "--trainer.limit_train_batches", str(plan["train_batches"]),
        "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(runs), "--model.num_classes", "3", "--model.warmup_epochs", "0",
        "--data.train_root", str(data / "train"), "--data.val_root", str(data / "val"),
        "--data.batch_size", str(plan["batch_size"]), "--data.num_workers", str(plan["workers"]),
        "--data.train_crop_size", str(plan["crop"]), "--data.val_resize_size", str(plan["resize"]),
        "--data.val_crop_size", str(plan["crop"]),
    ]
    start = time.perf_counter()
    first = run([*command, "--trainer.max_epochs", "1"], sizes["timeout"]["imagenet"], cwd=work)
    first_seconds = time.perf_counter() - start
    second = run([*command, "--trainer.max_epochs", "2", "--ckpt_path", "last"], sizes["timeout"]["imagenet"], cwd=work)
    if run.dry_run:
        return []
    name = f"imagenet recipe, generated JPEGs, bf16, {plan['crop']}px: 1 epoch, then --ckpt_path last for a 2nd"
    if first.returncode != 0 or second.returncode != 0:
        return [row(name, False, last_line(first if first.returncode else second), "both runs succeed")]
    checkpoint = torch.load(sorted(runs.glob("**/checkpoints/last.ckpt"))[-1], map_location="cpu", weights_only=False)
    (state,) = [value for key, value in checkpoint["callbacks"].items() if key.startswith("AdaLabel")]
    refreshes = state["label_matrix"].get("num_refreshes")
    steps, expected_steps = checkpoint["global_step"], 2 * plan["train_batches"]
    resumed = "--ckpt_path last: " in second.stdout + second.stderr
    seconds = time.perf_counter() - start
    return [row(
        name, resumed and steps == expected_steps and refreshes == 2,
        f"resumed {'yes' if resumed else 'NO'}, {steps} steps, Q refreshed {refreshes}x, {first_seconds:.0f} s + "
        f"{seconds - first_seconds:.0f} s", f"resumed, {expected_steps} steps, 2 refreshes",
        global_step=steps, num_refreshes=refreshes, resumed=resumed, first_run_s=first_seconds, total_s=seconds,
    )]


# ---- the table, the JSON and the entry point ---------------------------------------------------------------------


def table(rows: Sequence[Dict[str, Any]]) -> str:
    """The rows as a Markdown table.

    Example:
        >>> print(table([{"check": "a", "status": "pass", "figure": "1.00", "target": "<= 1.01", "seconds": 2.0}]))
        | check | result | figure | target | seconds |
        |---|---|---|---|---|
        | a | pass | 1.00 | <= 1.01 | 2 |
    """
    lines = ["| check | result | figure | target | seconds |", "|---|---|---|---|---|"]
    lines += [f"| {r['check']} | {r['status']} | {r['figure']} | {r['target']} | {r['seconds']:.0f} |" for r in rows]
    return "\n".join(lines)


def environment(device: str) -> Dict[str, Any]:
    import lightning

    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() and device == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)",
        "torch": torch.__version__, "cuda": torch.version.cuda, "lightning": lightning.__version__,
        "python": platform.python_version(), "machine": platform.machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


STEPS: Dict[str, Callable[..., List[Dict[str, Any]]]] = {
    "tests": lambda device, run, sizes, work: check_tests(device, run, sizes),
    "loss": lambda device, run, sizes, work: check_loss(device, run, sizes),
    "overhead": check_overhead,
    "large_k": check_large_k,
    "imagenet": check_imagenet,
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", required=True, choices=["cuda", "cpu"])
    parser.add_argument("--out", default="gpu_check", help="folder for gpu_check.json, gpu_check.md, gpu_check.log")
    parser.add_argument("--steps", nargs="+", choices=list(STEPS), default=list(STEPS), help="a subset of the steps")
    parser.add_argument("--dry-run", action="store_true", help="print what each step would run, and run nothing")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available() and not args.dry_run:
        parser.error("--device cuda, but torch sees no CUDA device (`--device cpu` runs the CPU twin of every step)")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "gpu_check.log"
    log.write_text("")
    run, sizes = Runner(log, args.dry_run), SIZES[args.device]
    report: Dict[str, Any] = {"environment": environment(args.device), "arguments": vars(args), "rows": []}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work_dir:
        for name in args.steps:
            print(f"[{name}]", flush=True)
            start = time.perf_counter()
            try:
                rows = STEPS[name](args.device, run, sizes, Path(work_dir))
            except Exception as error:  # one broken step must not cost the others their time on the GPU
                run.log(traceback.format_exc())
                kind = "" if isinstance(error, StepFailed) else f"{type(error).__name__}: "
                rows = [row(name, False, f"{kind}{' '.join(str(error).split())[:200]}", "runs")]
            for each in rows:
                each["seconds"] = (time.perf_counter() - start) / len(rows)
                print(f"  {each['status']}: {each['check']}: {each['figure']}", flush=True)
            report["rows"] += rows
            report["commands"] = [" ".join(command) for command in run.commands]
            (out / "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))  # after every step
    if args.dry_run:
        return 0
    text = f"{report['environment']}\n\n{table(report['rows'])}\n"
    (out / "gpu_check.md").write_text(text)
    print(f"\n{text}\nfigures: {out / 'gpu_check.json'}, step output: {log}")
    return 0 if all(each["status"] == "pass" for each in report["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
