"""Overhead benchmark: what ALR costs per training step, and what the vectorised update saves.

Two measurements, in one process:

1. **Training step.** A real Lightning loop on a small CNN, timed by a callback as the wall-clock between
   consecutive ``on_train_batch_start`` calls (so everything between two batches counts: forward, loss,
   backward, optimizer, every callback's ``on_train_batch_end``, logging). Four loops share the network, data
   and optimizer: ``AdaLabel(preset="alr")``, the same with ``compile_loss=True``, ``AdaLabel(preset="none")``
   through the same mixin, and a plain LightningModule with ``F.cross_entropy`` and no callback. They run interleaved, several rounds each, and the
   table reports the median step of each and its ratio to the plain module.
2. **Micro-benchmark** of one batch (B=256) at K classes, milliseconds for the statistics update + the loss forward
   and backward: ``F.cross_entropy`` (no statistics), ours as the callback runs it (``LabelMatrix.loss``, backward,
   ``LabelMatrix.add``: one softmax) for ALR and OLS, eager and with ``compile_loss=True`` (the same per-batch path
   as one compiled graph), ours before the one-pass loss (``update`` + the straightforward loss), and Online Label
   Smoothing as public code writes it (its loss, then a vectorised update or the official per-sample Python loop).

Usage::

    python benchmarks/overhead.py                      # CPU, small CNN on 3x32x32 inputs, K=10
    python benchmarks/overhead.py --device cuda        # same on a GPU
    python benchmarks/overhead.py --device cuda --model resnet50 --precision bf16-mixed --channels-last \\
        --num-classes 1000 --batch-size 64 --image-size 224   # ResNet-50, ImageNet-sized (needs torchvision, a GPU)

``--json PATH`` also writes every figure (the environment, the arguments and each table's rows) as JSON;
``benchmarks/gpu_check.py`` reads it.
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time
from multiprocessing import get_context
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_adalabel import AdaLabel, AdaLabelMixin
from lightning_adalabel.label_matrix import LabelMatrix, initial_label_matrix
from lightning_adalabel.inputs import _format, _reduce
from lightning_adalabel.losses import _straightforward_per_sample

# ---- 1. the training step ------------------------------------------------------------------------------------


def small_cnn(num_classes: int) -> nn.Module:
    """A CIFAR-sized CNN (about 0.3 M parameters): three conv blocks and a linear head."""

    def block(cin: int, cout: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

    return nn.Sequential(block(3, 32), block(32, 64), block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(128, num_classes))


def build_network(name: str, num_classes: int) -> nn.Module:
    if name == "small_cnn":
        return small_cnn(num_classes)
    if name == "resnet50":
        import torchvision

        return torchvision.models.resnet50(num_classes=num_classes)
    raise ValueError(f"Unknown model {name!r}; choose 'small_cnn' or 'resnet50'.")


class PlainClassifier(L.LightningModule):
    """The baseline: ``F.cross_entropy``, no mixin, no callback. With ``channels_last`` the images enter the network
    in the channels-last layout its weights were given (what the ImageNet recipe does on a GPU)."""

    def __init__(self, network: nn.Module, channels_last: bool = False) -> None:
        super().__init__()
        self.network = network
        self.channels_last = channels_last

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.network(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)  # the mixin's default step logs the same
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class AdaLabelClassifier(AdaLabelMixin, PlainClassifier):
    """The same module with the mixin: its default ``training_step`` calls ``self.adalabel_loss``."""

    training_step = AdaLabelMixin.training_step


class StepTimer(L.Callback):
    """Records the wall-clock between consecutive ``on_train_batch_start`` calls (after ``warmup`` steps)."""

    def __init__(self, warmup: int, synchronize: bool) -> None:
        self.warmup = warmup
        self.synchronize = synchronize
        self.steps: List[float] = []
        self._last: Optional[float] = None

    def on_train_batch_start(self, trainer: "L.Trainer", pl_module: "L.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        if self.synchronize:  # GPU kernels run asynchronously: wait so that a step's time is the step's own
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self._last is not None and batch_idx > self.warmup:
            self.steps.append(now - self._last)
        self._last = now


class PrebuiltBatches:
    """Batches made ahead, iterated as a DataLoader iterates its batches (Lightning would read a plain list as one
    loader per element)."""

    def __init__(self, batches: List[Tuple[Tensor, Tensor]]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[Tuple[Tensor, Tensor]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def time_training_loop(variant: str, args: argparse.Namespace, loader: Iterable[Any]) -> List[float]:
    """Step times (seconds) of ``args.steps`` measured steps of one loop variant."""
    torch.manual_seed(0)
    network = build_network(args.model, args.num_classes)
    if args.channels_last:
        network = network.to(memory_format=torch.channels_last)
    timer = StepTimer(args.warmup, synchronize=args.device == "cuda")
    callbacks: List[L.Callback] = [timer]
    if variant == "plain F.cross_entropy":
        model: L.LightningModule = PlainClassifier(network, args.channels_last)
    else:
        model = AdaLabelClassifier(network, args.channels_last)
        preset, *options = variant.split("=")[1].split(", ")
        callbacks.insert(0, AdaLabel(preset=preset, num_classes=args.num_classes,
                                     compile_loss="compile_loss" in options))
    trainer = L.Trainer(
        accelerator=args.device, devices=1, precision=args.precision, max_steps=args.warmup + args.steps + 1,
        callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader)
    return timer.steps


def benchmark_training_step(args: argparse.Namespace) -> List[Dict[str, Any]]:
    size = args.warmup + args.steps + 2
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(size * args.batch_size, 3, args.image_size, args.image_size, generator=generator)
    y = torch.randint(0, args.num_classes, (size * args.batch_size,), generator=generator)
    loader: Iterable[Any] = DataLoader(TensorDataset(x, y), batch_size=args.batch_size, shuffle=False)
    if args.batches_on_device:  # whole batches made ahead, already on the device: a step times the model, not the data
        loader = PrebuiltBatches([(x[i:i + args.batch_size].to(args.device), y[i:i + args.batch_size].to(args.device))
                                  for i in range(0, len(y), args.batch_size)])
    variants = ["plain F.cross_entropy", "AdaLabel preset=none", "AdaLabel preset=alr"]
    if not args.skip_compiled:
        variants.append("AdaLabel preset=alr, compile_loss")
    times: Dict[str, List[float]] = {variant: [] for variant in variants}
    for round_index in range(args.rounds):  # interleaved, so that drift in machine load hits every variant alike
        for variant in variants:
            times[variant] += time_training_loop(variant, args, loader)
        print(f"round {round_index + 1}/{args.rounds}: " + ", ".join(
            f"{variant} {1e3 * statistics.median(values):.2f} ms" for variant, values in times.items()), flush=True)
    baseline = statistics.median(times[variants[0]])
    rows = []
    for variant in variants:
        median = statistics.median(times[variant])
        q1, _, q3 = statistics.quantiles(times[variant], n=4)
        rows.append({"loop": variant, "steps": len(times[variant]), "median_ms": 1e3 * median,
                     "iqr_ms": 1e3 * (q3 - q1), "ratio": median / baseline})
    return rows


# ---- 2. the micro-benchmark ----------------------------------------------------------------------------------


def ols_loss(logits: Tensor, target: Tensor, label_matrix: Tensor) -> Tensor:
    """Online Label Smoothing's loss as its public implementations write it: 0.5 CE + 0.5 soft-target CE."""
    log_probs = logits.log_softmax(dim=1)
    soft = -(label_matrix[target] * log_probs).sum(dim=1).mean()
    return 0.5 * F.nll_loss(log_probs, target) + 0.5 * soft


