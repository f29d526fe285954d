"""The README's measured figures are generated (benchmarks/readme.py) from the committed result
files: a result changed without regenerating the README fails here."""

import copy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import readme  # noqa: E402


def test_readme_blocks_equal_what_the_committed_results_give():
    text = (ROOT / "README.md").read_text()
    assert set(readme.BLOCKS) <= set(m.group(2) for m in readme.BLOCK.finditer(text))
    stale = readme.stale_blocks(text, readme.sources())
    assert not stale, f"README blocks {stale} differ from the committed results: run python benchmarks/readme.py"


def test_a_changed_result_makes_its_block_stale_and_bad_markers_raise():
    text = (ROOT / "README.md").read_text()
    results = copy.deepcopy(readme.sources())
    results["pruning"]["results"]["stock"]["prefill_s"] *= 2
    results["suite"]["passed"] += 1
    assert readme.stale_blocks(text, results) == ["suite", "pruning"]
    with pytest.raises(ValueError, match="no such generated block"):
        readme.render("<!-- generated:nope -->\n<!-- /generated:nope -->", results)
    with pytest.raises(ValueError, match="do not pair up"):
        readme.render("<!-- generated:io -->\n", results)
