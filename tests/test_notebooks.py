"""The notebooks are stored executed, from the full experiment run, as `python notebooks/refresh.py` writes them;
and every notebook runs top to bottom from notebooks/, as a reader steps through it (executed here on a copy in
memory: the stored file is left as it is), and draws its figures. The notebooks assert their equations against
the written-out sums in their own cells; runs land in runs/ (git-ignored), as they do for a reader.
"""
import os

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")
NAMES = sorted(n for n in os.listdir(NOTEBOOKS) if n.endswith(".ipynb"))


def test_notebooks_are_stored_executed_from_the_full_run_without_the_machine_in_them():
    """What a reader sees without running anything: every code cell executed without an error, a figure in each
    notebook, 03-06 from runs/experiments (not the --quick smoke run), no absolute path, no progress bars, and all
    six notebooks within a few MB."""
    root = os.path.dirname(NOTEBOOKS)
    total = 0
    for name in NAMES:
        path = os.path.join(NOTEBOOKS, name)
        total += os.path.getsize(path)
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(c.execution_count for c in code), f"{name}: cells not executed; python notebooks/refresh.py"
        outputs = [o for c in code for o in c.outputs]
        assert not [o for o in outputs if o.output_type == "error"], f"{name}: a stored cell raised"
        assert any("image/png" in o.get("data", {}) for o in outputs), f"{name}: no figure stored"
        text = "".join(o.get("text", "") + "".join(v for k, v in o.get("data", {}).items() if k.startswith("text/"))
                       for o in outputs)
        assert root not in text and "it/s]" not in text, f"{name}: a machine path or a progress bar is stored"
        if name.startswith(("03", "04", "05", "06")):
            assert "runs/experiments/" in text and "quick-experiments" not in text, f"{name}: not from the full run"
    assert total < 6e6, f"the notebooks take {total / 1e6:.1f} MB"


def test_notebook_trainings_pick_up_an_edited_option():
    """A notebook trains into a fixed folder under runs/: after a reader edits an option and re-runs the cell, the
    run must train again (--overwrite), not stop at the stage files the old options left there."""
    cells = [c.source for name in NAMES for c in nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4).cells
             if c.cell_type == "code" and "train.main(" in c.source]
    assert cells and all("--overwrite" in c for c in cells)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name):
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": NOTEBOOKS}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert images, f"{name} drew no figure"
