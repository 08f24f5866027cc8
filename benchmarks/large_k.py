"""Large label sets: ``AdaLabel(top_k=...)`` at K = 10,000 and 100,000 classes against plain cross-entropy.

Data with a known class structure: K classes in groups of ``--group-size`` whose members are confusable. Each group
has a centre ``mu_g``; class c of group g has mean ``mu_g + delta_c`` with a smaller ``delta_c``; a sample is its
class mean plus Gaussian noise. The model is a linear head started as the nearest-group-mean classifier of the
training data (a head on features that already separate the groups but not the classes in them, as after
pre-training on coarser labels), then trained with SGD through a real Lightning ``Trainer``.

Each method runs in its own process (so its peak RSS is its own) for the same number of steps:

- ``ce``: a plain LightningModule with ``F.cross_entropy``, no callback (the baseline);
- ``alr top_k=k``: ``AdaLabel(top_k=k)`` (the sparse engine), refreshed every ``--refresh-every`` steps;
- ``alr dense``: ``AdaLabel()`` (the K x K engine), where it fits (``--dense-up-to``).

Reported: peak RSS of the process (and, with ``--device cuda``, its peak CUDA memory), median ms per training step
(the wall-clock between consecutive batch starts: forward, loss, backward, optimizer, callbacks) and its ratio to
``ce``, median ms per refresh, and how well the learned rows recover the groups: over the classes whose row was
refreshed, the share of a row's explicit mass on its group mates (precision) and the fraction of its group mates
among its explicit entries (recall); for the dense engine, of its row's ``top_k`` largest entries.

``--error`` adds the approximation's measured error: a run with the dense engine whose every batch is also fed to
sparse engines of several sizes (the same logits, so only the approximation differs), on groups of
``--error-group-size`` classes (larger than ``top_k``, so that rows spread their mass beyond what is kept); after each
refresh, the mean L1 distance per row between the sparse and the dense Q, and the share of the mass of each dense
row's k largest entries that sits at classes the sparse row keeps.

Usage::

    python benchmarks/large_k.py --num-classes 10000 100000 --steps 200 --refresh-every 100
    python benchmarks/large_k.py --skip-speed --error --error-classes 2000 --steps 150 --refresh-every 50
    python benchmarks/large_k.py --device cuda --num-classes 100000 --json large_k.json   # on a GPU, figures as JSON
"""

import argparse
import json
import resource
import statistics
import sys
import time
import traceback
from multiprocessing import get_context
from typing import Any, Dict, List, Optional, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_adalabel import AdaLabel, AdaLabelMixin
from lightning_adalabel.label_matrix import LabelMatrix
from lightning_adalabel.sparse_label_matrix import SparseLabelMatrix


