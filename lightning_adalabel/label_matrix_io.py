"""Save a learned label matrix and load it back, e.g. to train a new run with it as a fixed soft-label matrix.

Two formats, chosen by the file extension: ``.pt`` (``torch.save`` of a float32 tensor, exact) and ``.csv``
(one row of Q per line, comma-separated, 9 significant digits: exact for float32, and readable by any tool).
"""

import os
import pickle
from typing import Any, Union

import torch
from torch import Tensor

from lightning_adalabel.engine import LabelMatrixEngine
from lightning_adalabel.validation import validate_label_matrix

PathLike = Union[str, "os.PathLike[str]"]
FORMATS = (".pt", ".csv")
# What torch.load raises for a file that is not what torch.save wrote, or one cut short: deep in its zip reader
# (RuntimeError, or OSError when memory-mapped), the unpickler, or the weights-only unpickler.
TORCH_LOAD_ERRORS = (RuntimeError, OSError, EOFError, pickle.UnpicklingError, ValueError)


def load_failure_reason(error: BaseException) -> str:
    """The first sentence of a :data:`TORCH_LOAD_ERRORS` error, on one line: torch's messages go on with advice
    (about ``weights_only``, or filing an issue) that misleads for a damaged file.

    Example:
        >>> load_failure_reason(RuntimeError("PytorchStreamReader failed reading zip archive. An internal error."))
        'PytorchStreamReader failed reading zip archive'
    """
    text = " ".join(str(error).split()) or type(error).__name__
    return text.split(". ")[0].rstrip(".")


def _extension(path: PathLike) -> str:
    extension = os.path.splitext(os.fspath(path))[1].lower()
    if extension not in FORMATS:
        raise ValueError(f"Label matrices are saved as {' or '.join(FORMATS)}; got a path ending in {extension!r}.")
    return extension


def save_label_matrix(matrix: Union[Tensor, LabelMatrixEngine], path: PathLike) -> None:
    """Write ``matrix`` (a K x K tensor, or the Q of an engine that keeps it dense, e.g. ``AdaLabel().engine``) to
    ``path`` as ``.pt`` or ``.csv``.

    Example:
        >>> import tempfile
        >>> from lightning_adalabel.label_matrix import initial_label_matrix
        >>> path = os.path.join(tempfile.mkdtemp(), "q.csv")
        >>> save_label_matrix(initial_label_matrix(3), path)
        >>> print(open(path).read())
        0,0.5,0.5
        0.5,0,0.5
        0.5,0.5,0
        <BLANKLINE>
    """
    if isinstance(matrix, LabelMatrixEngine):
        if not matrix.stores_dense:
            raise ValueError(
                f"save_label_matrix writes a dense K x K matrix; got a {type(matrix).__name__} (AdaLabel(top_k=...))."
                " For a small K save `engine.to_dense()`; at any K keep the sparse rows with"
                " `torch.save(engine.state_dict(), path)`."
            )
        matrix = matrix.to_dense()
    validate_label_matrix(matrix, include_diagonal=True)  # shape and values; the diagonal is checked on use
    values = matrix.detach().to("cpu", torch.float32)
    if _extension(path) == ".pt":
        torch.save(values.clone(), path)
        return
    with open(path, "w") as handle:
        for row in values.tolist():
            handle.write(",".join(format(value, ".9g") for value in row) + "\n")


def load_label_matrix(path: PathLike) -> Tensor:
    """Read a matrix written by :func:`save_label_matrix` (``.pt`` or ``.csv``) as a float32 CPU tensor, validated.

    Example:
        >>> import tempfile
        >>> from lightning_adalabel.label_matrix import initial_label_matrix
        >>> path = os.path.join(tempfile.mkdtemp(), "q.pt")
        >>> save_label_matrix(initial_label_matrix(4), path)
        >>> torch.equal(load_label_matrix(path), initial_label_matrix(4))
        True
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No label matrix at {os.fspath(path)!r}; write one with save_label_matrix(Q, path).")
    name = os.fspath(path)
    matrix = _read_pt(name) if _extension(path) == ".pt" else _read_csv(name)
    matrix = matrix.to(torch.float32)
    try:
        validate_label_matrix(matrix, include_diagonal=True)
    except ValueError as error:
        raise ValueError(f"{name!r}: {error}") from error
    return matrix


def _read_pt(name: str) -> Tensor:
    try:
        matrix: Any = torch.load(name, map_location="cpu", weights_only=True)
    except TORCH_LOAD_ERRORS as error:
        raise ValueError(
            f"{name!r} cannot be read as a label-matrix .pt file (truncated or corrupt: {load_failure_reason(error)})."
            " Write it again with save_label_matrix(Q, path), or load the .csv copy if there is one."
        ) from error
    if not isinstance(matrix, Tensor):
        raise ValueError(f"{name!r} holds a {type(matrix).__name__}, not a label-matrix tensor.")
    return matrix


def _read_csv(name: str) -> Tensor:
    try:
        with open(name, encoding="utf-8-sig") as handle:  # -sig: a spreadsheet's byte-order mark is not a number
            rows = [(number, line.strip()) for number, line in enumerate(handle, start=1) if line.strip()]
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{name!r} is not a text CSV (byte {error.start} is not UTF-8): a label-matrix CSV is K lines of K"
            " comma-separated numbers, as save_label_matrix(Q, 'q.csv') writes."
        ) from error
    values = []
    for number, row in rows:
        try:
            values.append([float(value) for value in row.split(",")])
        except ValueError as error:
            raise ValueError(
                f"{name!r} line {number} is not comma-separated numbers ({error}): a label-matrix CSV is K lines of"
                " K numbers, as save_label_matrix(Q, 'q.csv') writes."
            ) from error
        if len(values[-1]) != len(values[0]):
            raise ValueError(
                f"{name!r} line {number} has {len(values[-1])} numbers but line {rows[0][0]} has {len(values[0])}: a"
                " label-matrix CSV is K lines of K numbers (is the file truncated?)."
            )
    return torch.tensor(values)
