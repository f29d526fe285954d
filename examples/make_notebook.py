"""Writes examples/walkthrough.ipynb from examples/walkthrough.py (cells split at ``# %%``
lines; ``# %% [markdown]`` cells are the comment text), without outputs.

    python examples/make_notebook.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent


def cells(script: str) -> list:
    """[(kind, source)] of a percent-format script: kind "code" or "markdown"."""
    out, kind, lines = [], None, []

    def flush():
        if kind is not None:
            text = "\n".join(lines).strip("\n")
            if kind == "markdown":
                text = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in text.split("\n"))
            out.append((kind, text))

    for line in script.split("\n"):
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        else:
            lines.append(line)
    flush()
    return out


def notebook(script: str):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell(src) if kind == "markdown" else nbformat.v4.new_code_cell(src)
                for kind, src in cells(script)]
    return nb


def main() -> int:
    nb = notebook((HERE / "walkthrough.py").read_text())
    for i, cell in enumerate(nb.cells):  # stable ids, so an unchanged script writes the same file
        cell["id"] = f"cell-{i}"
    nbformat.write(nb, str(HERE / "walkthrough.ipynb"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
