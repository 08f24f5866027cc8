"""The notebooks in notebooks/ are committed executed, with their pictures, and still run top to bottom.

A reader of the repository sees the outputs without running anything, so the committed files must hold a fresh
top-to-bottom run: every code cell executed in order, no error, each heatmap as an image (not the
``<Figure size ...>`` text a figure prints when Jupyter has no image formatter for it), no log noise on stderr. They
show a user's code: the package's public API only (nothing from ``lightning_adalabel.examples``), and no warning
filters: a warning raised inside another installed package (Lightning's, tqdm's) is shown as it is, and none may come
from this package or from the notebook's own calls.
"""

import os
import re
from typing import Any, List

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

NOTEBOOK_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")
NOTEBOOKS = sorted(name for name in os.listdir(NOTEBOOK_DIR) if name.endswith(".ipynb"))
MAX_BYTES = 200_000  # outputs are kept small: modest dpi, no progress bars or banners


def read(name: str) -> Any:
    return nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)


def code_cells(notebook: Any) -> List[Any]:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def draws_heatmap(cell: Any) -> bool:
    return "plot_label_matrix(" in cell.source


# A warning as it reaches stderr: "<file>.py:<line>: [<Category>: ]<message>" (Lightning's own format drops the
# category), then, in Python's format, the line of source.
WARNING_HEADER = re.compile(r"^(?P<file>\S+\.py):\d+: ")


def foreign_warnings_only(text: str) -> bool:
    r"""Whether a stderr output holds nothing but warnings raised inside other installed packages (site-packages,
    not this one), each followed by at most its line of source.

    Example:
        >>> foreign_warnings_only("/v/site-packages/tqdm/auto.py:21: TqdmWarning: no IProgress\n  from . import x\n")
        True
        >>> foreign_warnings_only("/tmp/ipykernel_1/2.py:1: DeprecationWarning: AdaLabel.label_matrix is deprecated\n")
        False
    """
    lines = [line for line in text.splitlines() if line.strip()]
    headers = [WARNING_HEADER.match(line) for line in lines]
    if not lines or not headers[0]:
        return False
    for header, previous in zip(headers, [None, *headers]):
        if header is None and previous is None:  # a line that is neither a warning nor its source line
            return False
        if header is not None and ("site-packages" not in header["file"] or "lightning_adalabel" in header["file"]):
            return False
    return True


def test_the_notebooks_use_the_public_api_and_filter_no_warnings():
    for name in NOTEBOOKS:
        source = "\n".join(cell.source for cell in code_cells(read(name)))
        assert "lightning_adalabel.examples" not in source, f"{name} imports the examples' internals"
        assert not re.search(r"warnings\.(filterwarnings|simplefilter)", source), f"{name} filters warnings"


def check_outputs(notebook: Any, name: str) -> None:
    """No error; every heatmap cell shows an image; no figure shown as its text repr only."""
    cells = code_cells(notebook)
    errors = [output for cell in cells for output in cell.outputs if output.output_type == "error"]
    assert errors == [], f"{name}: {[(error.ename, error.evalue) for error in errors]}"
    heatmap_cells = [cell for cell in cells if draws_heatmap(cell)]
    assert heatmap_cells, f"{name} draws no heatmap"
    for cell in heatmap_cells:
        assert any("image/png" in output.get("data", {}) for output in cell.outputs), (
            f"{name}: the cell drawing the heatmap shows no image:\n{cell.source}"
        )
    for cell in cells:
        for output in cell.outputs:
            data = output.get("data", {})
            text = output.get("text", "") + data.get("text/plain", "")
            # A figure's mime bundle carries "<Figure size ...>" as the text fallback beside its PNG; alone, it is
            # what a reader would see instead of the picture.
            assert "<Figure size" not in text or "image/png" in data, f"{name}: a figure shown as text:\n{text}"


def test_the_notebooks_are_there():
    assert NOTEBOOKS == ["bring_your_own_module.ipynb", "find_label_errors.ipynb", "noisy_labels.ipynb",
                         "quick_start.ipynb"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_executed_with_its_pictures(name):
    notebook = read(name)
    cells = code_cells(notebook)
    assert [cell.execution_count for cell in cells] == list(range(1, len(cells) + 1)), (
        f"commit {name} executed top to bottom in a fresh kernel (execution counts 1..{len(cells)})"
    )
    check_outputs(notebook, name)
    stderr = [output.text for cell in cells for output in cell.outputs
              if output.output_type == "stream" and output.name == "stderr" and not foreign_warnings_only(output.text)]
    assert stderr == [], f"{name}: log noise, or warnings of this package, in the committed outputs: {stderr}"
    assert os.path.getsize(os.path.join(NOTEBOOK_DIR, name)) < MAX_BYTES


# The committed outputs are full runs (checked above, as a reader sees them). Run again here, each notebook only has
# to show that every cell still runs and draws, which a few epochs show as well as 30: its training length is cut at
# the one place the notebook sets it (the suite's largest cost otherwise, two minutes on 2 cores).
FEWER_EPOCHS = {
    "bring_your_own_module.ipynb": ("max_epochs=20,", "max_epochs=2,"),
    "find_label_errors.ipynb": ("def train(y, epochs=30, seed=0):", "def train(y, epochs=2, seed=0):"),
    "noisy_labels.ipynb": ('NOISE, NOISE_TYPE, EPOCHS = 0.4, "flip", 30', 'NOISE, NOISE_TYPE, EPOCHS = 0.4, "flip", 2'),
    "quick_start.ipynb": ("NOISE, EPOCHS, SEEDS = 0.3, 30, [0, 1]", "NOISE, EPOCHS, SEEDS = 0.3, 2, [0, 1]"),
}


def with_fewer_epochs(notebook: Any, name: str) -> None:
    setting, shorter = FEWER_EPOCHS[name]
    cells = [cell for cell in code_cells(notebook) if setting in cell.source]
    assert len(cells) == 1, f"{name}: the line {setting!r} that sets its training length is gone; update FEWER_EPOCHS"
    cells[0].source = cells[0].source.replace(setting, shorter)


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_without_error_and_shows_its_pictures(name, tmp_path):
    notebook = read(name)
    for cell in code_cells(notebook):
        cell.outputs, cell.execution_count = [], None
    with_fewer_epochs(notebook, name)
    # The kernel runs in a scratch folder so the notebooks' files land there; nbclient raises CellExecutionError
    # (with the cell and the traceback) on the first failing cell.
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    check_outputs(notebook, name)
