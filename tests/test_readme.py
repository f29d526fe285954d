"""The measured figures of the README and docs/ pages are generated (benchmarks/readme.py) from the
committed result files: a result changed without regenerating the pages fails here."""

import copy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import readme  # noqa: E402


def test_generated_blocks_equal_what_the_committed_results_give():
    texts = {page: page.read_text() for page in readme.pages()}
    readme.placement(texts)  # every block on exactly one page
    results = readme.sources()
    stale = {page.name: readme.stale_blocks(text, results) for page, text in texts.items()}
    assert not any(stale.values()), f"blocks {stale} differ from the committed results: run python benchmarks/readme.py"


def test_a_changed_result_makes_its_block_stale_and_bad_markers_raise():
    text = "\n".join(page.read_text() for page in readme.pages())
    results = copy.deepcopy(readme.sources())
    results["pruning"]["results"]["stock"]["prefill_s"] *= 2
    results["suite"]["passed"] += 1
    assert sorted(readme.stale_blocks(text, results)) == ["pruning", "suite"]
    with pytest.raises(ValueError, match="in both README.md and x.md"):
        readme.placement({ROOT / "README.md": text, ROOT / "x.md": "<!-- generated:io -->\n<!-- /generated:io -->"})
    with pytest.raises(ValueError, match="no such generated block"):
        readme.render("<!-- generated:nope -->\n<!-- /generated:nope -->", results)
    with pytest.raises(ValueError, match="do not pair up"):
        readme.render("<!-- generated:io -->\n", results)
