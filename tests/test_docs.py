"""Every Python block of the README and the docs/ pages runs as written. A block that needs a
real checkpoint names it as ``/path/to/llava-1.5-7b-hf``; it runs here on the shipped mini-study
model (a complete llava-hf folder, assembled offline) standing in for it."""

import re
from pathlib import Path

import pytest

from vitsink_jax import mini_study

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
STAND_IN = "/path/to/llava-1.5-7b-hf"


def python_blocks() -> list:
    blocks = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for i, m in enumerate(FENCE.finditer(page.read_text())):
            blocks.append(pytest.param(m.group(1), id=f"{page.name}-{i}"))
    return blocks


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory) -> Path:
    return mini_study.assemble("single", tmp_path_factory.mktemp("stand_in"))


def test_the_pages_hold_python_blocks():
    assert len(python_blocks()) >= 4  # the front page's, the library's two, sink-to-the-front


@pytest.mark.slow
@pytest.mark.parametrize("code", python_blocks())
def test_python_block_runs_as_written(code, stand_in, tmp_path, monkeypatch):
    """(The front page's block loads the model in transformers too: ~20 s.)"""
    monkeypatch.chdir(tmp_path)  # blocks write relative paths (runs/..., out_dir)
    exec(compile(code.replace(STAND_IN, str(stand_in)), "<doc block>", "exec"), {"__name__": "doc_block"})
