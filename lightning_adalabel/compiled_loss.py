"""``compile_loss=True``: a training batch's formatting, loss and statistics as one ``torch.compile``'d graph.

Eager, the per-batch path costs about as much as its number of operations, not their arithmetic: on a CPU at small K
and on a GPU at any K, each of its operations is a dispatch (and on a GPU a kernel launch) over a B x K tensor that
cross-entropy reads in two. Compiled, formatting, loss and statistics become a few fused loops, and backward the
hand-written gradient of :mod:`lightning_adalabel.fused` as one more (see ``docs/benchmarks.md`` for the numbers).

The price is a compilation on the first training batch (seconds), and one more when the batch shape first changes
(torch's automatic dynamic shapes then compile a graph for any size), and a compiler: a C++ compiler for the CPU,
Triton for a GPU. That is why it is opt-in. Values and gradients equal the eager path's to float rounding.
"""

import functools
from typing import Any, Callable

import torch


@functools.lru_cache(maxsize=None)
def compiled(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` compiled whole (``fullgraph=True``: a graph break is a bug here, not a slow path), with an error
    that names the fix when this machine cannot compile. One compiled function per ``function``: torch caches its
    graphs per code object, keyed by the guards (dtypes, shapes, settings) each call meets."""
    try:
        compiled_function = torch.compile(function, fullgraph=True)
    except RuntimeError as error:  # e.g. a torch whose Dynamo does not support this Python version
        raise RuntimeError(_cannot_compile(error)) from error

    @functools.wraps(function)
    def run(*args: Any) -> Any:
        try:
            return compiled_function(*args)
        except torch._dynamo.exc.BackendCompilerFailed as error:  # no C++ compiler (CPU) or Triton (GPU), ...
            raise RuntimeError(_cannot_compile(error)) from error
        except torch._dynamo.exc.Unsupported as error:  # an older Dynamo (torch 2.8) cannot trace the loss whole
            raise RuntimeError(_cannot_trace(error)) from error

    return run


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _cannot_compile(error: BaseException) -> str:
    first_line = _first_line(error)
    return (
        f"AdaLabel(compile_loss=True) could not torch.compile the loss on this machine: {first_line}. torch.compile"
        " needs a C++ compiler for the CPU (e.g. g++) and Triton for a GPU; install them, or use compile_loss=False"
        " (the eager loss: same values, no compiler)."
    )


def _cannot_trace(error: BaseException) -> str:
    first_line = _first_line(error)
    return (
        f"AdaLabel(compile_loss=True): torch {torch.__version__}'s torch.compile cannot trace the loss as one graph"
        f" ({first_line}). compile_loss=True is tested with torch 2.14; upgrade torch, or use compile_loss=False"
        " (the eager loss: same values, no compiler)."
    )
