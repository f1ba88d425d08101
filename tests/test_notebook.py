"""examples/notebook.ipynb, executed in a real Jupyter kernel: zero2_notebook (fork launcher) trains on 2
CPU processes and the trained weights come back into the notebook's model."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parent.parent


def test_notebook_trains_in_a_real_kernel() -> None:
    notebook = nbformat.read(ROOT / "examples" / "notebook.ipynb", as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT / "examples")}})
    client.execute()
    outputs = [out.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
               for out in cell.get("outputs", []) if out.get("output_type") == "stream"]
    text = "".join(outputs)
    print(text[-600:])
    assert "weights moved by" in text and "strategy ZeroStrategy, stage 2" in text