def grouped_data(num_classes: int, group_size: int, per_class: int, features: int, seed: int = 0):
    """``(x, y)``: ``per_class`` samples of each class, classes in groups of ``group_size`` confusable classes.

    Example:
        >>> x, y = grouped_data(8, 4, 3, 5)
        >>> x.shape, y.tolist()[:6]
        (torch.Size([24, 5]), [0, 0, 0, 1, 1, 1])
    """
    generator = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(num_classes // group_size + 1, features, generator=generator)
    means = centres[torch.arange(num_classes) // group_size] + 0.5 * torch.randn(num_classes, features,
                                                                                   generator=generator)
    y = torch.arange(num_classes).repeat_interleave(per_class)
    x = means[y] + torch.randn(len(y), features, generator=generator)
    return x, y


def group_recovery(indices: Tensor, values: Tensor, refreshed: Tensor, group_size: int) -> Dict[str, float]:
    """Over the ``refreshed`` rows: precision (the share of a row's explicit mass on its group mates) and recall (the
    fraction of its group mates among its explicit entries).

    Example:
        >>> indices, values = torch.tensor([[1, 2], [0, 5]]), torch.tensor([[0.5, 0.5], [0.9, 0.1]])
        >>> group_recovery(indices, values, torch.tensor([True, True]), group_size=2)
        {'precision': 0.7, 'recall': 1.0, 'refreshed': 1.0}
    """
    rows = torch.arange(indices.shape[0])[:, None]
    explicit = values > 0
    mate = (indices // group_size == rows // group_size) & (indices != rows) & explicit
    precision = (values * mate).sum(1)[refreshed] / values.sum(1)[refreshed].clamp_min(1e-12)
    recall = mate.sum(1)[refreshed].float() / (group_size - 1)
    return {"precision": round(precision.mean().item(), 4), "recall": round(recall.mean().item(), 4),
            "refreshed": round(refreshed.float().mean().item(), 4)}


class LinearHead(L.LightningModule):
    """A linear head started as the nearest-group-mean classifier of ``(x, y)`` (every class of a group gets its group's
    mean, plus a little noise); trained with ``F.cross_entropy``."""

    def __init__(self, x: Tensor, y: Tensor, num_classes: int, group_size: int, lr: float = 0.05) -> None:
        super().__init__()
        groups = y // group_size
        num_groups = int(groups.max()) + 1
        group_means = torch.zeros(num_groups, x.shape[1]).index_add_(0, groups, x) / torch.bincount(
            groups, minlength=num_groups).clamp_min(1)[:, None]
        generator = torch.Generator().manual_seed(1)
        means = group_means[torch.arange(num_classes) // group_size]
        means = means + 0.01 * torch.randn(means.shape, generator=generator)
        self.net = nn.Linear(x.shape[1], num_classes)
        with torch.no_grad():  # argmax_c -|x - m_c|^2 / 2 = argmax_c x . m_c - |m_c|^2 / 2
            self.net.weight.copy_(means)
            self.net.bias.copy_(-0.5 * means.pow(2).sum(1))
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class AdaLabelHead(AdaLabelMixin, LinearHead):
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return self.adalabel_loss(self(x), y)


class StepTimer(L.Callback):
    """The wall-clock between consecutive batch starts: everything a training step costs (on a GPU, after waiting for
    the previous step's kernels)."""

    def __init__(self, synchronize: bool = False) -> None:
        self.starts: List[float] = []
        self.synchronize = synchronize

    def on_train_batch_start(self, *args: Any) -> None:
        if self.synchronize:
            torch.cuda.synchronize()
        self.starts.append(time.perf_counter())

    def step_ms(self, skip: int = 5) -> float:
        gaps = [b - a for a, b in zip(self.starts, self.starts[1:])][skip:]
        return 1000 * statistics.median(gaps)


class TimedAdaLabel(AdaLabel):
    """AdaLabel that times its refreshes (the statistics' reduction and the new Q)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.refresh_ms: List[float] = []

    def _refresh(self, *args: Any, **kwargs: Any) -> None:  # whatever the callback passes its own refresh
        start = time.perf_counter()
        super()._refresh(*args, **kwargs)
        self.refresh_ms.append(1000 * (time.perf_counter() - start))


def run_method(method: str, top_k: Optional[int], args: argparse.Namespace, num_classes: int) -> Dict[str, Any]:
    """Train one method for ``args.steps`` steps in this process; what the table reports."""
    torch.manual_seed(0)
    x, y = grouped_data(num_classes, args.group_size, args.per_class, args.features)
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    timer = StepTimer(synchronize=args.device == "cuda")
    callbacks: List[L.Callback] = [timer]
    if method == "ce":
        model: L.LightningModule = LinearHead(x, y, num_classes, args.group_size)
    else:
        model = AdaLabelHead(x, y, num_classes, args.group_size)
        adalabel = TimedAdaLabel(top_k=top_k, samples="misclassified", refresh_every_n_steps=args.refresh_every)
        callbacks.append(adalabel)
    trainer = L.Trainer(accelerator=args.device, devices=1, max_steps=args.steps, max_epochs=-1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=callbacks)
    trainer.fit(model, loader)
    result: Dict[str, Any] = {"step_ms": timer.step_ms(), "peak_rss_gb": peak_rss_gb()}
    if args.device == "cuda":
        result["peak_cuda_gb"] = torch.cuda.max_memory_allocated() / 2**30
    if method != "ce":
        result["refresh_ms"] = statistics.median(adalabel.refresh_ms) if adalabel.refresh_ms else float("nan")
        engine = adalabel.engine
        if isinstance(engine, SparseLabelMatrix):
            indices, values = engine.indices, engine.values
        else:  # the dense row's k largest entries, for the same measure
            top = engine.matrix.topk(args.top_k, dim=1)
            indices, values = top.indices, top.values - engine.matrix.min(dim=1, keepdim=True).values
        refreshed = values.sum(dim=1) > 0 if isinstance(engine, SparseLabelMatrix) else (
            engine.matrix.amax(dim=1) - engine.matrix.min(dim=1).values > 1e-9)
        result.update(group_recovery(indices.cpu(), values.cpu(), refreshed.cpu(), args.group_size))
    return result


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kilobytes on Linux


def _child(queue: Any, method: str, top_k: Optional[int], args: argparse.Namespace, num_classes: int) -> None:
    try:
        queue.put(run_method(method, top_k, args, num_classes))
    except BaseException:  # the parent waits on the queue: hand it the error instead of leaving it waiting
        queue.put({"error": traceback.format_exc()})
        raise


def in_process(method: str, top_k: Optional[int], args: argparse.Namespace, num_classes: int) -> Dict[str, Any]:
    """:func:`run_method` in a fresh process, so that its peak memory is its own; its error, if it fails."""
    context = get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(queue, method, top_k, args, num_classes))
    process.start()
    result = queue.get()
    process.join()
    if "error" in result:
        raise RuntimeError(f"{method} at K={num_classes} failed in its process:\n{result['error']}")
    return result


def speed_rows(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """One result of :func:`run_method` per K and method, each from its own process, with ``x_ce``: its ms/step over
    cross-entropy's at the same K."""
    rows = []
    for num_classes in args.num_classes:
        methods = [("ce", None), (f"alr top_k={args.top_k}", args.top_k)]
        if num_classes <= args.dense_up_to:
            methods.append(("alr dense", None))
        baseline = None
        for name, top_k in methods:
            result = in_process("ce" if name == "ce" else "alr", top_k, args, num_classes)
            baseline = baseline or result["step_ms"]
            rows.append({"K": num_classes, "method": name, **result, "x_ce": result["step_ms"] / baseline})
            print(speed_line(rows[-1]), file=sys.stderr, flush=True)
    return rows


def speed_line(row: Dict[str, Any]) -> str:
    """One row of the speed table; the CUDA column reads "-" on the CPU.

    Example:
        >>> speed_line({"K": 1000, "method": "ce", "peak_rss_gb": 1.234, "step_ms": 2.0, "x_ce": 1.0})
        '| 1,000 | ce | 1.23 | 2.0 | 1.00 | - | - | - | - | - |'
    """
    cells = [f"{row['K']:,}", row["method"], f"{row['peak_rss_gb']:.2f}", f"{row['step_ms']:.1f}", f"{row['x_ce']:.2f}"]
    if row["method"] == "ce":
        cells += ["-", "-", "-", "-"]
    else:
        cells += [f"{row['refresh_ms']:.0f}", f"{row['precision']:.3f}", f"{row['recall']:.3f}",
                  f"{row['refreshed']:.3f}"]
    cells.append(f"{row['peak_cuda_gb']:.2f}" if "peak_cuda_gb" in row else "-")
    return "| " + " | ".join(cells) + " |"


SPEED_HEADER = ["| K | method | peak RSS (GB) | ms/step | x CE | ms/refresh | group precision | group recall |"
                " rows refreshed | peak CUDA memory (GB) |", "|---|---|---|---|---|---|---|---|---|---|"]


def error_table(args: argparse.Namespace) -> List[str]:
    """Dense-engine training with sparse engines fed the same logits: the approximation's error at each refresh."""
    num_classes = args.error_classes
    torch.manual_seed(0)
    group_size = args.error_group_size
    x, y = grouped_data(num_classes, group_size, args.per_class, args.features)
    model = LinearHead(x, y, num_classes, group_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=model.lr)
    dense = LabelMatrix(num_classes)
    sizes = [(k, m, c) for k in args.error_top_k for m, c in ((k, 2 * k), (2 * k, 4 * k))]
    sparse = {size: SparseLabelMatrix(num_classes, size[0], statistics_top_k=size[1], candidates=size[2])
              for size in sizes}
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    lines = ["| refresh | top_k | statistics_top_k | candidates | mean L1 per row to dense Q | of which top-k truncation"
             " | dense top-k mass held |", "|---|---|---|---|---|---|---|"]
    step = 0
    while step < args.steps:
        for features, target in loader:
            logits = model(features)
            loss, batch_statistics = dense.loss(logits, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            dense.add(batch_statistics)
            for engine in sparse.values():
                engine.update(logits.detach(), target)
            step += 1
            if step % args.refresh_every == 0:
                dense.refresh()
                for (k, m, c), engine in sparse.items():
                    engine.refresh()
                    l1 = (engine.to_dense() - dense.matrix).abs().sum(dim=1).mean().item()
                    top = dense.matrix.topk(k, dim=1)
                    kept = (engine.indices[:, :, None] == top.indices[:, None, :]).any(dim=1)
                    held = ((top.values * kept).sum() / top.values.sum()).item()
                    floor = (truncated(dense.matrix, k) - dense.matrix).abs().sum(dim=1).mean().item()
                    lines.append(f"| {dense.num_refreshes} | {k} | {m} | {c} | {l1:.3f} | {floor:.3f} | {held:.4f} |")
                    print(lines[-1], file=sys.stderr, flush=True)
            if step >= args.steps:
                break
    return lines


def truncated(matrix: Tensor, k: int) -> Tensor:
    """The best a sparse row can do: the dense row's k largest entries, the rest of its mass uniform (residual Q).

    Example:
        >>> truncated(torch.tensor([[0.0, 0.5, 0.3, 0.2], [0.6, 0.0, 0.2, 0.2], [0.1, 0.1, 0.0, 0.8],
        ...                         [0.4, 0.4, 0.2, 0.0]]), 1)[0]
        tensor([0.0000, 0.6667, 0.1667, 0.1667])
    """
    num_classes = matrix.shape[0]
    top = matrix.topk(k, dim=1)
    rest = (1.0 - top.values.sum(dim=1, keepdim=True)) / (num_classes - 1)
    result = rest.expand(num_classes, num_classes).clone().fill_diagonal_(0.0)
    return result.scatter_add_(1, top.indices, top.values)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-classes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--per-class", type=int, default=4)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--refresh-every", type=int, default=100)
    parser.add_argument("--dense-up-to", type=int, default=10_000, help="largest K that also runs the dense engine")
    parser.add_argument("--error", action="store_true", help="measure the approximation against the dense engine")
    parser.add_argument("--error-classes", type=int, default=2000)
    parser.add_argument("--error-top-k", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--error-group-size", type=int, default=32)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the speed runs train")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the speed rows to this JSON file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; " + " ".join(sys.argv[1:]), flush=True)
    rows = [] if args.skip_speed else speed_rows(args)
    if rows:
        print("\n".join(SPEED_HEADER + [speed_line(row) for row in rows]))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as file:
            json.dump({"arguments": vars(args), "speed": rows}, file, indent=2)
    if args.error:
        print("\n".join(error_table(args)))


if __name__ == "__main__":
    main()
