"""Every notebook's code cells run top to bottom (in one namespace, as a kernel would) on the bundled model."""
import json
from pathlib import Path

import matplotlib
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path):
    matplotlib.use("Agg")
    cells = json.loads(path.read_text())["cells"]
    namespace = {}
    for i, cell in enumerate(c for c in cells if c["cell_type"] == "code"):
        exec(compile("".join(cell["source"]), f"{path.name}[{i}]", "exec"), namespace)


def test_there_are_notebooks():
    assert NOTEBOOKS
