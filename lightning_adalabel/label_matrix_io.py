"""Save a learned label matrix and load it back, e.g. to train a new run with it as a fixed soft-label matrix.

Two formats, chosen by the file extension: ``.pt`` (``torch.save`` of a float32 tensor, exact) and ``.csv``
(one row of Q per line, comma-separated, 9 significant digits: exact for float32, and readable by any tool).
"""

import os
from typing import Union

import torch
from torch import Tensor

from lightning_adalabel.label_matrix import LabelMatrix
from lightning_adalabel.validation import validate_label_matrix

PathLike = Union[str, "os.PathLike[str]"]
FORMATS = (".pt", ".csv")


def _extension(path: PathLike) -> str:
    extension = os.path.splitext(os.fspath(path))[1].lower()
    if extension not in FORMATS:
        raise ValueError(f"Label matrices are saved as {' or '.join(FORMATS)}; got a path ending in {extension!r}.")
    return extension


def save_label_matrix(matrix: Union[Tensor, LabelMatrix], path: PathLike) -> None:
    """Write ``matrix`` (a K x K tensor, or a :class:`LabelMatrix`) to ``path`` as ``.pt`` or ``.csv``.

    Example:
        >>> import tempfile
        >>> from lightning_adalabel import initial_label_matrix
        >>> path = os.path.join(tempfile.mkdtemp(), "q.csv")
        >>> save_label_matrix(initial_label_matrix(3), path)
        >>> print(open(path).read())
        0,0.5,0.5
        0.5,0,0.5
        0.5,0.5,0
        <BLANKLINE>
    """
    if isinstance(matrix, LabelMatrix):
        matrix = matrix.matrix
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
        >>> from lightning_adalabel import initial_label_matrix
        >>> path = os.path.join(tempfile.mkdtemp(), "q.pt")
        >>> save_label_matrix(initial_label_matrix(4), path)
        >>> torch.equal(load_label_matrix(path), initial_label_matrix(4))
        True
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No label matrix at {os.fspath(path)!r}; write one with save_label_matrix(Q, path).")
    if _extension(path) == ".pt":
        matrix = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(matrix, Tensor):
            raise ValueError(f"{os.fspath(path)!r} holds a {type(matrix).__name__}, not a label-matrix tensor.")
    else:
        with open(path) as handle:
            rows = [line.strip() for line in handle if line.strip()]
        try:
            matrix = torch.tensor([[float(value) for value in row.split(",")] for row in rows])
        except ValueError as error:  # ragged rows or a non-number
            raise ValueError(
                f"{os.fspath(path)!r} is not a label-matrix CSV (K lines of K comma-separated numbers): {error}"
            ) from error
    matrix = matrix.to(torch.float32)
    validate_label_matrix(matrix, include_diagonal=True)
    return matrix
