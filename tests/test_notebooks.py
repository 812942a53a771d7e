"""Every notebook runs top to bottom in a fresh kernel, headless, and draws its figures; git keeps them stripped."""
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
from nbclient import NotebookClient  # noqa: E402

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def _code(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_there_are_the_three_notebooks():
    assert [p.name[:3] for p in NOTEBOOKS] == ["01_", "02_", "03_"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_and_draws(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    assert not any(c.outputs or c.execution_count for c in _code(nb)), "commit notebooks with outputs stripped"
    # the kernel's working directory is tmp_path: the notebook writes its figures/ there
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    pictures = [o for c in _code(nb) for o in c.outputs if "image/png" in o.get("data", {})]
    errors = [o for c in _code(nb) for o in c.outputs if o.output_type == "error"]
    assert not errors and len(pictures) >= 2, (errors, len(pictures))
    assert list((tmp_path / "figures").glob(f"{path.name[:2]}_*.png"))