def python_loop_update(sums: Tensor, counts: Tensor, logits: Tensor, target: Tensor) -> None:
    """The per-sample loop of the official Online Label Smoothing code (one Python branch and two small ops per
    sample; on a GPU every ``if`` is a device-to-host sync)."""
    probs = logits.softmax(dim=1)
    pred = probs.argmax(dim=1)
    for i in range(logits.shape[0]):
        if pred[i] == target[i]:
            sums[target[i]] += probs[i]
            counts[target[i]] += 1


def vectorised_update(sums: Tensor, counts: Tensor, logits: Tensor, target: Tensor) -> None:
    """The same update vectorised as public re-implementations do it (boolean indexing: one host sync)."""
    probs = logits.softmax(dim=1)
    correct = probs.argmax(dim=1) == target
    sums.index_add_(0, target[correct], probs[correct])
    counts.index_add_(0, target[correct], torch.ones_like(target[correct], dtype=counts.dtype))


def time_call(fn: Callable[[], None], device: str, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls, after 3 warm-up calls."""
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def benchmark_update_and_loss(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """One batch (B=256): statistics update + loss forward and backward, for ours and the public ways."""
    rows = []
    batch = 256
    for num_classes in args.micro_classes:
        generator = torch.Generator().manual_seed(0)
        target = torch.randint(0, num_classes, (batch,), generator=generator)
        # A mid-training batch: about 70% of the samples predicted right (a margin on their target logit), so the
        # per-sample loop does the work it does in training instead of skipping almost every sample.
        margin = 10.0 * (torch.rand(batch, generator=generator) < 0.7)
        logits = torch.randn(batch, num_classes, generator=generator)
        logits[torch.arange(batch), target] += margin
        logits, target = logits.to(args.device).requires_grad_(), target.to(args.device)
        alr_engine = LabelMatrix(num_classes, samples="misclassified", device=args.device)
        ols_engine = LabelMatrix(num_classes, samples="correct", include_diagonal=True, device=args.device)
        alr_compiled = LabelMatrix(num_classes, samples="misclassified", device=args.device, compile_loss=True)
        ols_compiled = LabelMatrix(num_classes, samples="correct", include_diagonal=True, device=args.device,
                                   compile_loss=True)
        sums = torch.zeros(num_classes, num_classes, device=args.device)
        counts = torch.zeros(num_classes, device=args.device)
        ols_matrix = initial_label_matrix(num_classes, include_diagonal=True, device=args.device)
        # Fewer repeats for the slow cases keep the whole micro-benchmark to seconds.
        repeats = args.repeats if num_classes <= 1000 else max(5, args.repeats // 10)

        def cross_entropy() -> None:
            F.cross_entropy(logits, target).backward()
            logits.grad = None

        def ours(engine: LabelMatrix, loss: str, alpha: float) -> Callable[[], None]:
            def step() -> None:  # what the callback does per batch: the loss, backward, then the statistics
                value, batch_statistics = engine.loss(logits, target, loss, alpha)
                value.backward()
                logits.grad = None
                engine.add(batch_statistics)
            return step

        def alr_straightforward() -> None:  # before the one-pass loss: the update reads the logits a second time
            alr_engine.update(logits.detach(), target)
            formatted = _format(logits, target)
            _reduce(_straightforward_per_sample(formatted, alr_engine.matrix, "decoupled", 1.0), formatted,
                    "mean").backward()
            logits.grad = None

        def public_ols(update: Callable[[Tensor, Tensor, Tensor, Tensor], None]) -> Callable[[], None]:
            def step() -> None:
                ols_loss(logits, target, ols_matrix).backward()
                logits.grad = None
                update(sums, counts, logits.detach(), target)
            return step

        row: Dict[str, Any] = {
            "K": num_classes,
            "ce_ms": 1e3 * time_call(cross_entropy, args.device, repeats),
            "alr_ms": 1e3 * time_call(ours(alr_engine, "decoupled", 1.0), args.device, repeats),
            "alr_straightforward_ms": 1e3 * time_call(alr_straightforward, args.device, repeats),
            "ols_ms": 1e3 * time_call(ours(ols_engine, "mixed", 0.5), args.device, repeats),
            "ols_vectorised_ms": 1e3 * time_call(public_ols(vectorised_update), args.device, repeats),
            "ols_loop_ms": 1e3 * time_call(public_ols(python_loop_update), args.device, max(3, repeats // 10)),
        }
        if not args.skip_compiled:  # the warm-up calls compile (seconds); the timed ones run the compiled graphs
            row["alr_compiled_ms"] = 1e3 * time_call(ours(alr_compiled, "decoupled", 1.0), args.device, repeats)
            row["ols_compiled_ms"] = 1e3 * time_call(ours(ols_compiled, "mixed", 0.5), args.device, repeats)
        for name in ("alr", "ols", "alr_compiled", "ols_compiled"):
            if f"{name}_ms" in row:
                row[f"{name}_over_ce"] = row[f"{name}_ms"] / row["ce_ms"]
        rows.append(row)
        print(f"K={num_classes}: {row}", flush=True)
    return rows


# ---- 3. memory at large K ------------------------------------------------------------------------------------


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_resident_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _memory_phase(job: Tuple[int, str]) -> Dict[str, float]:
    """Runs in a fresh process (the peak resident size only grows): one phase at K classes, its time and the
    memory it needs beyond what was resident before it."""
    num_classes, phase = job
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    engine = LabelMatrix(num_classes)
    logits = torch.randn(256, num_classes, generator=generator).requires_grad_()
    target = torch.randint(0, num_classes, (256,), generator=generator)

    def step() -> None:
        loss, batch_statistics = engine.loss(logits, target)
        loss.backward()
        logits.grad = None
        engine.add(batch_statistics)

    step()  # warm-up; the statistics now hold one batch, as before any refresh
    work = {"step": step, "refresh": engine.refresh, "state_dict": engine.state_dict}[phase]
    before = _resident_bytes()
    start = time.perf_counter()
    result = work()
    seconds = time.perf_counter() - start
    del result
    return {"seconds": seconds, "extra_bytes": max(0, _peak_resident_bytes() - before),
            "state_bytes": engine.matrix.nbytes + engine._buffer.nbytes}


def benchmark_memory(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Time and extra memory of a step (B=256: the loss, backward and the statistics), a refresh and a state_dict,
    each in a fresh process, at each K of ``--memory-classes``."""
    rows = []
    context = get_context("spawn")
    for num_classes in args.memory_classes:
        row: Dict[str, Any] = {"K": num_classes}
        for phase in ("step", "refresh", "state_dict"):
            with context.Pool(1) as pool:
                result = pool.apply(_memory_phase, ((num_classes, phase),))
            row[f"{phase}_seconds"], row[f"{phase}_mb"] = result["seconds"], result["extra_bytes"] / 2**20
            row["state_mb"] = result["state_bytes"] / 2**20
        rows.append(row)
        print(f"K={num_classes}: {row}", flush=True)
    return rows


# ---- tables and entry point ----------------------------------------------------------------------------------


def training_table(rows: Sequence[Dict[str, Any]]) -> str:
    """Markdown table of :func:`benchmark_training_step`'s rows.

    Example:
        >>> print(training_table([{"loop": "plain", "steps": 10, "median_ms": 2.0, "iqr_ms": 0.1, "ratio": 1.0}]))
        | training loop | steps timed | median step (ms) | IQR (ms) | ratio to plain CE |
        |---|---|---|---|---|
        | plain | 10 | 2.000 | 0.100 | 1.000 |
    """
    lines = ["| training loop | steps timed | median step (ms) | IQR (ms) | ratio to plain CE |", "|---|---|---|---|---|"]
    lines += [f"| {r['loop']} | {r['steps']} | {r['median_ms']:.3f} | {r['iqr_ms']:.3f} | {r['ratio']:.3f} |"
              for r in rows]
    return "\n".join(lines)


def micro_table(rows: Sequence[Dict[str, Any]]) -> str:
    """Markdown table of :func:`benchmark_update_and_loss`'s rows (milliseconds per batch); the ``compile_loss``
    columns read "-" when they were skipped.

    Example:
        >>> row = dict(K=10, ce_ms=0.1, alr_ms=0.2, alr_straightforward_ms=0.4, ols_ms=0.2, ols_vectorised_ms=0.3,
        ...            ols_loop_ms=3.0, alr_over_ce=2.0, ols_over_ce=2.0, alr_compiled_ms=0.15, alr_compiled_over_ce=1.5)
        >>> print(micro_table([row]).splitlines()[-1])
        | 10 | 0.100 | 0.200 | 2.00 | 0.150 | 1.50 | 0.400 | 0.200 | 2.00 | - | - | 0.300 | 3.00 |
    """

    def cell(row: Dict[str, Any], key: str, digits: int) -> str:
        return f"{row[key]:.{digits}f}" if key in row else "-"

    lines = [
        "| K | F.cross_entropy | ALR (ours) | ALR / CE | ALR, compile_loss | compiled / CE | ALR before the one-pass loss"
        " | OLS (ours) | OLS / CE | OLS, compile_loss | compiled / CE | OLS, public vectorised"
        " | OLS, official per-sample loop |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['K']} | {r['ce_ms']:.3f} | {r['alr_ms']:.3f} | {r['alr_over_ce']:.2f} | {cell(r, 'alr_compiled_ms', 3)}"
        f" | {cell(r, 'alr_compiled_over_ce', 2)} | {r['alr_straightforward_ms']:.3f} | {r['ols_ms']:.3f}"
        f" | {r['ols_over_ce']:.2f} | {cell(r, 'ols_compiled_ms', 3)} | {cell(r, 'ols_compiled_over_ce', 2)}"
        f" | {r['ols_vectorised_ms']:.3f} | {r['ols_loop_ms']:.2f} |"
        for r in rows
    ]
    return "\n".join(lines)


def keep_freed_memory() -> None:
    """Raise glibc's mmap and trim thresholds to 1 GiB: blocks of freed tensors stay in the heap for the next ones.

    By default glibc serves every block above 128 KB with a fresh ``mmap`` and unmaps it on free, so each new
    B x K float32 tensor (1 MB at B=256, K=1000) is paid again in page faults, and how many depends on the heap's
    history: the timings of one implementation then move by 2x between runs.
    """
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    if not (libc.mallopt(m_trim_threshold, 1 << 30) and libc.mallopt(m_mmap_threshold, 1 << 30)):
        raise RuntimeError("mallopt refused the new thresholds")


def memory_table(rows: Sequence[Dict[str, Any]]) -> str:
    """Markdown table of :func:`benchmark_memory`'s rows.

    Example:
        >>> row = dict(K=1000, state_mb=7.7, step_seconds=0.001, step_mb=3.0, refresh_seconds=0.002, refresh_mb=3.9,
        ...            state_dict_seconds=0.001, state_dict_mb=3.9)
        >>> print(memory_table([row]).splitlines()[-1])
        | 1000 | 7.7 | 1.00 | 3 | 2.0 | 4 | 1.0 | 4 |
    """
    lines = [
        "| K | Q + statistics (MB) | step (ms) | step: extra MB | refresh (ms) | refresh: extra MB | state_dict (ms)"
        " | state_dict: extra MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['K']} | {r['state_mb']:.1f} | {1e3 * r['step_seconds']:.2f} | {r['step_mb']:.0f}"
        f" | {1e3 * r['refresh_seconds']:.1f} | {r['refresh_mb']:.0f} | {1e3 * r['state_dict_seconds']:.1f}"
        f" | {r['state_dict_mb']:.0f} |"
        for r in rows
    ]
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default="small_cnn", choices=["small_cnn", "resnet50"])
    parser.add_argument("--precision", default="32-true", help="Lightning precision, e.g. bf16-mixed")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batches-on-device", action="store_true",
                        help="train on whole batches made ahead on the device (no DataLoader, no host-to-device copy),"
                        " so that a step times the model, the loss and the optimizer alone")
    parser.add_argument("--channels-last", action="store_true",
                        help="the network's weights and its input images in the channels-last memory layout")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per loop and round")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps at the start of each loop")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the loops")
    parser.add_argument("--micro-classes", type=int, nargs="*", default=[10, 100, 1000, 10000])
    parser.add_argument("--repeats", type=int, default=100, help="calls per micro-benchmark case")
    parser.add_argument("--skip-training", action="store_true", help="only the micro-benchmark")
    parser.add_argument("--skip-compiled", action="store_true",
                        help="leave out AdaLabel(compile_loss=True) (its first call compiles for seconds; needs a C++"
                        " compiler on the CPU, Triton on a GPU)")
    parser.add_argument("--memory-classes", type=int, nargs="*", default=[],
                        help="K values for the time and memory of a step, a refresh and a state_dict, each in a"
                        " fresh process (e.g. 1000 10000 21841; K=21841 needs about 6 GB)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="glibc only: keep freed blocks in the process (mallopt), so that a new 1 MB tensor does not"
                        " cost 256 page faults; PyTorch's CPU tuning guide gets the same from jemalloc or tcmalloc")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); 1 avoids thread-pool stalls on a busy machine")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="also write every figure (environment, arguments, each table's rows) to this JSON file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        keep_freed_memory()
    environment = (f"torch {torch.__version__}, lightning {L.__version__}, device {args.device}"
                   f" ({torch.cuda.get_device_name() if args.device == 'cuda' else f'{torch.get_num_threads()} threads'})"
                   f"{', freed memory kept (mallopt)' if args.keep_freed_memory else ''}")
    micro = benchmark_update_and_loss(args) if args.micro_classes else []
    memory = benchmark_memory(args) if args.memory_classes else []
    training = [] if args.skip_training else benchmark_training_step(args)
    print(f"\n{environment}")
    if training:
        print(f"\nTraining step: {args.model}, {args.image_size}x{args.image_size} inputs, batch {args.batch_size},"
              f" K={args.num_classes}, precision {args.precision}, {args.rounds} rounds x {args.steps} steps:\n")
        print(training_table(training))
    if micro:
        print("\nOne batch, B=256 (median of repeated calls):\n")
        print(micro_table(micro))
    if memory:
        print("\nAt large K, one thread, each phase in a fresh process (extra MB: peak resident size above the size"
              " before the phase):\n")
        print(memory_table(memory))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump({"environment": environment, "arguments": vars(args), "training": training, "micro": micro,
                       "memory": memory}, file, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
