"""Every notebook in notebooks/ runs top to bottom without an error (and is committed without outputs)."""

import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("sklearn")

NOTEBOOK_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")
NOTEBOOKS = sorted(name for name in os.listdir(NOTEBOOK_DIR) if name.endswith(".ipynb"))


def test_the_notebooks_are_there():
    assert NOTEBOOKS == ["bring_your_own_module.ipynb", "noisy_labels.ipynb", "quick_start.ipynb"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_without_outputs(name):
    notebook = nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"clear the outputs of {name} before committing"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_without_error(name, tmp_path):
    notebook = nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)
    # The kernel runs in a scratch folder so the notebooks' files land there; nbclient raises CellExecutionError
    # (with the cell and the traceback) on the first failing cell.
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
              if output.output_type == "error"]
    assert errors == []
