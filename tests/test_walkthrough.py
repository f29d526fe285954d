"""examples/: the walkthrough notebook is its script (examples/make_notebook.py writes one from
the other) and runs to the end in a Jupyter kernel, so it cannot rot."""

import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import make_notebook  # noqa: E402


def test_notebook_is_the_script_and_has_no_outputs():
    committed = nbformat.read(str(ROOT / "examples" / "walkthrough.ipynb"), as_version=4)
    want = make_notebook.notebook((ROOT / "examples" / "walkthrough.py").read_text())
    assert [(c.cell_type, c.source) for c in committed.cells] == [(c.cell_type, c.source) for c in want.cells], \
        "examples/walkthrough.ipynb differs from walkthrough.py: run python examples/make_notebook.py"
    assert all(not c.get("outputs") and c.get("execution_count") is None
               for c in committed.cells if c.cell_type == "code")


@pytest.mark.slow
def test_notebook_runs_to_the_end(tmp_path, monkeypatch):
    """(~60 s: a Jupyter kernel runs the whole walkthrough as a user would - the mini-study
    model's load, three greedy generations and the plots.)"""
    from nbclient import NotebookClient

    monkeypatch.setenv("WALKTHROUGH_DIR", str(tmp_path))
    monkeypatch.setenv("VITSINK_JAX_CACHE", "off")
    nb = nbformat.read(str(ROOT / "examples" / "walkthrough.ipynb"), as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "144 visual tokens per image" in text and "sinks to the front:" in text
    assert (tmp_path / "sinks_coffee.png").stat().st_size > 1000
    assert (tmp_path / "f1_attention_by_norm.png").stat().st_size > 1000
